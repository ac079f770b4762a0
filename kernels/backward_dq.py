"""Backward, step 3: ``dq``, one program per query tile of one (sequence, query head).

The program keeps ``q``, ``dO``, the fp32 ``dq`` accumulator and the row statistics resident, streams the key
tiles this query tile can see (as the forward pass: full tiles unmasked, the diagonal masked) and finishes with
the prefix, whose gradient through the queries is one more tile::

    P_w = exp(scale · q kᵀ − lse_w)      dS_w = P_w ∘ (dO vᵀ − D_w)             dq += dS_w k
    P_p = exp(scale · q prefix_kᵀ − lse_p)   dS_p = γ · P_p ∘ (dO prefix_vᵀ − D_p)   dq += dS_p prefix_k

and ``dq`` is scaled once at the end.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotune
from .tiles import (LOG2E, dot, gate_value, head_base, load_lse, load_prefix, load_rows, sequence_bounds,
                    stats_offset, store_rows, tile_and_row, to_dtype, visible_key_range)


@triton.jit
def _key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, cols, n_lo, n_hi, n_k, shift,
               qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr):
    """Accumulate the contributions of the key tiles ``[n_lo, n_hi)`` into ``dq``."""
    for start_n in range(n_lo, n_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, stride_ks, keys, n_k, cols, HEAD_DIM, BLOCK_D)
        v = load_rows(v_base, stride_vs, keys, n_k, cols, HEAD_DIM, BLOCK_D)
        p = tl.exp2(dot(q, tl.trans(k), INTERPRETER) * qk_scale - lse[:, None])
        if MASKED:
            visible = keys[None, :] < n_k
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        ds = p * (dot(do, tl.trans(v), INTERPRETER) - delta[:, None])
        dq += dot(to_dtype(ds, k.dtype, INTERPRETER), k, INTERPRETER)
    return dq


@autotune("backward_dq")
@triton.jit
def zero_init_attention_backward_dq_kernel(
        Q, K, V, PREFIX_K, PREFIX_V, GATE, GRAD_OUT, LSE_W, LSE_P, DELTA_W, DELTA_P, DQ, CU_SEQLENS_Q, CU_SEQLENS_K,
        SEQUSED_K,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh, stride_gb, stride_gh,
        stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, prefix_len, heads_q, group, softmax_scale, seqlen_q_bucket, seqlen_k_bucket,
        CAUSAL: tl.constexpr, GATE_TANH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr, HAS_PREFIX: tl.constexpr, VARLEN: tl.constexpr, SHARED_OFFSETS: tl.constexpr,
        HAS_SEQUSED: tl.constexpr, INTERPRETER: tl.constexpr, ARCH: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M) · B · Hq,)``. Writes ``DQ`` (q's layout)."""
    pid_m, pid_bh = tile_and_row(tl.program_id(0), seqlen_q, BLOCK_M)
    b = pid_bh // heads_q
    head = pid_bh % heads_q
    kv_head = head // group
    token0, k_token0, n_q, n_k = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, b, seqlen_q, seqlen_k,
                                                 VARLEN, SHARED_OFFSETS, HAS_SEQUSED)
    start_m = pid_m * BLOCK_M
    if start_m >= n_q:
        return

    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    qk_scale = softmax_scale * LOG2E
    q = load_rows(head_base(Q, b, token0, head, stride_qb, stride_qs, stride_qh), stride_qs, rows, n_q, cols,
                  HEAD_DIM, BLOCK_D)
    do = load_rows(head_base(GRAD_OUT, b, token0, head, stride_dob, stride_dos, stride_doh), stride_dos, rows,
                   n_q, cols, HEAD_DIM, BLOCK_D)
    stats = stats_offset(b, head, token0, stride_lb, stride_lh)
    lse = load_lse(LSE_W + stats, rows, n_q)
    delta = tl.load(DELTA_W + stats + rows, mask=rows < n_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- words: the tiles the forward pass visited, in the same order
    shift = n_k - n_q
    n_full, n_hi = visible_key_range(start_m, n_q, n_k, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = head_base(K, b, k_token0, kv_head, stride_kb, stride_ks, stride_kh)
    v_base = head_base(V, b, k_token0, kv_head, stride_vb, stride_vs, stride_vh)
    dq = _key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, cols, 0, n_full, n_k,
                    shift, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRETER)
    dq = _key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, rows, cols, n_full, n_hi, n_k,
                    shift, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRETER)

    # -- prefix: one tile
    if HAS_PREFIX:
        slots = tl.arange(0, BLOCK_P)
        pk = load_prefix(PREFIX_K, b, kv_head, stride_pkb, stride_pks, stride_pkh, prefix_len, cols, HEAD_DIM,
                         BLOCK_D, BLOCK_P)
        pv = load_prefix(PREFIX_V, b, kv_head, stride_pvb, stride_pvs, stride_pvh, prefix_len, cols, HEAD_DIM,
                         BLOCK_D, BLOCK_P)
        gamma = gate_value(GATE, b, head, stride_gb, stride_gh, GATE_TANH)
        p_p = tl.exp2(dot(q, tl.trans(pk), INTERPRETER) * qk_scale - load_lse(LSE_P + stats, rows, n_q)[:, None])
        p_p = tl.where(slots[None, :] < prefix_len, p_p, 0.0)
        delta_p = tl.load(DELTA_P + stats + rows, mask=rows < n_q, other=0.0)
        ds_p = (gamma * p_p) * (dot(do, tl.trans(pv), INTERPRETER) - delta_p[:, None])
        dq += dot(to_dtype(ds_p, pk.dtype, INTERPRETER), pk, INTERPRETER)

    dq_base = head_base(DQ, b, token0, head, stride_dqb, stride_dqs, stride_dqh)
    dq = to_dtype(dq * softmax_scale, DQ.dtype.element_ty, INTERPRETER)
    store_rows(dq_base, stride_dqs, rows, n_q, cols, dq, HEAD_DIM, BLOCK_D)


def dq_grid(seqlen_q: int, batch_heads: int):
    """Launch grid: query tiles × (sequence, query head), flattened."""
    return lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]) * batch_heads,)
