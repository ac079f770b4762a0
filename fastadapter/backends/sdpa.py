"""The ``sdpa`` backend: the exact composition of two ``scaled_dot_product_attention`` calls.

    out = sdpa(q, k, v, causal) + γ · sdpa(q, prefix_k, prefix_v)

This is what litgpt and LLaMA-Adapter V2 run, and the fallback on any device: PyTorch picks its own fused
kernel for each call, and autograd differentiates the composition.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .._inputs import AttentionInputs
from . import Backend, register_backend


def _word_attention(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, causal: bool, scale: float):
    """softmax(scale · q kᵀ) v over ``[B, H, S, D]`` tensors, causal bottom-right aligned."""
    seqlen_q, seqlen_k = qh.shape[2], kh.shape[2]
    if seqlen_k == 0:  # no key (an empty ragged sequence): the word part is 0, still part of q's graph
        return qh.new_zeros(qh.shape[:3] + (vh.shape[-1],)) + qh[..., :0].sum(dim=-1, keepdim=True)
    if not causal:
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)
    if seqlen_q == seqlen_k:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    if seqlen_q < seqlen_k:
        mask = causal_lower_right(seqlen_q, seqlen_k)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    # Sq > Sk: the first Sq − Sk queries see no word at all and give 0 (DESIGN.md §1).
    blind = seqlen_q - seqlen_k
    seen = F.scaled_dot_product_attention(qh[:, :, blind:], kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    return torch.cat([seen.new_zeros(seen.shape[:2] + (blind, seen.shape[3])), seen], dim=2)


def _used_keys_attention(qh, kh, vh, seqused_k: torch.Tensor, causal: bool, scale: float):
    """softmax(scale · q kᵀ) v over ``[B, H, S, D]`` tensors where row b sees only its first ``seqused_k[b]``
    keys (causal bottom-right aligned on them); rows that see no key give 0."""
    seqlen_q, seqlen_k = qh.shape[2], kh.shape[2]
    used = seqused_k.long()[:, None, None, None]  # [B, 1, 1, 1]
    row = torch.arange(seqlen_q, device=qh.device)[:, None]
    col = torch.arange(seqlen_k, device=qh.device)[None, :]
    allowed = col < used
    if causal:
        allowed = allowed & (col <= row + used - seqlen_q)  # [B, 1, Sq, Sk]
    blind = ~allowed.any(dim=-1, keepdim=True)  # [B, 1, Sq, 1]
    if seqlen_k == 0:
        return _word_attention(qh, kh, vh, causal, scale)
    # A fully masked row would be NaN (forward and backward): let it see key 0, then zero it.
    allowed = allowed | (blind & (col == 0))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=True)
    return out.masked_fill(blind, 0.0)


def sdpa_composition(q, k, v, prefix_k, prefix_v, gate_rows, causal: bool, scale: float, gate_tanh: bool,
                     seqused_k: Optional[torch.Tensor] = None):
    """One batch: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``prefix_* [Bp, P, Hkv, D]``,
    ``gate_rows`` fp32 ``[Bg, Hq]``, optionally ``seqused_k`` int32 ``[B]`` (row b reads only its first
    ``seqused_k[b]`` keys); returns ``[B, Sq, Hq, D]`` (a transposed view)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if seqused_k is not None:
        out = _used_keys_attention(qh, kh, vh, seqused_k, causal, scale)
    else:
        out = _word_attention(qh, kh, vh, causal, scale)
    if prefix_k.shape[1] > 0:
        batch = q.shape[0]
        pkh = prefix_k.transpose(1, 2).expand(batch, -1, -1, -1)
        pvh = prefix_v.transpose(1, 2).expand(batch, -1, -1, -1)
        out_p = F.scaled_dot_product_attention(qh, pkh, pvh, scale=scale, enable_gqa=True)
        gamma = torch.tanh(gate_rows) if gate_tanh else gate_rows
        out = out + gamma.to(out.dtype)[:, :, None, None] * out_p
    return propagate_nonfinite_queries(out.transpose(1, 2), q)


def propagate_nonfinite_queries(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out [B, Sq, Hq, D]`` with NaN in every row whose query ``q [B, Sq, Hq, D]`` holds a NaN or an infinity.

    PyTorch's fused CPU SDPA kernel returns a finite row (often 0) for a NaN query, where its math path, the
    reference and the fused backends give NaN; adding ``0 · Σ q`` (NaN exactly for such rows, 0 elsewhere, no
    gradient) makes this backend follow the others."""
    return out + q.detach().sum(dim=-1, keepdim=True).mul(0).to(out.dtype)


class SdpaBackend(Backend):
    """Two SDPA calls per batch (per sequence in varlen mode; a boolean mask for ``seqused_k``); memory as
    PyTorch's own SDPA kernels."""

    name = "sdpa"
    fused = False

    def attention(self, inp: AttentionInputs) -> torch.Tensor:
        args = (inp.causal, inp.softmax_scale, inp.gate_tanh)
        if not inp.varlen:
            return sdpa_composition(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate, *args,
                                    seqused_k=inp.seqused_k)
        bounds_q, bounds_k = inp.cu_seqlens_q.tolist(), inp.cu_seqlens_k.tolist()
        used = inp.seqused_k.tolist() if inp.seqused_k is not None else None
        outs = []
        for i in range(len(bounds_q) - 1):
            q_lo, q_hi = bounds_q[i], bounds_q[i + 1]
            if q_hi == q_lo:  # a sequence of keys only (e.g. a row's left padding): nothing to compute
                continue
            k_lo, k_hi = bounds_k[i], bounds_k[i + 1] if used is None else bounds_k[i] + used[i]
            pick = (lambda t: t[i:i + 1] if t.shape[0] > 1 else t)
            outs.append(sdpa_composition(inp.q[None, q_lo:q_hi], inp.k[None, k_lo:k_hi], inp.v[None, k_lo:k_hi],
                                         pick(inp.prefix_k), pick(inp.prefix_v), pick(inp.gate), *args)[0])
        tail = inp.q.shape[0] - bounds_q[-1]  # tokens after the last sequence belong to none: 0
        outs.append(inp.q.new_zeros((tail,) + inp.q.shape[1:]) + inp.q[:0].sum())
        return torch.cat(outs, dim=0)


register_backend(SdpaBackend())
