"""Backward, step 1: the row statistics ``D_w``, ``D_p`` and the whole prefix backward (DESIGN.md §1).

For every query row::

    O_p = softmax(S_p) prefix_v        (recomputed from the saved lse_p: P is ~10, cheaper than storing it)
    D_p = rowsum(dO ∘ O_p)             D_w = rowsum(dO ∘ out) − γ · D_p
    dS_p = P_p ∘ (dO prefix_vᵀ − D_p)  (γ factored out)

and the prefix gradients, which are sums over every query row of the (sequence, head)::

    dprefix_k = γ · scale · dS_pᵀ q    dprefix_v = γ · P_pᵀ dO    dγ = Σ D_p

Reduction without atomics: thousands of programs adding into the same ``P × D`` prefix gradient (every
sequence and head of a group shares one prompt) would serialise on atomic contention. Instead the grid is
``num_splits × B · Hq``; each program walks the query tiles ``split, split + num_splits, ...`` of one
(sequence, head), accumulates its partial sums in registers and writes them once. The launcher sums the
``[B·Hq, num_splits, P, D]`` partials with torch (a few MB at LLaMA-7B shapes) over splits, group heads and,
for a shared prompt, the batch. ``num_splits`` only exists to give the GPU enough programs to fill it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotune
from .tiles import (LOG2E, dot, gate_value, head_base, load_lse, load_prefix, load_rows, query_bounds,
                    stats_offset, store_rows, to_dtype)


@autotune("backward_preprocess")
@triton.jit
def zero_init_attention_backward_preprocess_kernel(
        Q, PREFIX_K, PREFIX_V, GATE, OUT, GRAD_OUT, LSE_P, DELTA_W, DELTA_P, PARTIAL_DPK, PARTIAL_DPV,
        PARTIAL_DGAMMA, CU_SEQLENS_Q,
        stride_qb, stride_qs, stride_qh, stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh,
        stride_gb, stride_gh, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
        stride_lb, stride_lh,
        seqlen_q, prefix_len, heads_q, group, softmax_scale, num_splits, seqlen_q_bucket,
        GATE_TANH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
        HAS_PREFIX: tl.constexpr, VARLEN: tl.constexpr, INTERPRETER: tl.constexpr, ARCH: tl.constexpr,
        BLOCK_M: tl.constexpr):
    """Grid ``(num_splits · B · Hq,)``. Writes ``DELTA_W`` (and ``DELTA_P``) in the layout of the lse, and the
    partials ``PARTIAL_DPK, PARTIAL_DPV [B·Hq, num_splits, P, D]``, ``PARTIAL_DGAMMA [B·Hq, num_splits]``."""
    pid = tl.program_id(0)
    split = pid % num_splits
    pid_bh = pid // num_splits
    b = pid_bh // heads_q
    head = pid_bh % heads_q
    kv_head = head // group
    token0, n_q = query_bounds(CU_SEQLENS_Q, b, seqlen_q, VARLEN)  # row statistics need no key
    cols = tl.arange(0, BLOCK_D)
    q_base = head_base(Q, b, token0, head, stride_qb, stride_qs, stride_qh)
    o_base = head_base(OUT, b, token0, head, stride_ob, stride_os, stride_oh)
    do_base = head_base(GRAD_OUT, b, token0, head, stride_dob, stride_dos, stride_doh)
    stats = stats_offset(b, head, token0, stride_lb, stride_lh)
    qk_scale = softmax_scale * LOG2E

    if HAS_PREFIX:
        slots = tl.arange(0, BLOCK_P)
        pk = load_prefix(PREFIX_K, b, kv_head, stride_pkb, stride_pks, stride_pkh, prefix_len, cols, HEAD_DIM,
                         BLOCK_D, BLOCK_P)
        pv = load_prefix(PREFIX_V, b, kv_head, stride_pvb, stride_pvs, stride_pvh, prefix_len, cols, HEAD_DIM,
                         BLOCK_D, BLOCK_P)
        gamma = gate_value(GATE, b, head, stride_gb, stride_gh, GATE_TANH)
        dpk = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        dpv = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        dgamma = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_m in range(split * BLOCK_M, n_q, num_splits * BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        o = load_rows(o_base, stride_os, rows, n_q, cols, HEAD_DIM, BLOCK_D)
        do = load_rows(do_base, stride_dos, rows, n_q, cols, HEAD_DIM, BLOCK_D)
        delta_w = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_PREFIX:
            q = load_rows(q_base, stride_qs, rows, n_q, cols, HEAD_DIM, BLOCK_D)
            # -- recompute P_p from the saved lse_p (rows past the sequence get P_p = 0)
            s_p = dot(q, tl.trans(pk), INTERPRETER) * qk_scale
            p_p = tl.exp2(s_p - load_lse(LSE_P + stats, rows, n_q)[:, None])
            p_p = tl.where(slots[None, :] < prefix_len, p_p, 0.0)
            o_p = dot(to_dtype(p_p, pv.dtype, INTERPRETER), pv, INTERPRETER)
            delta_p = tl.sum(do.to(tl.float32) * o_p, 1)
            delta_w -= gamma * delta_p
            # -- dS_p / γ, then the prefix gradients of this tile
            ds_p = p_p * (dot(do, tl.trans(pv), INTERPRETER) - delta_p[:, None])
            dpk += dot(tl.trans(to_dtype(ds_p, q.dtype, INTERPRETER)), q, INTERPRETER)
            dpv += dot(tl.trans(to_dtype(p_p, do.dtype, INTERPRETER)), do, INTERPRETER)
            dgamma += delta_p
            tl.store(DELTA_P + stats + rows, delta_p, mask=rows < n_q)
        tl.store(DELTA_W + stats + rows, delta_w, mask=rows < n_q)

    if HAS_PREFIX:
        # Every program writes its partials, even one with no tile to walk (they are then 0). Program pid owns
        # partial row pid = (sequence·head, split) of the [B·Hq, num_splits, P, D] buffers.
        partial = tl.cast(pid, tl.int64)
        slots = tl.arange(0, BLOCK_P)
        store_rows(PARTIAL_DPK + partial * prefix_len * HEAD_DIM, HEAD_DIM, slots, prefix_len, cols,
                   dpk * (gamma * softmax_scale), HEAD_DIM, BLOCK_D)
        store_rows(PARTIAL_DPV + partial * prefix_len * HEAD_DIM, HEAD_DIM, slots, prefix_len, cols,
                   dpv * gamma, HEAD_DIM, BLOCK_D)
        tl.store(PARTIAL_DGAMMA + partial, tl.sum(dgamma, 0))


def preprocess_grid(num_splits: int, batch_heads: int):
    """Launch grid: splits × (sequence, query head), flattened; independent of the autotuned tile."""
    return lambda meta: (num_splits * batch_heads,)
