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

from ._inputs import AttentionInputs, validate_inputs


def _batched_reference(q, k, v, prefix_k, prefix_v, gate_rows, causal: bool, scale: float, gate_tanh: bool,
                       compute_dtype: torch.dtype, seqused_k: Optional[torch.Tensor] = None):
    """out ``[B, Sq, Hq, D]`` and the log-sum-exps ``lse_w, lse_p [B, Hq, Sq]`` (fp32) of one batch; row b sees
    only its first ``seqused_k[b]`` keys when ``seqused_k`` (int32 ``[B]``) is given."""
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    # [B, H, S, D], kv heads repeated so that query head h reads kv head h // group.
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    pkh = prefix_k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    pvh = prefix_v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)

    # -- words: causal softmax, bottom-right aligned
    scores_w = scale * (qh @ kh.transpose(-1, -2))  # [B, H, Sq, Sk]
    hidden = None
    row = torch.arange(seqlen_q, device=q.device)[:, None]
    col = torch.arange(seqlen_k, device=q.device)[None, :]
    if seqused_k is not None:
        used = seqused_k.long()[:, None, None, None]  # [B, 1, 1, 1]: each row's own key count
        hidden = col >= used  # [B, 1, 1, Sk]
        if causal:
            hidden = hidden | (col > row + used - seqlen_q)  # [B, 1, Sq, Sk]
    elif causal:
        hidden = col > row + seqlen_k - seqlen_q  # [Sq, Sk]
    if hidden is not None:
        scores_w = scores_w.masked_fill(hidden, float("-inf"))
    lse_w = torch.logsumexp(scores_w.float(), dim=-1)  # [B, H, Sq]
    probs_w = torch.softmax(scores_w, dim=-1)
    if hidden is not None:
        # A row with no visible key (the first Sq − Sk queries) gives 0. Only those rows are zeroed: a NaN of
        # the inputs (in q, or in a visible key) stays NaN, as in PyTorch's attention (DESIGN.md §1).
        probs_w = probs_w.masked_fill(hidden.all(dim=-1, keepdim=True), 0.0)
    out_w = probs_w @ vh

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


def reference_attention(inp: AttentionInputs, *, upcast: bool = True, return_lse: bool = False):
    """Reference attention of already validated inputs (see :func:`zero_init_attention_reference`)."""
    compute_dtype = torch.float32 if upcast else inp.dtype
    args = (inp.causal, inp.softmax_scale, inp.gate_tanh, compute_dtype)
    if not inp.varlen:
        out, lse_w, lse_p = _batched_reference(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate, *args,
                                               seqused_k=inp.seqused_k)
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
                                  cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                                  cu_seqlens_q: Optional[torch.Tensor] = None,
                                  cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                                  max_seqlen_k: Optional[int] = None, seqused_k: Optional[torch.Tensor] = None,
                                  upcast: bool = True, return_lse: bool = False):
    """Zero-init attention computed the obvious way.

    Args:
        q: ``[B, Sq, Hq, D]`` (or ``[Tq, Hq, D]`` varlen).
        k, v: ``[B, Sk, Hkv, D]`` (or ``[Tk, Hkv, D]``).
        prefix_k, prefix_v: ``[1 or B, P, Hkv, D]``.
        gate: ``[Hq]``, ``[1]`` or ``[B, Hq]``, the raw gate.
        causal, softmax_scale, gate_activation, cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, seqused_k: as :func:`fastadapter.zero_init_attention`.
        upcast: compute in fp32 and return fp32 (the oracle). ``False`` computes in the inputs' dtype, which is
            what "plain PyTorch in that dtype" means in the tests' tolerances.
        return_lse: also return the fp32 log-sum-exps ``lse_w, lse_p`` (``[B, Hq, Sq]``, or ``[Hq, Tq]``).

    Returns:
        ``out`` with q's shape (fp32 when ``upcast``), or ``(out, lse_w, lse_p)``.
    """
    inp = validate_inputs(q, k, v, prefix_k, prefix_v, gate, causal=causal, softmax_scale=softmax_scale,
                          gate_activation=gate_activation, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                          cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, seqused_k=seqused_k)
    return reference_attention(inp, upcast=upcast, return_lse=return_lse)
