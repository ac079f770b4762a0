"""Loader of llama2.c's legacy ``.bin`` checkpoints (``stories260K.bin`` and the other tinyllamas).

Layout: seven little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
negative vocab_size means a separate classifier ``wcls`` follows at the end), then float32 arrays stored
``[out, in]``: tok_embeddings ``[V, d]``, rms_att ``[L, d]``, wq ``[L, d, d]``, wk ``[L, kv·hd, d]``, wv, wo
``[L, d, d]``, rms_ffn ``[L, d]``, w1 ``[L, h, d]``, w2 ``[L, d, h]``, w3 ``[L, h, d]``, rms_final ``[d]``, the
two unused RoPE tables ``[seq_len, hd/2]`` and, when not shared, wcls ``[V, d]``.

The file is memory-mapped copy-on-write: the parameters are views of the mapping.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .weights import CheckpointError, assign_weights, build_on_meta
from ..model.config import LlamaConfig

_HEADER_INTS = 7


def read_llama2c_config(path: str) -> tuple[LlamaConfig, bool]:
    """The configuration in the header of ``path`` and whether the classifier is shared with the embedding."""
    with open(path, "rb") as f:
        header = f.read(4 * _HEADER_INTS)
    if len(header) < 4 * _HEADER_INTS:
        raise CheckpointError(f"{path}: truncated: the llama2.c header needs {4 * _HEADER_INTS} bytes, the file has "
                              f"{len(header)}")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = np.frombuffer(header, "<i4").tolist()
    try:
        config = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                             vocab_size=abs(vocab_size), hidden_dim=hidden_dim, norm_eps=1e-5, rope_theta=10000.0,
                             max_seq_len=seq_len, tie_embeddings=vocab_size > 0)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a llama2.c checkpoint: its header gives an impossible model ({exc})") \
            from exc
    return config, vocab_size > 0


def _layout(config: LlamaConfig, shared_classifier: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of the file in order: ``(llama2.c name, shape)``."""
    d, h, n_layers, v = config.dim, config.hidden_dim, config.n_layers, config.vocab_size
    kv = config.n_kv_heads * config.head_dim
    layout = [("tok_embeddings", (v, d)), ("rms_att", (n_layers, d)), ("wq", (n_layers, d, d)),
              ("wk", (n_layers, kv, d)), ("wv", (n_layers, kv, d)), ("wo", (n_layers, d, d)),
              ("rms_ffn", (n_layers, d)), ("w1", (n_layers, h, d)), ("w2", (n_layers, d, h)),
              ("w3", (n_layers, h, d)), ("rms_final", (d,)),
              ("freq_cis_real", (config.max_seq_len, config.head_dim // 2)),
              ("freq_cis_imag", (config.max_seq_len, config.head_dim // 2))]
    if not shared_classifier:
        layout.append(("wcls", (v, d)))
    return layout


#: llama2.c array -> the per-layer parameter it holds (``{i}``: the layer).
_PER_LAYER = {"rms_att": "layers.{i}.attention_norm.weight", "wq": "layers.{i}.attention.wq.weight",
              "wk": "layers.{i}.attention.wk.weight", "wv": "layers.{i}.attention.wv.weight",
              "wo": "layers.{i}.attention.wo.weight", "rms_ffn": "layers.{i}.ffn_norm.weight",
              "w1": "layers.{i}.feed_forward.w1.weight", "w2": "layers.{i}.feed_forward.w2.weight",
              "w3": "layers.{i}.feed_forward.w3.weight"}
_GLOBAL = {"tok_embeddings": "tok_embeddings.weight", "rms_final": "norm.weight", "wcls": "output.weight"}


def load_llama2c(path: str, *, dtype: Optional[torch.dtype] = None):
    """A :class:`LlamaModel` with the weights of the llama2.c checkpoint ``path`` (fp32, memory-mapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config, shared = read_llama2c_config(path)
    layout = _layout(config, shared)
    size = os.path.getsize(path)
    offset = 4 * _HEADER_INTS
    for name, shape in layout:
        end = offset + 4 * int(np.prod(shape))
        if end > size:
            raise CheckpointError(f"{path}: truncated: array {name!r} of shape {list(shape)} needs bytes {offset} to "
                                  f"{end}, the file has {size} bytes")
        offset = end
    if offset != size:
        raise CheckpointError(f"{path}: {size - offset} bytes more than the llama2.c layout of {config} needs "
                              f"({offset} bytes): not a llama2.c checkpoint of that shape")

    # Copy-on-write mapping: writable views for torch, pages read lazily, the file never modified.
    floats = np.memmap(path, dtype="<f4", mode="c", offset=4 * _HEADER_INTS)
    arrays, start = {}, 0
    for name, shape in layout:
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(floats[start:start + count].reshape(shape))
        start += count
    tensors = {}
    for name, pattern in _PER_LAYER.items():
        for i in range(config.n_layers):
            tensors[pattern.format(i=i)] = arrays[name][i]
    for name, parameter in _GLOBAL.items():
        if name in arrays:
            tensors[parameter] = arrays[name]
    return assign_weights(build_on_meta(config), tensors, {"": path}, dtype)
