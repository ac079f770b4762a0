"""Backward, step 2: ``dk`` and ``dv``, one program per key tile of one (sequence, kv head).

The program keeps its ``k``, ``v`` tiles and the fp32 ``dk``, ``dv`` accumulators resident and streams the query
tiles that can see them, for every query head of its GQA/MQA group (the group sum happens in registers, with no
atomics and no extra pass). Probabilities are recomputed from the saved ``lse_w`` in transposed form::

    P_wᵀ = exp(scale · k qᵀ − lse_w)     dv += P_wᵀ dO
    dS_wᵀ = P_wᵀ ∘ (v dOᵀ − D_w)          dk += dS_wᵀ q        (dk scaled once at the end)

Causal: query tiles entirely above the diagonal are skipped; the tiles crossing it are masked; the rest
(every row sees every key of the tile) run without a mask.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotune
from .tiles import (LOG2E, dot, head_base, load_lse, load_rows, sequence_bounds, stats_offset, store_rows,
                    tile_and_row, to_dtype)


@triton.jit
def _query_tiles(dk, dv, k, v, q_base, do_base, LSE, DELTA, stride_qs, stride_dos, keys, cols, m_lo, m_hi, n_q,
                 shift, qk_scale, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, INTERPRETER: tl.constexpr):
    """Accumulate the contributions of the query tiles ``[m_lo, m_hi)`` into ``dk`` and ``dv``."""
    for start_m in range(m_lo, m_hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_base, stride_qs, rows, n_q, cols, HEAD_DIM, BLOCK_D)
        do = load_rows(do_base, stride_dos, rows, n_q, cols, HEAD_DIM, BLOCK_D)
        lse = load_lse(LSE, rows, n_q)  # +inf past the sequence: those rows contribute nothing
        delta = tl.load(DELTA + rows, mask=rows < n_q, other=0.0)
        p_t = tl.exp2(dot(k, tl.trans(q), INTERPRETER) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(keys[:, None] <= rows[None, :] + shift, p_t, 0.0)
        dv += dot(to_dtype(p_t, do.dtype, INTERPRETER), do, INTERPRETER)
        ds_t = p_t * (dot(v, tl.trans(do), INTERPRETER) - delta[None, :])
        dk += dot(to_dtype(ds_t, q.dtype, INTERPRETER), q, INTERPRETER)
    return dk, dv


@autotune("backward_dkdv")
@triton.jit
def zero_init_attention_backward_dkdv_kernel(
        Q, K, V, GRAD_OUT, LSE_W, DELTA_W, DK, DV, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs,
        stride_dvh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, heads_kv, group, softmax_scale, seqlen_q_bucket, seqlen_k_bucket,
        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
        SHARED_OFFSETS: tl.constexpr, HAS_SEQUSED: tl.constexpr, INTERPRETER: tl.constexpr, ARCH: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sk, BLOCK_N) · B · Hkv,)``. Writes ``DK``, ``DV`` (k's layout) for the keys the sequence uses;
    keys past them (``seqused_k``, or a shorter varlen sequence) are not written: the launcher zeroes them."""
    pid_n, pid_bh = tile_and_row(tl.program_id(0), seqlen_k, BLOCK_N)
    b = pid_bh // heads_kv
    kv_head = pid_bh % heads_kv
    token0, k_token0, n_q, n_k = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, b, seqlen_q, seqlen_k,
                                                 VARLEN, SHARED_OFFSETS, HAS_SEQUSED)
    start_n = pid_n * BLOCK_N
    if start_n >= n_k:
        return

    keys = start_n + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    qk_scale = softmax_scale * LOG2E
    k = load_rows(head_base(K, b, k_token0, kv_head, stride_kb, stride_ks, stride_kh), stride_ks, keys, n_k, cols,
                  HEAD_DIM, BLOCK_D)
    v = load_rows(head_base(V, b, k_token0, kv_head, stride_vb, stride_vs, stride_vh), stride_vs, keys, n_k, cols,
                  HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query i sees key j when j <= i + shift: rows below m_lo see none of this tile, rows from m_full on see
    # all of it, the tiles between cross the diagonal.
    shift = n_k - n_q
    if CAUSAL:
        m_lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        m_full = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, m_lo)
        m_masked_hi = tl.minimum(m_full, n_q)
    else:
        m_lo = 0
        m_full = 0
        m_masked_hi = 0
    for j in range(0, group):
        head = kv_head * group + j
        q_base = head_base(Q, b, token0, head, stride_qb, stride_qs, stride_qh)
        do_base = head_base(GRAD_OUT, b, token0, head, stride_dob, stride_dos, stride_doh)
        stats = stats_offset(b, head, token0, stride_lb, stride_lh)
        dk, dv = _query_tiles(dk, dv, k, v, q_base, do_base, LSE_W + stats, DELTA_W + stats, stride_qs,
                              stride_dos, keys, cols, m_lo, m_masked_hi, n_q, shift, qk_scale, True,
                              HEAD_DIM, BLOCK_D, BLOCK_M, INTERPRETER)
        dk, dv = _query_tiles(dk, dv, k, v, q_base, do_base, LSE_W + stats, DELTA_W + stats, stride_qs,
                              stride_dos, keys, cols, m_full, n_q, n_q, shift, qk_scale, False,
                              HEAD_DIM, BLOCK_D, BLOCK_M, INTERPRETER)

    dk_base = head_base(DK, b, k_token0, kv_head, stride_dkb, stride_dks, stride_dkh)
    dv_base = head_base(DV, b, k_token0, kv_head, stride_dvb, stride_dvs, stride_dvh)
    dk = to_dtype(dk * softmax_scale, DK.dtype.element_ty, INTERPRETER)
    dv = to_dtype(dv, DV.dtype.element_ty, INTERPRETER)
    store_rows(dk_base, stride_dks, keys, n_k, cols, dk, HEAD_DIM, BLOCK_D)
    store_rows(dv_base, stride_dvs, keys, n_k, cols, dv, HEAD_DIM, BLOCK_D)


def dkdv_grid(seqlen_k: int, batch_kv_heads: int):
    """Launch grid: key tiles × (sequence, kv head), flattened."""
    return lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]) * batch_kv_heads,)
