"""``load_model``: build a :class:`LlamaModel` from a checkpoint on disk, whichever format it is in.

* llama2.c legacy ``.bin`` (:mod:`.load_llama2c`);
* Meta ``consolidated.*.pth`` + ``params.json``, one or several model-parallel shards (:mod:`.load_meta`);
* Hugging Face folders of LLaMA and its relatives (Mistral, Qwen2/3, Gemma2/3, Olmo, SmolLM3), ``config.json`` +
  ``*.safetensors`` (:mod:`.load_hf`);
* GGUF files (llama.cpp's format, quantized or not) of LLaMA, Qwen2/3 and Gemma2/3, dequantized into the compute
  dtype (:mod:`.load_gguf`).

Every loader builds the model on the meta device and hands :func:`~.weights.assign_weights` tensors that are views of the
memory-mapped files, so loading allocates no second copy of the weights (only tensors that must be reshaped or
merged — Hugging Face's permuted ``wq``/``wk``, model-parallel shards — are materialised, once). A GGUF file's
weights are dequantized, one tensor at a time.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..model.llama import LlamaModel
from .weights import CheckpointError


def detect_checkpoint_format(path: str) -> str:
    """``"llama2c"``, ``"meta"``, ``"hf"`` or ``"gguf"`` for the checkpoint at ``path`` (a file or a folder)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        if path.endswith(".gguf"):
            raise CheckpointError(f"{path}: named .gguf but does not start with the GGUF magic bytes; the file is "
                                  f"not a GGUF checkpoint (or is corrupt)")
        if path.endswith(".bin"):
            return "llama2c"
        raise CheckpointError(f"{path}: a single-file checkpoint must be a llama2.c .bin or a GGUF file; Meta and "
                              f"Hugging Face checkpoints are folders")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    names = os.listdir(path)
    if "params.json" in names:
        return "meta"
    if "config.json" in names:
        return "hf"
    raise CheckpointError(f"{path}: not a checkpoint fastadapter knows: expected params.json + consolidated.*.pth "
                          f"(Meta) or config.json + *.safetensors (Hugging Face)")


def load_model(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
               format: Optional[str] = None) -> LlamaModel:
    """Load a LLaMA checkpoint as a :class:`LlamaModel` (in eval mode).

    Args:
        path: a llama2.c ``.bin`` file, a Meta folder (``params.json`` + ``consolidated.*.pth``), a Hugging
            Face folder (``config.json`` + ``*.safetensors``) or a GGUF file.
        dtype: convert the weights to this dtype (default: keep the checkpoint's; a GGUF file's are
            dequantized into float32).
        format: ``"llama2c"``, ``"meta"``, ``"hf"`` or ``"gguf"``; detected when None.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: missing, truncated or corrupt files, or tensors of the wrong shape.
    """
    path = os.fspath(path)
    format = format or detect_checkpoint_format(path)
    if format == "llama2c":
        from .load_llama2c import load_llama2c as loader
    elif format == "meta":
        from .load_meta import load_meta as loader
    elif format == "hf":
        from .load_hf import load_hf as loader
    elif format == "gguf":
        from .load_gguf import load_gguf as loader
    else:
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'llama2c', 'meta', 'hf' or 'gguf'")
    return loader(path, dtype=dtype).eval()
