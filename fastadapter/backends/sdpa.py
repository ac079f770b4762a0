"""The ``sdpa`` backend: the exact composition of two ``scaled_dot_product_attention`` calls.

    out = sdpa(q, k, v, causal) + γ · sdpa(q, prefix_k, prefix_v)

This is what litgpt and LLaMA-Adapter V2 run, and the fallback on any device: PyTorch picks its own fused
kernel for each call, and autograd differentiates the composition. It also runs the op's masked mode (an explicit
``attn_mask`` in place of the causal rule).

A row's output depends only on the keys and values it sees (the contract): keys and values past ``seqused_k``
are zeroed before SDPA reads them, and a non-finite value hidden from a row by the causal rule (SDPA multiplies
it by a probability 0, which gives NaN) is kept out of that row by :func:`_seen_values_only`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.problem import AttentionProblem
from .registry import Backend, register_backend


def _last_seen_key(seqlen_q: int, seqlen_k: int, causal: bool, used: Optional[torch.Tensor], device):
    """int64 ``[B or 1, 1, Sq, 1]``: the last key each query sees (keys ``0..e`` are seen; ``-1``: none)."""
    row = torch.arange(seqlen_q, device=device)[None, None, :, None]
    used = torch.tensor(seqlen_k, device=device).reshape(1, 1, 1, 1) if used is None else used
    last = used - 1
    return torch.minimum(last, row + used - seqlen_q) if causal else last.expand(-1, -1, seqlen_q, -1)


def _seen_values_only(out: torch.Tensor, vh: torch.Tensor, last_seen: torch.Tensor) -> torch.Tensor:
    """``out [B, Hq, Sq, D]`` with NaN exactly where a row sees a non-finite value of ``vh [B, Hkv, Sk, D]``
    (the keys a row sees are a prefix: ``0..last_seen``), given that ``out`` was computed from finite values."""
    bad = (~vh.isfinite()).to(torch.int32).cumsum(dim=2)  # [B, Hkv, Sk, D]: non-finite values among keys 0..j
    index = last_seen.clamp(min=0).expand(bad.shape[0], bad.shape[1], -1, bad.shape[3])
    seen_bad = (bad.gather(2, index) > 0) & (last_seen >= 0)  # [B, Hkv, Sq, D]
    return out.masked_fill(seen_bad.repeat_interleave(out.shape[1] // vh.shape[1], dim=1), float("nan"))


def _word_attention(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, causal: bool, scale: float,
                    seqused_k: Optional[torch.Tensor] = None):
    """softmax(scale · q kᵀ) v over ``[B, H, S, D]`` tensors, causal bottom-right aligned; row b sees only its
    first ``seqused_k[b]`` keys when given. Rows that see no key give 0."""
    seqlen_q, seqlen_k = qh.shape[2], kh.shape[2]
    if seqlen_k == 0:  # no key (an empty ragged sequence): the word part is 0, still part of q's graph
        return qh.new_zeros(qh.shape[:3] + (vh.shape[-1],)) + qh[..., :0].sum(dim=-1, keepdim=True)
    used = None if seqused_k is None else seqused_k.long()[:, None, None, None]  # [B, 1, 1, 1]
    if used is not None:
        # Unused cache slots hold anything (torch.empty): zero them, so that SDPA's products never meet them.
        unused = torch.arange(seqlen_k, device=qh.device)[None, None, :, None] >= used
        kh, vh = kh.masked_fill(unused, 0.0), vh.masked_fill(unused, 0.0)
    if not causal and used is None:  # every row sees every value: nothing to keep out
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)
    last_seen = _last_seen_key(seqlen_q, seqlen_k, causal, used, qh.device)  # [B or 1, 1, Sq, 1]
    finite_v = torch.where(vh.isfinite(), vh, torch.zeros_like(vh))
    if used is None:
        out = _causal(qh, kh, finite_v, scale)
    else:
        col = torch.arange(seqlen_k, device=qh.device)[None, None, None, :]
        allowed = col <= last_seen  # [B, 1, Sq, Sk]
        blind = last_seen < 0
        # A fully masked row would be NaN (forward and backward): let it see key 0, then zero it.
        out = F.scaled_dot_product_attention(qh, kh, finite_v, attn_mask=allowed | (blind & (col == 0)),
                                             scale=scale, enable_gqa=True).masked_fill(blind, 0.0)
    return _seen_values_only(out, vh, last_seen)


def _causal(qh, kh, vh, scale: float):
    """Causal softmax(scale · q kᵀ) v over ``[B, H, S, D]`` tensors, bottom-right aligned, through SDPA's own
    causal kernels (which never compute the hidden scores)."""
    seqlen_q, seqlen_k = qh.shape[2], kh.shape[2]
    if seqlen_q == seqlen_k:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    if seqlen_q < seqlen_k:
        # Imported here, not at the top: torch.nn.attention.bias imports torch._dynamo (and Triton where installed),
        # which made `import fastadapter` take 1.2 s more.
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(seqlen_q, seqlen_k)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    # Sq > Sk: the first Sq − Sk queries see no word at all and give 0 (DESIGN.md §1).
    blind = seqlen_q - seqlen_k
    seen = F.scaled_dot_product_attention(qh[:, :, blind:], kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    return torch.cat([seen.new_zeros(seen.shape[:2] + (blind, seen.shape[3])), seen], dim=2)


def _masked_words(qh, kh, vh, attn_mask: torch.Tensor, scale: float):
    """softmax(scale · q kᵀ + mask) v over ``[B, H, S, D]`` tensors under an explicit mask (bool: True = may
    attend, a row that allows no key gives 0; float: added to the scores)."""
    if attn_mask.dtype != torch.bool:
        mask = attn_mask if attn_mask.dtype == qh.dtype else attn_mask.to(qh.dtype)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale, enable_gqa=True)


def sdpa_composition(q, k, v, prefix_k, prefix_v, gate_rows, causal: bool, scale: float, gate_tanh: bool,
                     seqused_k: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None):
    """One batch: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``prefix_* [Bp, P, Hkv, D]``,
    ``gate_rows`` fp32 ``[Bg, Hq]``, optionally ``seqused_k`` int32 ``[B]`` (row b reads only its first
    ``seqused_k[b]`` keys) or ``attn_mask`` (in place of the causal rule); returns ``[B, Sq, Hq, D]`` (a
    transposed view)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if attn_mask is not None:
        out = _masked_words(qh, kh, vh, attn_mask, scale)
    else:
        out = _word_attention(qh, kh, vh, causal, scale, seqused_k)
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
    """Two SDPA calls per batch (per sequence in varlen mode; a boolean mask for ``seqused_k``, causal steps
    and explicit masks)."""

    name = "sdpa"
    fused = False

    def attention(self, inp: AttentionProblem) -> torch.Tensor:
        args = (inp.causal, inp.softmax_scale, inp.gate_tanh)
        if not inp.varlen:
            return sdpa_composition(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate, *args,
                                    seqused_k=inp.seqused_k, attn_mask=inp.attn_mask)
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
