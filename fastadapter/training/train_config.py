"""The settings of a training run (:class:`TrainConfig`, the ``fastadapter train`` flags as the library takes
them) and how it ended (:class:`TrainResult`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of a run (the ``fastadapter train`` flags).

    Attributes:
        out: the run folder: ``metrics.jsonl``, ``checkpoints/``, ``adapter.safetensors``.
        batch_tokens: capacity of one packed row (one micro-batch of one rank).
        grad_accum: micro-batches per rank per optimizer step.
        max_steps: optimizer steps of the run; None: ``epochs`` passes over the training data.
        epochs: passes over the training data when ``max_steps`` is None.
        lr: peak learning rate; warmup_steps: linear warmup; min_lr_ratio: the cosine's floor, times ``lr``.
        weight_decay: AdamW decay of the prompts (gates, 1-D, are not decayed, as the original code).
        grad_clip: max global gradient norm (0: no clipping).
        dtype: ``fp32``, ``bf16`` or ``fp16`` autocast (adapter parameters and optimizer state stay fp32).
        eval_every: evaluate every this many steps (and at step 0 and at the end); 0: only at 0 and the end.
        save_every: checkpoint every this many steps (and at the end); 0: only at the end or on a signal.
        keep_checkpoints: newest checkpoints kept (0: all).
        seed: shuffling of each epoch.
        progress: show a tqdm progress bar (rank 0).
        return_memory_to_os: on the CPU, make the C library give each step's large freed buffers back to the
            system (:mod:`fastadapter.training.host_memory`): a lower peak RSS (SmolLM2-135M: 0.86x) for a slower
            step (0.7x: every buffer is faulted in afresh); process-wide, and off by default.
        fingerprint: what the examples and the adapter were made from, as JSON-like values (``fastadapter
            train``: ``data``, ``max_seq_len``, ``eval_fraction``, ``on_bad_row``, ``prompt_len``,
            ``adapter_layers``, ``gate_activation``); saved in checkpoints, and a resume whose fingerprint
            differs in a key both record is refused. A dict value with a ``path`` describes a file (see
            :func:`fastadapter.training.data.file_fingerprint`): it is compared without its path, so a moved
            data file still matches.
    """

    out: str
    batch_tokens: int = 4096
    grad_accum: int = 1
    max_steps: Optional[int] = None
    epochs: int = 1
    lr: float = 2e-2
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    dtype: str = "fp32"
    eval_every: int = 20
    save_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    progress: bool = True
    return_memory_to_os: bool = False
    fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("batch_tokens", "grad_accum", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, grad_clip >= 0, weight_decay >= 0; got lr={self.lr}, "
                             f"warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip}, "
                             f"weight_decay={self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1] (the cosine's floor as a fraction of lr), got "
                             f"{self.min_lr_ratio}")
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainResult:
    """How a run ended: ``steps`` taken, the last training ``loss``, the first and last ``eval_loss``, and the
    signal that interrupted it (None when it ran to the end)."""

    steps: int
    loss: float
    initial_eval_loss: Optional[float]
    eval_loss: Optional[float]
    interrupted_by: Optional[int] = None
