"""The weights half of loading a checkpoint, shared by every loader: build a :class:`LlamaModel` on the meta
device, check the loaded tensors (present, of the right shape, floating point, finite) and make them its
parameters without copying them (:func:`assign_weights`), or hand them to a receiver (the FSDP loader,
:func:`receive_weights`). :func:`~fastadapter.loaders.checkpoints.load_model` picks the loader; the loaders
import this module, never the dispatcher.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Mapping, Optional

import torch

from ..model.config import LlamaConfig
from ..model.llama import LlamaModel
from ..setting_error import NamesSettings


class CheckpointError(NamesSettings, ValueError):
    """A checkpoint that is missing pieces, truncated, corrupt or of the wrong shape; the message names the file,
    the tensor and the expected shape."""


def build_on_meta(config: LlamaConfig) -> LlamaModel:
    """A :class:`LlamaModel` whose parameters take no memory, ready for :func:`assign_weights`."""
    with torch.device("meta"):
        return LlamaModel(config)


#: Set by :func:`receive_weights`: what :func:`assign_weights` does with the checked tensors instead of assigning
#: them (the FSDP loader takes each rank's shards of the memory-mapped tensors, see :mod:`fastadapter.training.load_sharded`).
_WEIGHTS_RECEIVER: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("weights_receiver",
                                                                                        default=None)


@contextlib.contextmanager
def receive_weights(receiver: Callable[[LlamaModel, Mapping[str, torch.Tensor], torch.dtype], LlamaModel]
                    ) -> Iterator[None]:
    """While active, :func:`~.checkpoints.load_model` hands ``receiver(meta_model, tensors, dtype)`` the checked (still
    memory-mapped, unconverted) tensors instead of assigning them; what it returns is the loaded model."""
    token = _WEIGHTS_RECEIVER.set(receiver)
    try:
        yield
    finally:
        _WEIGHTS_RECEIVER.reset(token)


def assign_weights(model: LlamaModel, tensors: Mapping[str, torch.Tensor], sources: Mapping[str, str],
                   dtype: Optional[torch.dtype] = None) -> LlamaModel:
    """Make ``tensors`` (Meta names, see :mod:`fastadapter.model.llama`) the parameters of the meta-device ``model``, without
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
    for name in expected:  # whatever ``dtype`` asks for: an integer weight is not a value to cast
        if not tensors[name].is_floating_point():
            raise CheckpointError.naming("{source}: tensor {name!r} is {dtype}; weights must be floating point "
                                         "(quantized checkpoints are not read: give the fp32, fp16 or bf16 weights, "
                                         "and quantize with {quantize})", source=sources.get(name, where), name=name,
                                         dtype=tensors[name].dtype)
    dtype = dtype or tensors["tok_embeddings.weight"].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{where}: dtype must be floating point, got {dtype}")
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
