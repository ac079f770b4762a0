"""Recipes: a whole job built from the library's parts, taking one settings object (as torchtune's recipes).
The commands (:mod:`fastadapter.commands`) parse flags into settings and run a recipe; a script can do the same
without a command line. :mod:`.adapter_finetune` is LLaMA-Adapter fine-tuning (``fastadapter train``)."""
