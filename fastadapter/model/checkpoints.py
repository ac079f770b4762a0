"""``load_model``: build a :class:`LlamaModel` from a checkpoint on disk, whichever format it is in.

* llama2.c legacy ``.bin`` (:mod:`.load_llama2c`);
* Meta ``consolidated.*.pth`` + ``params.json``, one or several model-parallel shards (:mod:`.load_meta`);
* Hugging Face folders of LLaMA and its relatives (Mistral, Qwen2/3, Gemma2/3, Olmo, SmolLM3), ``config.json`` +
  ``*.safetensors`` (:mod:`.load_hf`);
* GGUF files (llama.cpp's format, quantized or not) of LLaMA, Qwen2/3 and Gemma2/3, dequantized into the compute
  dtype (:mod:`.load_gguf`).

Every loader builds the model on the meta device and hands :func:`assign_weights` tensors that are views of the
memory-mapped files, so loading allocates no second copy of the weights (only tensors that must be reshaped or
merged — Hugging Face's permuted ``wq``/``wk``, model-parallel shards — are materialised, once). A GGUF file's
weights are dequantized, one tensor at a time.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator, Mapping, Optional, Union

import torch

from .config import LlamaConfig
from .llama import LlamaModel


class CheckpointError(ValueError):
    """A checkpoint that is missing pieces, truncated, corrupt or of the wrong shape; the message names the file,
    the tensor and the expected shape."""


def build_on_meta(config: LlamaConfig) -> LlamaModel:
    """A :class:`LlamaModel` whose parameters take no memory, ready for :func:`assign_weights`."""
    with torch.device("meta"):
        return LlamaModel(config)


#: Set by :func:`receive_weights`: what :func:`assign_weights` does with the checked tensors instead of assigning
#: them (the FSDP loader takes each rank's shards of the memory-mapped tensors, see :mod:`.load_sharded`).
_WEIGHTS_RECEIVER: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("weights_receiver",
                                                                                        default=None)


@contextlib.contextmanager
def receive_weights(receiver: Callable[[LlamaModel, Mapping[str, torch.Tensor], torch.dtype], LlamaModel]
                    ) -> Iterator[None]:
    """While active, :func:`load_model` hands ``receiver(meta_model, tensors, dtype)`` the checked (still
    memory-mapped, unconverted) tensors instead of assigning them; what it returns is the loaded model."""
    token = _WEIGHTS_RECEIVER.set(receiver)
    try:
        yield
    finally:
        _WEIGHTS_RECEIVER.reset(token)


def assign_weights(model: LlamaModel, tensors: Mapping[str, torch.Tensor], sources: Mapping[str, str],
                   dtype: Optional[torch.dtype] = None) -> LlamaModel:
    """Make ``tensors`` (Meta names, see :mod:`.llama`) the parameters of the meta-device ``model``, without
    copying them unless ``dtype`` asks for a conversion.

    Args:
        tensors: ``{parameter name: tensor}``; every parameter of ``model`` must be present, with its shape.
        sources: ``{parameter name: file}`` for error messages (``""`` key: the checkpoint as a whole).
        dtype: convert every weight to this dtype; by default the dtype of the token embedding.
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    where = sources.get("", "the checkpoint")
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{sources.get(name, where)}: tensor {name!r} is missing (expected shape "
                                  f"{list(shape)})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(f"{sources.get(name, where)}: tensor {name!r} has shape {list(got)}, expected "
                                  f"{list(shape)} for {model.config}")
    dtype = dtype or tensors["tok_embeddings.weight"].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{where}: weights must be floating point, the token embedding is {dtype}")
    for name in expected:
        if not all_finite(tensors[name]):
            raise CheckpointError(f"{sources.get(name, where)}: tensor {name!r} holds NaN or infinite values; the "
                                  f"checkpoint is corrupt (or was saved after training diverged)")
    receiver = _WEIGHTS_RECEIVER.get()
    if receiver is not None:
        return receiver(model, {name: tensors[name] for name in expected}, dtype)
    state = {name: tensors[name].to(dtype) for name in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def all_finite(tensor: torch.Tensor, chunk_elements: int = 1 << 24) -> bool:
    """Whether every value of ``tensor`` is finite, checked in slices of about ``chunk_elements`` values so that
    a large weight (a 128K-token embedding) needs no mask of its size."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().reshape(-1)
    for start in range(0, flat.numel(), chunk_elements):
        if not bool(torch.isfinite(flat[start:start + chunk_elements]).all()):
            return False
    return True


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
