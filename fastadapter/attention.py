"""The public op, as two entry points (as ``flash_attn_func`` and ``flash_attn_varlen_func``):
:func:`zero_init_attention` for dense batches and :func:`zero_init_attention_varlen` for packed sequences.

Both validate their inputs once into an :class:`~fastadapter.kernels.problem.AttentionProblem`, choose a backend
for it, and hand the backend that same object (DESIGN.md §1).
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import select_backend
from .kernels.problem import AttentionProblem


def zero_init_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                        prefix_v: torch.Tensor, gate: torch.Tensor, *, causal: bool = True,
                        softmax_scale: Optional[float] = None, gate_activation: str = "tanh",
                        seqused_k: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                        backend: Optional[str] = None) -> torch.Tensor:
    """LLaMA-Adapter's zero-init attention over a dense batch: causal attention over the words plus a gated,
    separately softmaxed attention over a learnable prefix.

        out = softmax(scale · q kᵀ + causal mask) v  +  γ · softmax(scale · q prefix_kᵀ) prefix_v
        γ = tanh(gate) ("tanh") or gate ("none")

    Causal is bottom-right aligned: query i sees key j iff ``j <= i + Sk - Sq`` (decoding with a cache when
    ``Sq < Sk``). A row's output depends only on the keys and values it sees.

    Args:
        q: ``[B, Sq, Hq, D]``, RoPE already applied.
        k, v: ``[B, Sk, Hkv, D]``, ``Hq % Hkv == 0`` (GQA/MQA).
        prefix_k, prefix_v: ``[Bp, P, Hkv, D]``, ``Bp`` 1 (one prompt for the batch) or B (one per sample);
            ``P`` may be 0 (plain attention). Never masked, no RoPE.
        gate: the raw gate, ``[Hq]``, ``[1]`` or ``[B, Hq]`` (one row per sample); any float dtype.
        causal: mask future words (a bool).
        softmax_scale: a positive finite number; defaults to ``1 / sqrt(D)``.
        gate_activation: ``"tanh"`` (the original training code) or ``"none"`` (PEFT, litgpt).
        seqused_k: int32 ``[B]``, contiguous: row b uses only its first ``seqused_k[b]`` keys (a padded KV cache
            read up to each row's length); the rest are never read, whatever they hold, and get zero gradients.
        attn_mask: bool (True = may attend) or additive float ``[B or 1, 1 or Hq, Sq, Sk]`` in place of the
            causal rule (pass ``causal=False``): the word part follows the mask (a bool row that allows no key
            gives 0), the prefix stays unmasked. Run by the composition backends (``sdpa``, ``reference``).
        backend: ``None`` chooses automatically (``FASTADAPTER_BACKEND`` overrides), or one of ``"triton"``,
            ``"cpu"``, ``"sdpa"``, ``"reference"``; an explicit backend that cannot run the inputs raises.

    Returns:
        ``[B, Sq, Hq, D]`` in q's dtype. The word part of rows that see no key is 0.

    Raises:
        TypeError, ValueError: inputs outside the contract, with what was wrong and what was expected.
    """
    problem = AttentionProblem.from_dense(q, k, v, prefix_k, prefix_v, gate, causal=causal,
                                          softmax_scale=softmax_scale, gate_activation=gate_activation,
                                          seqused_k=seqused_k, attn_mask=attn_mask)
    return select_backend(problem, backend).attention(problem)


def zero_init_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                               prefix_v: torch.Tensor, gate: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                               seqused_k: Optional[torch.Tensor] = None, causal: bool = True,
                               softmax_scale: Optional[float] = None, gate_activation: str = "tanh",
                               backend: Optional[str] = None) -> torch.Tensor:
    """Zero-init attention over N sequences packed along the first dimension (as ``flash_attn_varlen_func``):
    packed training, prefill, a decode step over packed caches, cross-lengths. Sequence b's queries attend only
    to its own keys; per sequence with ``Sq_b`` queries and ``Sk_b`` keys, causal is bottom-right aligned: query
    i sees key j iff ``j <= i + Sk_b - Sq_b``. A row's output depends only on the keys and values it sees.

    Args:
        q: ``[Tq, Hq, D]``: the queries of the N sequences, back to back.
        k, v: ``[Tk, Hkv, D]``: their keys and values, back to back, ``Hq % Hkv == 0``.
        prefix_k, prefix_v: ``[Bp, P, Hkv, D]``, ``Bp`` 1 or N (one prompt per sequence); ``P`` may be 0.
        gate: the raw gate, ``[Hq]``, ``[1]`` or ``[N, Hq]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[N+1]``, contiguous: sequence b's queries are
            ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``, its keys ``k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]``. Each starts
            at 0, never decreases and ends at most at its token count (tokens after it belong to no sequence:
            their output is 0, and they are never read). Pass one tensor for both when q and k share their
            offsets (packed self-attention, ``Tq == Tk``). Checked once for every backend (one small host sync).
        max_seqlen_q, max_seqlen_k: the longest query and key sequence: at least the longest, at most the tokens
            of q (k); the same when the offsets are shared.
        seqused_k: int32 ``[N]``: sequence b uses only its first ``seqused_k[b]`` keys (at most the keys it
            holds); the rest are never read and get zero gradients.
        causal, softmax_scale, gate_activation, backend: as :func:`zero_init_attention`.

    Returns:
        ``[Tq, Hq, D]`` in q's dtype.

    Raises:
        TypeError, ValueError: inputs outside the contract, with what was wrong and what was expected.
    """
    problem = AttentionProblem.from_varlen(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, causal=causal, softmax_scale=softmax_scale,
                                           gate_activation=gate_activation, seqused_k=seqused_k)
    return select_backend(problem, backend).attention(problem)
