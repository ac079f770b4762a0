"""Loader of Meta's checkpoints: ``params.json`` and ``consolidated.00.pth`` … ``consolidated.NN.pth``.

With several model-parallel shards every tensor is cut along the dimension its layer is parallel over:
column-parallel ``wq, wk, wv, w1, w3`` and ``output`` on dim 0, row-parallel ``wo, w2`` on dim 1; the RMSNorm
weights are replicated. The token embedding ``[vocab, dim]`` is cut along dim 1 by LLaMA-1/2
(``ParallelEmbedding``) and along the vocabulary, dim 0, by LLaMA-3 (``VocabParallelEmbedding``): which one is
read from the shards' shapes against ``params.json``. Shards are memory-mapped
(``torch.load(mmap=True, weights_only=True)``); a single shard's tensors become the parameters as they are,
merged tensors are concatenated once.

RoPE: ``rope_theta``, and LLaMA-3.1's frequency scaling when ``use_scaled_rope`` is true — Meta's fixed values
(factor 8, low/high frequency factors 1 and 4, original context 8192) unless a ``rope_scaling`` dict
(``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``) or the flat
``rope_scaling_factor`` / ``rope_high_freq_factor`` keys say otherwise.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch

from .weights import CheckpointError, assign_weights, build_on_meta
from ..model.config import Llama3RopeScaling, LlamaConfig, meta_hidden_dim

_CONCAT_DIM_0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                 "feed_forward.w3.weight", "output.weight")
_CONCAT_DIM_1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def _split_dim(name: str) -> Optional[int]:
    """The dimension model parallelism cuts ``name`` along, None when it is replicated (LLaMA-1/2 layout; the
    token embedding of LLaMA-3 is cut along dim 0, see :func:`_embedding_split`)."""
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


def _embedding_split(folder: str, shard_paths: list[str], shards: list[dict], dim: int,
                     vocab_size: int) -> tuple[Optional[int], int]:
    """``(split dim, vocab size)`` of ``tok_embeddings.weight [vocab, dim]`` over the shards: dim 1 when every
    shard holds ``[vocab, dim / n]`` (LLaMA-1/2), dim 0 when every shard holds ``[vocab / n, dim]`` (LLaMA-3),
    None for a single shard. ``vocab_size <= 0`` (LLaMA-1's -1) means unknown: the shards then tell it."""
    vocab = "vocab" if vocab_size <= 0 else str(vocab_size)
    shapes = []
    for path, shard in zip(shard_paths, shards):
        if "tok_embeddings.weight" not in shard:
            raise CheckpointError(f"{path}: tensor 'tok_embeddings.weight' is missing (expected shape "
                                  f"[{vocab}, {dim}] over {len(shards)} shard(s))")
        shapes.append(tuple(shard["tok_embeddings.weight"].shape))
    if any(len(shape) != 2 for shape in shapes):
        raise CheckpointError(f"{folder}: tensor 'tok_embeddings.weight' has shapes {[list(x) for x in shapes]} in "
                              f"the shards, expected [vocab, dim]")
    rows, cols = [r for r, _ in shapes], [c for _, c in shapes]
    if len(shards) == 1:  # a wrong shape is reported with the other parameters' by assign_weights
        return None, vocab_size if vocab_size > 0 else rows[0]
    if all(c == dim for c in cols) and (vocab_size <= 0 or sum(rows) == vocab_size):
        return 0, sum(rows)
    if sum(cols) == dim and len(set(rows)) == 1 and (vocab_size <= 0 or rows[0] == vocab_size):
        return 1, rows[0]
    raise CheckpointError(f"{folder} ({len(shards)} shards): tensor 'tok_embeddings.weight' has shapes "
                          f"{[list(x) for x in shapes]} in {', '.join(os.path.basename(p) for p in shard_paths)}, "
                          f"expected [{vocab}, {dim}/{len(shards)}] each (split along dim 1, LLaMA-1/2) or "
                          f"[{vocab}/{len(shards)}, {dim}] each (split along the vocabulary, LLaMA-3) for "
                          f"params.json's dim={dim}, vocab_size={vocab_size}")


def _rope_scaling(path: str, params: dict) -> Optional[Llama3RopeScaling]:
    """LLaMA-3.1's RoPE scaling from ``params.json``: None without ``use_scaled_rope`` or a ``rope_scaling``
    dict (an explicit ``"use_scaled_rope": false`` wins), Meta's fixed values for the settings not given."""
    settings = params.get("rope_scaling")
    if settings is not None and not isinstance(settings, dict):
        raise CheckpointError(f"{path}: rope_scaling must be a JSON object, got {settings!r}")
    settings = dict(settings or {})
    if not params.get("use_scaled_rope", bool(settings)):
        return None
    rope_type = settings.pop("rope_type", settings.pop("type", "llama3"))
    if rope_type != "llama3":
        raise CheckpointError(f"{path}: RoPE scaling type {rope_type!r} is not supported (fastadapter knows "
                              f"'llama3')")
    default = Llama3RopeScaling()
    values = {"factor": settings.pop("factor", params.get("rope_scaling_factor", default.factor)),
              "low_freq_factor": settings.pop("low_freq_factor", default.low_freq_factor),
              "high_freq_factor": settings.pop("high_freq_factor",
                                               params.get("rope_high_freq_factor", default.high_freq_factor)),
              "original_max_seq_len": settings.pop("original_max_position_embeddings",
                                                   settings.pop("original_max_seq_len",
                                                                default.original_max_seq_len))}
    if settings:
        raise CheckpointError(f"{path}: unknown rope_scaling keys {sorted(settings)} (known: factor, "
                              f"low_freq_factor, high_freq_factor, original_max_position_embeddings)")
    try:
        return Llama3RopeScaling(factor=float(values["factor"]), low_freq_factor=float(values["low_freq_factor"]),
                                 high_freq_factor=float(values["high_freq_factor"]),
                                 original_max_seq_len=int(values["original_max_seq_len"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _config(folder: str, params: dict, shard0: dict, n_shards: int, vocab_size: int) -> LlamaConfig:
    """The :class:`LlamaConfig` of ``params.json``; ``vocab_size`` as :func:`_embedding_split` found it."""
    path = os.path.join(folder, "params.json")
    dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    if "layers.0.feed_forward.w1.weight" in shard0:
        hidden_dim = shard0["layers.0.feed_forward.w1.weight"].shape[0] * n_shards
    else:
        hidden_dim = meta_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
    try:
        return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=int(params.get("n_kv_heads") or n_heads), vocab_size=vocab_size,
                           hidden_dim=hidden_dim, norm_eps=float(params.get("norm_eps", 1e-5)),
                           rope_theta=float(params.get("rope_theta", 10000.0)),
                           rope_scaling=_rope_scaling(path, params),
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
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{params_path}: key {key!r} is missing")
    embedding_dim, vocab_size = _embedding_split(folder, shard_paths, shards, int(params["dim"]),
                                                 int(params.get("vocab_size", -1)))
    config = _config(folder, params, shards[0], len(shards), vocab_size)
    model = build_on_meta(config)

    tensors, sources = {}, {"": folder}
    for name in dict(model.named_parameters()):
        pieces = []
        for path, shard in zip(shard_paths, shards):
            if name not in shard:
                raise CheckpointError(f"{path}: tensor {name!r} is missing (expected shape "
                                      f"{list(model.get_parameter(name).shape)} over {len(shards)} shard(s))")
            pieces.append(shard[name])
        dim = embedding_dim if name == "tok_embeddings.weight" else _split_dim(name)
        tensors[name] = pieces[0] if len(pieces) == 1 or dim is None else torch.cat(pieces, dim=dim)
        sources[name] = shard_paths[0] if len(pieces) == 1 else f"{folder} ({len(shards)} shards)"
    return assign_weights(model, tensors, sources, dtype)
