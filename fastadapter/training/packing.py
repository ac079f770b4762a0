"""Sequence packing: examples laid back to back in rows of at most ``batch_tokens`` tokens, with no padding.

A packed row is one ``[1, T]`` token tensor plus ``cu_seqlens`` (int32 ``[N+1]``, the start of each example and
the end of the last) and ``max_seqlen``: zero_init_attention's varlen mode keeps every example attending only
to itself, and the model restarts RoPE positions at each start, so a packed row computes exactly what the N
examples would compute alone — without the padding tokens that batching examples of unequal length needs.

:func:`pad_examples` builds the padded batch instead (as the paper, which pads every example to 512, and PEFT
users, who pad to the longest of a batch), for comparisons and tests; :func:`padding_report` measures the waste.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..setting_error import SettingError
from .data import IGNORE_INDEX, Example


@dataclass
class PackedBatch:
    """N examples packed into one row.

    Attributes:
        tokens: int64 ``[1, T]``, the examples' tokens back to back.
        labels: int64 ``[1, T]``, their labels (:data:`IGNORE_INDEX` where no loss).
        cu_seqlens: int32 ``[N+1]``: example ``n`` is ``tokens[0, cu_seqlens[n]:cu_seqlens[n+1]]``.
        max_seqlen: the longest example.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.tokens.to(device), self.labels.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen)

    def extra_inputs(self) -> dict:
        """The keyword arguments the model takes besides the packed tokens: none for text (a batch with images,
        :class:`~fastadapter.training.image_data.ImagePackedBatch`, names its own)."""
        return {}


@dataclass
class PaddedBatch:
    """B examples padded to a common length S (right padding).

    Attributes:
        tokens: int64 ``[B, S]`` (``pad_id`` after each example).
        labels: int64 ``[B, S]`` (:data:`IGNORE_INDEX` on padding).
        lengths: the real length of each row.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    lengths: list[int]

    def extra_inputs(self) -> dict:
        """The keyword arguments the model takes besides the tokens: none."""
        return {}


def pack_examples(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group example indices into rows of at most ``batch_tokens`` tokens, in order: a row is closed when the
    next example does not fit. The order is kept so that shuffling before packing is all the randomness
    there is (and a resumed run sees the same rows).

    Args:
        lengths: the length of each example.
        batch_tokens: the capacity of a row; every example must fit in one.

    Returns:
        ``rows``: lists of indices into ``lengths``, every index once.
    """
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if length > batch_tokens:
            raise SettingError("example {index} has {length} tokens, more than batch_tokens={value}: raise "
                               "{batch_tokens} to at least {max_seq_len}", index=index, length=length,
                               value=batch_tokens)
        if used + length > batch_tokens and current:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        rows.append(current)
    return rows


def collate_packed(examples: Sequence[Example]) -> PackedBatch:
    """One :class:`PackedBatch` holding ``examples`` back to back."""
    if not examples:
        raise ValueError("cannot pack zero examples")
    lengths = [len(e) for e in examples]
    cu_seqlens = torch.zeros(len(examples) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    tokens = torch.tensor([t for e in examples for t in e.tokens], dtype=torch.int64)[None]
    labels = torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64)[None]
    return PackedBatch(tokens, labels, cu_seqlens, max(lengths))


def pad_examples(examples: Sequence[Example], pad_to: Optional[int] = None, pad_id: int = 0) -> PaddedBatch:
    """A :class:`PaddedBatch` of ``examples`` padded on the right to ``pad_to`` (default: the longest)."""
    if not examples:
        raise ValueError("cannot pad zero examples")
    lengths = [len(e) for e in examples]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({max(lengths)} tokens)")
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, example in enumerate(examples):
        tokens[row, :len(example)] = torch.tensor(example.tokens)
        labels[row, :len(example)] = torch.tensor(example.labels)
    return PaddedBatch(tokens, labels, lengths)


def padding_report(lengths: Sequence[int], *, max_seq_len: int, batch_size: int, batch_tokens: int) -> dict:
    """How many of the tokens a model computes are padding, three ways of batching the same examples.

    Args:
        lengths: example lengths, in training order.
        max_seq_len: the width every example is padded to in the paper's recipe.
        batch_size: examples per batch when padding to the longest of each batch.
        batch_tokens: the capacity of a packed row.

    Returns:
        ``real_tokens`` and, for ``pad_to_max_len``, ``pad_to_longest`` and ``packed``, the tokens computed and
        the padding fraction (``padding_fraction``); packed rows have no padding, ``packed_rows`` and
        ``packed_fill`` (real tokens / row capacity) say how full they are.
    """
    real = sum(lengths)
    to_max = len(lengths) * max_seq_len
    to_longest = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                     for i in range(0, len(lengths), batch_size))
    rows = pack_examples(lengths, batch_tokens)
    return {
        "examples": len(lengths), "real_tokens": real,
        "pad_to_max_len": {"tokens": to_max, "padding_fraction": 1 - real / to_max},
        "pad_to_longest": {"tokens": to_longest, "padding_fraction": 1 - real / to_longest},
        "packed": {"tokens": real, "padding_fraction": 0.0},
        "packed_rows": len(rows), "packed_fill": real / (len(rows) * batch_tokens),
    }
