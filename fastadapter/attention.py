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
                        max_seqlen: Optional[int] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                        cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                        max_seqlen_k: Optional[int] = None,
                        seqused_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLaMA-Adapter's zero-init attention: causal attention over the words plus a gated, separately
    softmaxed attention over a learnable prefix.

        out = softmax(scale · q kᵀ + causal mask) v  +  γ · softmax(scale · q prefix_kᵀ) prefix_v
        γ = tanh(gate) ("tanh") or gate ("none")

    Ragged batches run in one call, as ``flash_attn_varlen_func``: sequences packed along the first dimension with
    their own query and key offsets (prefill, a decode step over packed caches, cross-lengths), or a padded KV cache
    read up to each row's length (``seqused_k``). Per sequence b with ``Sq_b`` queries and ``Sk_b`` keys, causal is
    bottom-right aligned: query i sees key j iff ``j <= i + Sk_b - Sq_b``.

    Args:
        q: ``[B, Sq, Hq, D]``; varlen, packed ``[Tq, Hq, D]``. RoPE already applied.
        k, v: ``[B, Sk, Hkv, D]`` (varlen ``[Tk, Hkv, D]``), ``Hq % Hkv == 0`` (GQA/MQA).
        prefix_k, prefix_v: ``[Bp, P, Hkv, D]``, ``Bp`` 1 (one prompt for the batch) or B/N (one per sample);
            ``P`` may be 0 (plain attention). Never masked, no RoPE.
        gate: the raw gate, ``[Hq]``, ``[1]`` or ``[B, Hq]`` (one row per sample); any float dtype.
        causal: mask future words, bottom-right aligned per sequence (decoding with a cache when ``Sq < Sk``).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        gate_activation: ``"tanh"`` (the original training code) or ``"none"`` (PEFT, litgpt).
        backend: ``None`` chooses automatically (``FASTADAPTER_BACKEND`` overrides), or one of ``"triton"``,
            ``"cpu"``, ``"sdpa"``, ``"reference"``; an explicit backend that cannot run the inputs raises.
        cu_seqlens: int32 ``[N+1]``, contiguous: q, k, v are N sequences packed along the first dimension; each
            attends only to itself (self-attention, ``Sq == Sk`` per sequence). Prefix and gate rows are per
            sequence. It starts at 0, never decreases and ends at most at the token count T (tokens after it
            belong to no sequence and give 0); checked once for every backend (one small host sync).
        max_seqlen: at least the longest of the packed sequences (required with ``cu_seqlens``).
        cu_seqlens_q, cu_seqlens_k: int32 ``[N+1]`` each, contiguous: q holds N query sequences and k, v N key
            sequences, packed; sequence b's queries attend only to its keys (``Sq_b`` and ``Sk_b`` may differ,
            either may be 0). Checked as ``cu_seqlens`` (against Tq and Tk). Not with ``cu_seqlens``.
        max_seqlen_q, max_seqlen_k: at least the longest query and key sequence (required with them).
        seqused_k: int32 ``[B]`` (dense) or ``[N]`` (varlen): sequence b uses only its first ``seqused_k[b]``
            keys (at most the keys it holds); the rest are never read, and get zero gradients.

    Returns:
        ``[B, Sq, Hq, D]`` (or ``[Tq, Hq, D]``) in q's dtype. Query tokens past ``cu_seqlens_q[-1]`` and the word
        part of rows that see no key are 0.

    Raises:
        TypeError, ValueError: inputs outside the contract, with what was wrong and what was expected.
    """
    inp = validate_inputs(q, k, v, prefix_k, prefix_v, gate, causal=causal, softmax_scale=softmax_scale,
                          gate_activation=gate_activation, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                          cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, seqused_k=seqused_k)
    chosen = select_backend(inp, backend)
    if chosen.fused:
        return run_fused(inp, chosen.name)
    return chosen.attention(inp)
