"""The ``sdpa`` backend: the exact composition of two ``scaled_dot_product_attention`` calls.

    out = sdpa(q, k, v, causal) + γ · sdpa(q, prefix_k, prefix_v)

This is what litgpt and LLaMA-Adapter V2 run, and the fallback on any device: PyTorch picks its own fused
kernel for each call, and autograd differentiates the composition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .._inputs import AttentionInputs
from . import Backend, register_backend


def _word_attention(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, causal: bool, scale: float):
    """softmax(scale · q kᵀ) v over ``[B, H, S, D]`` tensors, causal bottom-right aligned."""
    seqlen_q, seqlen_k = qh.shape[2], kh.shape[2]
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


def sdpa_composition(q, k, v, prefix_k, prefix_v, gate_rows, causal: bool, scale: float, gate_tanh: bool):
    """One batch: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``prefix_* [Bp, P, Hkv, D]``,
    ``gate_rows`` fp32 ``[Bg, Hq]``; returns ``[B, Sq, Hq, D]`` (a transposed view)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
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
    """Two SDPA calls per batch (per sequence in varlen mode); memory as PyTorch's own SDPA kernels."""

    name = "sdpa"
    fused = False

    def attention(self, inp: AttentionInputs) -> torch.Tensor:
        args = (inp.causal, inp.softmax_scale, inp.gate_tanh)
        if not inp.varlen:
            return sdpa_composition(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate, *args)
        bounds = inp.cu_seqlens.tolist()
        outs = []
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            pick = (lambda t: t[i:i + 1] if t.shape[0] > 1 else t)
            outs.append(sdpa_composition(inp.q[None, lo:hi], inp.k[None, lo:hi], inp.v[None, lo:hi],
                                         pick(inp.prefix_k), pick(inp.prefix_v), pick(inp.gate), *args)[0])
        tail = inp.q.shape[0] - bounds[-1]  # tokens after the last sequence belong to none: 0
        outs.append(outs[0].new_zeros((tail,) + outs[0].shape[1:]))
        return torch.cat(outs, dim=0)


register_backend(SdpaBackend())
