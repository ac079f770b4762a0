"""The readable reference of zero-init attention: the oracle of every test (DESIGN.md §1).

Plain PyTorch, one line per formula, materialising the full score matrices: slow and memory-hungry on purpose,
so that it is obviously right. Differentiable through autograd, which gives the reference gradients.

    S_w = scale · q kᵀ   (causal: query i sees keys j ≤ i + Sk − Sq, per sequence; keys past seqused_k unseen)
    S_p = scale · q prefix_kᵀ
    out = softmax(S_w) v  +  γ · softmax(S_p) prefix_v,   γ = tanh(gate) or gate

Non-finite inputs propagate, as in PyTorch's attention, and every backend follows this (tests/
test_nonfinite_inputs.py): an output row is NaN when its query, a key it sees, its sequence's prefix or its gate
holds a NaN (an infinity gives NaN or hides a key, as the softmax makes of it). The only rows set to 0 are those
that see no key at all (causal with Sq > Sk); a NaN never crosses from one packed sequence into another.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kernels.problem import AttentionProblem


def _visible_keys(batch_rows: int, seqlen_q: int, seqlen_k: int, causal: bool, seqused_k, attn_mask, device):
    """bool ``[B or 1, 1 or H, Sq, Sk]``: which key each query sees; None when every query sees every key."""
    if attn_mask is not None:
        return attn_mask if attn_mask.dtype == torch.bool else None  # an additive mask is added to the scores
    row = torch.arange(seqlen_q, device=device)[:, None]
    col = torch.arange(seqlen_k, device=device)[None, :]
    if seqused_k is not None:
        used = seqused_k.long()[:, None, None, None]  # [B, 1, 1, 1]: each row's own key count
        visible = col < used  # [B, 1, 1, Sk]
        return visible & (col <= row + used - seqlen_q) if causal else visible  # [B, 1, Sq, Sk]
    return col <= row + seqlen_k - seqlen_q if causal else None  # [Sq, Sk]


def _seen_values(probs: torch.Tensor, vh: torch.Tensor, visible: Optional[torch.Tensor]) -> torch.Tensor:
    """``probs @ vh`` where a row sums only the values it sees: a non-finite value hidden from a row (probability
    0) stays out of it (``0 · NaN`` would be NaN), and reaches exactly the rows that see it."""
    if visible is None:
        return probs @ vh
    finite = vh.isfinite()
    clean = probs @ torch.where(finite, vh, torch.zeros_like(vh))
    seen_nonfinite = (visible.to(vh.dtype) @ (~finite).to(vh.dtype)) > 0  # [B, H, Sq, D]
    return torch.where(seen_nonfinite, probs @ vh, clean)


def _batched_reference(q, k, v, prefix_k, prefix_v, gate_rows, causal: bool, scale: float, gate_tanh: bool,
                       compute_dtype: torch.dtype, seqused_k: Optional[torch.Tensor] = None,
                       attn_mask: Optional[torch.Tensor] = None):
    """out ``[B, Sq, Hq, D]`` and the log-sum-exps ``lse_w, lse_p [B, Hq, Sq]`` (fp32) of one batch; row b sees
    only its first ``seqused_k[b]`` keys when ``seqused_k`` (int32 ``[B]``) is given; ``attn_mask`` (bool or
    additive ``[B or 1, 1 or Hq, Sq, Sk]``) replaces the causal rule."""
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    # [B, H, S, D], kv heads repeated so that query head h reads kv head h // group.
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    pkh = prefix_k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    pvh = prefix_v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    if seqused_k is not None:
        # Keys past a row's seqused_k are not part of its sequence (unused cache slots): they hold anything.
        unused = torch.arange(seqlen_k, device=q.device)[None, None, :, None] >= seqused_k.long()[:, None, None, None]
        kh, vh = kh.masked_fill(unused, 0.0), vh.masked_fill(unused, 0.0)

    # -- words: causal softmax, bottom-right aligned (or the explicit mask)
    scores_w = scale * (qh @ kh.transpose(-1, -2))  # [B, H, Sq, Sk]
    visible = _visible_keys(batch, seqlen_q, seqlen_k, causal, seqused_k, attn_mask, q.device)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores_w = scores_w + attn_mask.to(compute_dtype)
    if visible is not None:
        scores_w = scores_w.masked_fill(~visible, float("-inf"))
    lse_w = torch.logsumexp(scores_w.float(), dim=-1)  # [B, H, Sq]
    probs_w = torch.softmax(scores_w, dim=-1)
    if visible is not None:
        # A row with no visible key (the first Sq − Sk queries) gives 0. Only those rows are zeroed: a NaN of
        # the inputs (in q, or in a visible key) stays NaN, as in PyTorch's attention (DESIGN.md §1).
        probs_w = probs_w.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    out_w = _seen_values(probs_w, vh, visible)

    # -- prefix: its own softmax, never masked, scaled by the gate
    if prefix_k.shape[1] > 0:
        scores_p = scale * (qh @ pkh.transpose(-1, -2))  # [B, H, Sq, P]
        lse_p = torch.logsumexp(scores_p.float(), dim=-1)
        out_p = torch.softmax(scores_p, dim=-1) @ pvh
        gamma = torch.tanh(gate_rows) if gate_tanh else gate_rows  # [Bg, H]
        out_w = out_w + gamma.to(compute_dtype)[:, :, None, None] * out_p
    else:
        lse_p = torch.full_like(lse_w, float("-inf"))
    return out_w.transpose(1, 2), lse_w, lse_p


def reference_attention(inp: AttentionProblem, *, upcast: bool = True, return_lse: bool = False):
    """Reference attention of already validated inputs (see :func:`zero_init_attention_reference`)."""
    compute_dtype = torch.float32 if upcast else inp.dtype
    args = (inp.causal, inp.softmax_scale, inp.gate_tanh, compute_dtype)
    if not inp.varlen:
        out, lse_w, lse_p = _batched_reference(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate, *args,
                                               seqused_k=inp.seqused_k, attn_mask=inp.attn_mask)
    else:
        # One sequence at a time: a sequence never sees another one.
        outs, lses_w, lses_p = [], [], []
        bounds_q, bounds_k = inp.cu_seqlens_q.tolist(), inp.cu_seqlens_k.tolist()
        used = inp.seqused_k.tolist() if inp.seqused_k is not None else None
        for i in range(len(bounds_q) - 1):
            q_lo, q_hi = bounds_q[i], bounds_q[i + 1]
            k_lo, k_hi = bounds_k[i], bounds_k[i + 1] if used is None else bounds_k[i] + used[i]
            pick = (lambda t: t[i:i + 1] if t.shape[0] > 1 else t)
            o, lw, lp = _batched_reference(inp.q[None, q_lo:q_hi], inp.k[None, k_lo:k_hi], inp.v[None, k_lo:k_hi],
                                           pick(inp.prefix_k), pick(inp.prefix_v), pick(inp.gate), *args)
            outs.append(o[0])
            lses_w.append(lw[0])
            lses_p.append(lp[0])
        # Tokens after the last sequence (cu_seqlens_q[-1] < Tq) belong to none: 0 output, -inf log-sum-exps.
        tail = inp.q.shape[0] - bounds_q[-1]
        outs.append(outs[0].new_zeros((tail,) + outs[0].shape[1:]))
        lses_w.append(lses_w[0].new_full((lses_w[0].shape[0], tail), float("-inf")))
        lses_p.append(lses_p[0].new_full((lses_p[0].shape[0], tail), float("-inf")))
        out = torch.cat(outs, dim=0)
        lse_w, lse_p = torch.cat(lses_w, dim=-1), torch.cat(lses_p, dim=-1)
    out = out.to(inp.dtype) if not upcast else out
    return (out, lse_w, lse_p) if return_lse else out


def zero_init_attention_reference(q, k, v, prefix_k, prefix_v, gate, *, causal: bool = True,
                                  softmax_scale: Optional[float] = None, gate_activation: str = "tanh",
                                  cu_seqlens_q: Optional[torch.Tensor] = None,
                                  cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                                  max_seqlen_k: Optional[int] = None, seqused_k: Optional[torch.Tensor] = None,
                                  attn_mask: Optional[torch.Tensor] = None, upcast: bool = True,
                                  return_lse: bool = False):
    """Zero-init attention computed the obvious way: the oracle of both entry points.

    Dense as :func:`fastadapter.zero_init_attention`; with ``cu_seqlens_q`` (and ``cu_seqlens_k``,
    ``max_seqlen_q``, ``max_seqlen_k``), varlen as :func:`fastadapter.zero_init_attention_varlen`.

    Args:
        q: ``[B, Sq, Hq, D]`` (or ``[Tq, Hq, D]`` varlen).
        k, v: ``[B, Sk, Hkv, D]`` (or ``[Tk, Hkv, D]``).
        prefix_k, prefix_v: ``[1 or B, P, Hkv, D]``.
        gate: ``[Hq]``, ``[1]`` or ``[B, Hq]``, the raw gate.
        causal, softmax_scale, gate_activation, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            seqused_k, attn_mask: as the op.
        upcast: compute in fp32 and return fp32 (the oracle). ``False`` computes in the inputs' dtype, which is
            what "plain PyTorch in that dtype" means in the tests' tolerances.
        return_lse: also return the fp32 log-sum-exps ``lse_w, lse_p`` (``[B, Hq, Sq]``, or ``[Hq, Tq]``).

    Returns:
        ``out`` with q's shape (fp32 when ``upcast``), or ``(out, lse_w, lse_p)``.
    """
    options = dict(causal=causal, softmax_scale=softmax_scale, gate_activation=gate_activation,
                   seqused_k=seqused_k)
    if cu_seqlens_q is None and cu_seqlens_k is None:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q and max_seqlen_k are only meaningful with cu_seqlens_q and "
                             "cu_seqlens_k (varlen)")
        problem = AttentionProblem.from_dense(q, k, v, prefix_k, prefix_v, gate, attn_mask=attn_mask, **options)
    else:
        if attn_mask is not None:
            raise ValueError("attn_mask is a mode of dense calls only")
        problem = AttentionProblem.from_varlen(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, **options)
    return reference_attention(problem, upcast=upcast, return_lse=return_lse)
