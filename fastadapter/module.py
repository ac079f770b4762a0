"""``ZeroInitAttention``: the op as an ``nn.Module`` that owns its zero-initialised gate."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import zero_init_attention, zero_init_attention_varlen


class ZeroInitAttention(nn.Module):
    """Zero-init attention with a learnable gate, initialised to zero (the model starts as the base model).

    Args:
        num_heads: query heads ``Hq``.
        gate_per_head: one gate per head (``[Hq]``, the paper) or one scalar (``[1]``, PEFT).
        gate_activation: ``"tanh"`` or ``"none"``.
        causal, softmax_scale, backend: as :func:`fastadapter.zero_init_attention`.

    ``forward(q, k, v, prefix_k, prefix_v, seqused_k=None)`` takes the shapes of
    :func:`fastadapter.zero_init_attention`; ``forward_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None)`` those of
    :func:`fastadapter.zero_init_attention_varlen`. Both return q's shape.
    """

    def __init__(self, num_heads: int, *, gate_per_head: bool = True, gate_activation: str = "tanh",
                 causal: bool = True, softmax_scale: Optional[float] = None, backend: Optional[str] = None):
        super().__init__()
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        if gate_activation not in ("tanh", "none"):
            raise ValueError(f"gate_activation must be 'tanh' or 'none', got {gate_activation!r}")
        self.num_heads = num_heads
        self.gate_activation = gate_activation
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.backend = backend
        self.gate = nn.Parameter(torch.zeros(num_heads if gate_per_head else 1))

    def _options(self) -> dict:
        return dict(causal=self.causal, softmax_scale=self.softmax_scale, gate_activation=self.gate_activation,
                    backend=self.backend)

    def forward(self, q, k, v, prefix_k, prefix_v, seqused_k=None) -> torch.Tensor:
        """``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``prefix_* [Bp, P, Hkv, D]`` → ``[B, Sq, Hq, D]``."""
        return zero_init_attention(q, k, v, prefix_k, prefix_v, self.gate, seqused_k=seqused_k, **self._options())

    def forward_varlen(self, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       seqused_k=None) -> torch.Tensor:
        """``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` packed with their offsets → ``[Tq, Hq, D]``."""
        return zero_init_attention_varlen(q, k, v, prefix_k, prefix_v, self.gate, cu_seqlens_q, cu_seqlens_k,
                                          max_seqlen_q, max_seqlen_k, seqused_k=seqused_k, **self._options())

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, gate={tuple(self.gate.shape)}, "
                f"gate_activation={self.gate_activation!r}, causal={self.causal}")
