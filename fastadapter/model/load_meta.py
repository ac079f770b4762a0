"""Loader of Meta's checkpoints: ``params.json`` and ``consolidated.00.pth`` … ``consolidated.NN.pth``.

With several model-parallel shards every tensor is cut along the dimension its layer is parallel over:
column-parallel ``wq, wk, wv, w1, w3`` and ``output`` on dim 0, row-parallel ``wo, w2`` on dim 1, the token
embedding on dim 1; the RMSNorm weights are replicated. Shards are memory-mapped
(``torch.load(mmap=True, weights_only=True)``); a single shard's tensors become the parameters as they are,
merged tensors are concatenated once.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch

from .checkpoints import CheckpointError, assign_weights, build_on_meta
from .config import Llama3RopeScaling, LlamaConfig, meta_hidden_dim

_CONCAT_DIM_0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                 "feed_forward.w3.weight", "output.weight")
_CONCAT_DIM_1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def _split_dim(name: str) -> Optional[int]:
    """The dimension model parallelism cuts ``name`` along, None when it is replicated."""
    if name.endswith(_CONCAT_DIM_0):
        return 0
    if name.endswith(_CONCAT_DIM_1):
        return 1
    return None


def _load_shard(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, pickle errors… for a bad file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint: truncated or corrupt ({exc})") \
            from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _config(folder: str, params: dict, shard0: dict, n_shards: int) -> LlamaConfig:
    path = os.path.join(folder, "params.json")
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: key {exc} is missing") from exc
    vocab_size = int(params.get("vocab_size", -1))
    if vocab_size <= 0:  # LLaMA-1's params.json says -1: the tokenizer decides, the embedding knows
        if "tok_embeddings.weight" not in shard0:
            raise CheckpointError(f"{folder}: tensor 'tok_embeddings.weight' is missing from shard 0")
        vocab_size = shard0["tok_embeddings.weight"].shape[0]
    if "layers.0.feed_forward.w1.weight" in shard0:
        hidden_dim = shard0["layers.0.feed_forward.w1.weight"].shape[0] * n_shards
    else:
        hidden_dim = meta_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
    scaling = Llama3RopeScaling() if params.get("use_scaled_rope") else None
    try:
        return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=int(params.get("n_kv_heads") or n_heads), vocab_size=vocab_size,
                           hidden_dim=hidden_dim, norm_eps=float(params.get("norm_eps", 1e-5)),
                           rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
                           max_seq_len=int(params.get("max_seq_len", 2048)), tie_embeddings=False)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_meta(folder: str, *, dtype: Optional[torch.dtype] = None):
    """A :class:`LlamaModel` with the weights of a Meta checkpoint folder (one or several shards)."""
    params_path = os.path.join(folder, "params.json")
    try:
        with open(params_path, encoding="utf-8") as f:
            params = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{params_path}: not valid JSON ({exc})") from exc
    shard_paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shard_paths:
        raise CheckpointError(f"{folder}: no consolidated.*.pth weights beside params.json")
    shards = [_load_shard(p) for p in shard_paths]
    config = _config(folder, params, shards[0], len(shards))
    model = build_on_meta(config)

    tensors, sources = {}, {"": folder}
    for name in dict(model.named_parameters()):
        pieces = []
        for path, shard in zip(shard_paths, shards):
            if name not in shard:
                raise CheckpointError(f"{path}: tensor {name!r} is missing (expected shape "
                                      f"{list(model.get_parameter(name).shape)} over {len(shards)} shard(s))")
            pieces.append(shard[name])
        dim = _split_dim(name)
        tensors[name] = pieces[0] if len(pieces) == 1 or dim is None else torch.cat(pieces, dim=dim)
        sources[name] = shard_paths[0] if len(pieces) == 1 else f"{folder} ({len(shards)} shards)"
    return assign_weights(model, tensors, sources, dtype)
