"""``KVCache``: the keys and values of past tokens during generation, one padded buffer per layer, per-row lengths.

Rows may hold different lengths (prompts of different lengths are not padded to each other): each row's tokens
sit at the start of its row of the buffer, and the attention of every step reads the whole batch in one call, each
row up to its own length (zero_init_attention's ``seqused_k``). Where the keys and values of a call go is worked
out once per model call (:meth:`KVCache.plan_packed`, :meth:`KVCache.plan_append`) and shared by every layer.
Each adapted layer's prefix keys and values are projected once per cache (once per ``generate`` call) and reused
at every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import LlamaConfig


@dataclass(frozen=True)
class CacheStep:
    """Where one model call writes its keys and values, and what its attention reads.

    Attributes:
        rows, slots: int64 ``[T]``: token t of the call (flattened ``[B, s]``, or packed ``[T]``) is stored at
            ``keys[rows[t], slots[t]]``.
        key_len: the buffer prefix ``[:, :key_len]`` that holds every row's keys after the write.
        seqused_k: int32 ``[B]``: the keys row b holds after the write; None when every row holds ``key_len``
            (the attention then needs no per-row length).
        new_lengths: every row's length once the call is done.
    """

    rows: torch.Tensor
    slots: torch.Tensor
    key_len: int
    seqused_k: Optional[torch.Tensor]
    new_lengths: list[int]


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

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def prefix_kv(self, layer: int, project: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix K/V of ``layer`` (``[1 or B, P, Hkv, D]``): ``project()`` on the first call, the stored
        result afterwards."""
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

    def plan_packed(self, lengths: list[int]) -> CacheStep:
        """The step of a packed call that fills the empty rows: sequence n (``lengths[n]`` tokens, back to back)
        goes to the start of row n."""
        if len(lengths) != self.batch or any(self.lengths):
            raise ValueError(f"a packed call fills an empty KV cache with one row per sequence: the cache has "
                             f"{self.batch} rows of lengths {self.lengths}, the call packs {len(lengths)} sequences")
        self.reserve(lengths)
        counts = torch.tensor(lengths, device=self.device)
        total = sum(lengths)
        rows = torch.repeat_interleave(torch.arange(self.batch, device=self.device), counts, output_size=total)
        starts = torch.cumsum(counts, 0) - counts
        slots = torch.arange(total, device=self.device) - torch.repeat_interleave(starts, counts, output_size=total)
        return self._step(rows, slots, list(lengths))

    def plan_append(self, seqlen: int) -> CacheStep:
        """The step of a batched call ``[B, seqlen]``: row b's tokens go right after its ``lengths[b]``."""
        new_lengths = [length + seqlen for length in self.lengths]
        self.reserve(new_lengths)
        rows = torch.arange(self.batch, device=self.device).repeat_interleave(seqlen)
        offsets = torch.tensor(self.lengths, device=self.device)
        slots = (offsets[:, None] + torch.arange(seqlen, device=self.device)).reshape(-1)
        return self._step(rows, slots, new_lengths)

    def _step(self, rows: torch.Tensor, slots: torch.Tensor, new_lengths: list[int]) -> CacheStep:
        key_len = max(new_lengths)
        uniform = all(length == key_len for length in new_lengths)
        seqused_k = None if uniform else torch.tensor(new_lengths, dtype=torch.int32, device=self.device)
        return CacheStep(rows=rows, slots=slots, key_len=key_len, seqused_k=seqused_k, new_lengths=new_lengths)

    def write(self, layer: int, step: CacheStep, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [T, Hkv, D]`` (the call's tokens in ``step``'s order) in ``layer``'s buffers."""
        self.keys[layer].index_put_((step.rows, step.slots), k)
        self.values[layer].index_put_((step.rows, step.slots), v)

    def read(self, layer: int, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys, values [B, key_len, Hkv, D]`` of ``layer`` (views of the buffers); row b's first
        ``step.seqused_k[b]`` positions are its keys."""
        return self.keys[layer][:, :step.key_len], self.values[layer][:, :step.key_len]

    def advance(self, new_lengths: list[int]) -> None:
        """Record the rows' lengths once every layer has written its keys and values."""
        self.reserve(new_lengths)
        self.lengths = list(new_lengths)
