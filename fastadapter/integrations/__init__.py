"""Drop-in LLaMA-Adapter for Hugging Face models, built on :func:`fastadapter.zero_init_attention`.

* :mod:`fastadapter.integrations.transformers`: ``apply_adapter(model)`` turns a Llama, Mistral, Qwen2, Qwen3,
  Gemma2, Gemma3, Olmo or SmolLM3 causal LM (the allowlist of :mod:`._llama_pattern`) into a LLaMA-Adapter model in
  place; ``save_adapter`` /
  ``load_adapter`` move adapters between Hugging Face models and fastadapter's own LLaMA.
* :mod:`fastadapter.integrations.peft`: ``accelerate(peft_model)`` runs the ``AdaptedAttention`` layers of a PEFT
  ``adaption_prompt`` model through the fused op, sharing PEFT's parameters; ``export_to_peft`` writes a
  fastadapter adapter as a PEFT adapter folder.

The submodules import ``transformers`` / ``peft`` when imported themselves, not when this package is, so that
``import fastadapter`` never needs them. The tested versions are pinned in :mod:`._versions`.
"""
