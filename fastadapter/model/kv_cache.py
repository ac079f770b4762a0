"""``KVCache``: the keys and values of past tokens during generation, one buffer per layer, per-row lengths.

Rows may hold different lengths (prompts of different lengths are not padded); the attention of a decoding step
groups rows of equal length into one call. Each adapted layer's prefix keys and values are projected once per
cache (once per ``generate`` call) and reused at every step.
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import LlamaConfig


class KVCache:
    """Keys and values ``[B, max_len, Hkv, D]`` per layer, the filled length of each row, and the prefix K/V of
    each adapted layer.

    Args:
        config: the model's configuration (layers, kv heads, head dim).
        batch: rows.
        max_len: the longest sequence (prompt plus generated tokens) a row may reach.
        dtype, device: of the buffers (the model's).
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"a KV cache needs batch > 0 and max_len > 0, got batch {batch}, max_len {max_len}")
        shape = (batch, max_len, config.n_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.lengths: list[int] = [0] * batch
        self._prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]

    def prefix_kv(self, layer: int, project: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix K/V of ``layer``: ``project()`` on the first call, the stored result afterwards."""
        if layer not in self._prefix:
            self._prefix[layer] = project()
        return self._prefix[layer]

    def reserve(self, new_lengths: list[int]) -> None:
        """Check that every row can grow to ``new_lengths`` (raises before any buffer is written)."""
        if len(new_lengths) != self.batch:
            raise ValueError(f"the KV cache has {self.batch} rows, got {len(new_lengths)} lengths")
        longest = max(new_lengths)
        if longest > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions per row, a row would reach {longest}")

    def advance(self, new_lengths: list[int]) -> None:
        """Record the rows' lengths once every layer has written its keys and values."""
        self.reserve(new_lengths)
        self.lengths = list(new_lengths)
