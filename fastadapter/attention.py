"""``zero_init_attention``: the public op — validation, backend choice, autograd (DESIGN.md §1)."""
from __future__ import annotations

from typing import Optional

import torch

from ._fused_op import run_fused
from ._inputs import validate_inputs
from .backends import select_backend


def zero_init_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                        prefix_v: torch.Tensor, gate: torch.Tensor, *, causal: bool = True,
                        softmax_scale: Optional[float] = None, gate_activation: str = "tanh",
                        backend: Optional[str] = None, cu_seqlens: Optional[torch.Tensor] = None,
                        max_seqlen: Optional[int] = None) -> torch.Tensor:
    """LLaMA-Adapter's zero-init attention: causal attention over the words plus a gated, separately
    softmaxed attention over a learnable prefix.

        out = softmax(scale · q kᵀ + causal mask) v  +  γ · softmax(scale · q prefix_kᵀ) prefix_v
        γ = tanh(gate) ("tanh") or gate ("none")

    Args:
        q: ``[B, Sq, Hq, D]``; with ``cu_seqlens``, packed ``[T, Hq, D]``. RoPE already applied.
        k, v: ``[B, Sk, Hkv, D]`` (or ``[T, Hkv, D]``), ``Hq % Hkv == 0`` (GQA/MQA).
        prefix_k, prefix_v: ``[Bp, P, Hkv, D]``, ``Bp`` 1 (one prompt for the batch) or B (one per sample);
            ``P`` may be 0 (plain attention). Never masked, no RoPE.
        gate: the raw gate, ``[Hq]``, ``[1]`` or ``[B, Hq]`` (one row per sample); any float dtype.
        causal: mask future words; with ``Sq < Sk`` the mask is bottom-right aligned (decoding with a cache).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        gate_activation: ``"tanh"`` (the original training code) or ``"none"`` (PEFT, litgpt).
        backend: ``None`` chooses automatically (``FASTADAPTER_BACKEND`` overrides), or one of ``"triton"``,
            ``"cpu"``, ``"sdpa"``, ``"reference"``; an explicit backend that cannot run the inputs raises.
        cu_seqlens: int32 ``[N+1]``, contiguous: q, k, v are N sequences packed along the first dimension; each
            attends only to itself (self-attention, ``Sq == Sk`` per sequence). Prefix and gate rows are per
            sequence. It starts at 0, never decreases and ends at most at the token count T (tokens after it
            belong to no sequence and give 0); checked once for every backend (one small host sync).
        max_seqlen: at least the longest of the packed sequences (required with ``cu_seqlens``).

    Returns:
        ``[B, Sq, Hq, D]`` (or ``[T, Hq, D]``) in q's dtype.

    Raises:
        TypeError, ValueError: inputs outside the contract, with what was wrong and what was expected.
    """
    inp = validate_inputs(q, k, v, prefix_k, prefix_v, gate, causal=causal, softmax_scale=softmax_scale,
                          gate_activation=gate_activation, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    chosen = select_backend(inp, backend)
    if chosen.fused:
        return run_fused(inp, chosen.name)
    return chosen.attention(inp)
