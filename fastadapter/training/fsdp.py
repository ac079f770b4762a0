"""FSDP2 for LLaMA-Adapter: the frozen base sharded with :func:`torch.distributed.fsdp.fully_shard`, one unit per
transformer block (plus the root: embedding, final norm, output head), the adapter replicated.

What each rank holds: ``1/world_size`` of every base weight (a ``DTensor`` sharded on dim 0); a block's full
weights exist only while that block runs its forward or its backward (gathered, then freed: ``reshard_after_
forward``). The base is frozen, so FSDP never allocates a gradient, a reduce-scatter or optimizer state for it.

Why the adapter is **replicated**, not sharded: it is 1.2M fp32 values for LLaMA-7B (~5 MB, and ~10 MB of AdamW
state), about 0.04% of one rank's share of a 7B base over 8 GPUs; sharding it would save nothing measurable and
would turn the optimizer state, gradient clipping and the adapter-only checkpoints into distributed tensors. As
``ignored_params`` of ``fully_shard`` (or added after sharding) it stays an ordinary fp32 tensor on every rank:
each rank's gradient is summed by the trainer's one all-reduce per step (:func:`.distributed.all_reduce_gradients`,
the same path as data parallelism), so the optimizer step, clipping, checkpoints and ``--resume`` are unchanged
and rank 0 writes the adapter without any gather.

Mixed precision is FSDP's own :class:`~torch.distributed.fsdp.MixedPrecisionPolicy`: the gathered base weights
are cast to ``param_dtype`` (bf16 under ``--dtype bf16``) for compute, whatever dtype the shards are stored in.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistributedContext


def _require_process_group(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs a torch.distributed process group: launch the job with torchrun (one "
                           f"process per GPU) or call torch.distributed.init_process_group first")


def device_mesh(context: DistributedContext):
    """The 1-D device mesh of every rank of the job (``context.device``'s type: ``cuda`` or ``cpu``/gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    _require_process_group("FSDP")
    if dist.get_world_size() != context.world_size:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks, the context says "
                         f"{context.world_size}")
    return init_device_mesh(context.device.type, (context.world_size,))


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s base was sharded by :func:`shard_base`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_base(model: nn.Module, context: DistributedContext, *, param_dtype: Optional[torch.dtype] = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard the frozen base of a :class:`~fastadapter.model.llama.LlamaModel` over the ranks, in place.

    ``fully_shard`` is applied to every ``model.layers[i]`` (a unit gathered for that block's forward and
    backward, freed after) and then to the model (the embedding, final norm and output head). The model may be
    on the meta device (see :func:`fastadapter.training.load_sharded.load_sharded`) or already materialised; its
    adapter, when it has one, is replicated (the module docstring says why).

    Args:
        model: a LlamaModel whose base parameters are frozen (``requires_grad=False``); trainable parameters
            must be the adapter's (fp32), and are left out of FSDP.
        context: this rank's place in the job (the process group must already exist).
        param_dtype: compute dtype of the gathered base weights (None: their stored dtype).
        reshard_after_forward: free each block's gathered weights after its forward (re-gathered for backward).

    Returns:
        ``model``, now an ``FSDPModule`` whose base parameters are ``DTensor`` shards ``[ceil(rows / world), ...]``.

    Raises:
        RuntimeError: no process group. ValueError: already sharded, or a trainable parameter that is not fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        raise ValueError("the model is already sharded (shard_base was called on it before)")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"shard_base needs a fastadapter LlamaModel (with .layers), got {type(model).__name__}")
    mesh = device_mesh(context)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    not_adapter = [name for name in trainable if ".adapter." not in name]
    if not_adapter:
        raise ValueError(f"the base must be frozen before sharding, but {not_adapter[:3]} require gradients: call "
                         f"fastadapter.add_adapter(model, config) (which freezes the base) or "
                         f"model.requires_grad_(False) first")
    wrong = [name for name, p in trainable.items() if p.dtype != torch.float32]
    if wrong:
        raise ValueError(f"adapter parameters must stay fp32, {wrong[:3]} are not")
    _remember_fingerprint(model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    ignored = set(trainable.values())
    for block in layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored & set(block.parameters()) or None)
    # The root unit: tok_embeddings, norm and output stay gathered through the whole forward (the output head
    # needs them last), so there is nothing to gain from freeing them in between.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False,
                ignored_params=ignored or None)
    return model


def _remember_fingerprint(model: nn.Module) -> None:
    """Store the base model's fingerprint (see :func:`fastadapter.adapters.adapter.base_model_description`) while
    the embedding is still a whole tensor: rank 0 alone writes the adapter file, and fingerprinting a sharded
    embedding there would need the other ranks."""
    from ..adapters.adapter_file import base_model_fingerprint

    weight, c = model.tok_embeddings.weight, model.config
    if not weight.is_meta and getattr(model, "base_fingerprint", None) is None:
        model.base_fingerprint = base_model_fingerprint(weight, c.n_layers, c.n_heads, c.n_kv_heads)


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, end)``: the rows of a ``rows``-row tensor that ``rank`` holds under ``Shard(0)`` (torch.chunk's
    split: ``ceil(rows / world_size)`` per rank, the last ranks short or empty)."""
    size = math.ceil(rows / world_size)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def resident_base_bytes(model: nn.Module) -> tuple[int, int]:
    """``(this rank's bytes, the whole base's bytes)`` of the frozen base parameters, measured from the tensors:
    the local shard of each ``DTensor`` (``to_local()``), the whole parameter otherwise."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        held = p.to_local() if isinstance(p, DTensor) else p
        local += held.numel() * held.element_size()
    return local, total
