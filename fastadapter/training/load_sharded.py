"""Loading a checkpoint straight into FSDP shards: the whole base is never materialised on any rank.

Every rank builds the model on the meta device, shards it (:func:`fastadapter.training.fsdp.shard_base`),
allocates only its own shards (``to_empty``) and copies into them its rows of each tensor of the checkpoint,
read through the loaders' memory maps (:func:`fastadapter.loaders.weights.receive_weights`): a rank reads, converts and keeps
``1/world_size`` of every weight, so its resident memory is about one shard of the base plus the one tensor
being converted, never the whole model. (Tensors that a format stores permuted or split — Hugging Face's
``wq``/``wk``, Meta's model-parallel shards — are materialised by the loader, one tensor at a time.)
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch

from ..adapters.adapter_file import base_model_fingerprint
from ..loaders.checkpoints import load_model
from ..model.llama import LlamaModel
from ..loaders.weights import receive_weights


def load_sharded(path: Union[str, os.PathLike], context, *, dtype: Optional[torch.dtype] = None,
                 param_dtype: Optional[torch.dtype] = None) -> LlamaModel:
    """Load the checkpoint at ``path`` as a frozen :class:`LlamaModel` whose base is sharded over the ranks.

    Args:
        path: any checkpoint :func:`fastadapter.loaders.load_model` reads.
        context: this rank's :class:`~fastadapter.training.distributed.DistributedContext` (the process group
            must exist); the shards are allocated on ``context.device``.
        dtype: the dtype the shards are stored in (default: the checkpoint's).
        param_dtype: FSDP's compute dtype for the gathered weights (default: ``dtype``).

    Returns:
        The model (in eval mode), every parameter a ``DTensor`` shard; give it an adapter with
        :func:`fastadapter.add_adapter` (the adapter is replicated, see :mod:`fastadapter.training.fsdp`).
    """
    from .fsdp import shard_base, shard_rows

    def receive(model: LlamaModel, tensors: Mapping[str, torch.Tensor], stored: torch.dtype) -> LlamaModel:
        from torch.distributed.tensor import DTensor

        c = model.config
        model.to(stored).requires_grad_(False)  # still on the meta device: nothing is allocated
        shard_base(model, context, param_dtype=param_dtype or stored)
        model.to_empty(device=context.device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                full = tensors[name]
                local = param.to_local() if isinstance(param, DTensor) else param
                start, end = shard_rows(full.shape[0], context.world_size, context.rank)
                if local.shape[0] != end - start:
                    raise RuntimeError(f"{name}: FSDP gave rank {context.rank} a shard of {local.shape[0]} rows, "
                                       f"expected rows {start}:{end} of {full.shape[0]}")
                local.copy_(full[start:end].to(stored))
        # The fingerprint of adapter files needs embedding rows 0, 1 and V-1: read from the file, not gathered.
        model.base_fingerprint = base_model_fingerprint(tensors["tok_embeddings.weight"], c.n_layers, c.n_heads,
                                                        c.n_kv_heads)
        return model

    with receive_weights(receive):
        return load_model(path, dtype=dtype)
