"""Checkpoint loaders: llama2.c ``.bin``, Meta ``consolidated.*.pth``, Hugging Face folders and GGUF files, each
into a :class:`~fastadapter.model.LlamaModel` (:func:`load_model` picks the loader from the checkpoint itself)."""
from .checkpoints import load_model
from .weights import CheckpointError

__all__ = ["load_model", "CheckpointError"]
