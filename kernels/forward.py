"""Forward kernel of zero-init attention and its launcher.

One program computes a ``BLOCK_M`` tile of query rows of one (sequence, query head):

1. the prefix scores ``q · prefix_kᵀ`` (the whole prefix is one tile, P ≤ 64) and their own softmax, which
   gives ``O_p`` and ``lse_p`` with no loop;
2. an online softmax over the key tiles of its sequence, bottom-right causal (query i of a sequence of ``Sq_b``
   queries and ``Sk_b`` keys sees keys ``j ≤ i + Sk_b − Sq_b``; ``Sk_b`` is ``seqused_k[b]`` when given): first
   the tiles every row sees in full (no mask), then the tiles on the diagonal and the sequence's ragged last tile
   (masked); tiles no row sees are never loaded. This gives ``O_w`` and ``lse_w`` (a row that sees no key:
   ``O_w = 0``, ``lse_w = -inf``);
3. ``out = O_w + γ · O_p`` with ``γ = tanh(gate)`` (or the raw gate), stored in q's dtype; both log-sum-exps
   are saved for the backward pass (fp32, natural log, ``-inf`` where nothing is visible).

Scores are kept in log2 units (``s · scale · log2 e``) so that every exponential is one ``exp2``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arguments import forward_arguments
from .autotune import autotune, launch
from .layout import Layout, device_guard
from .problem import AttentionProblem
from .tiles import (LN2, LOG2E, MASKED_BLOCK_N, gate_value, head_base, load_rows, online_softmax_tiles,
                    prefix_softmax, sequence_bounds, stats_offset, store_rows, tile_and_row, to_dtype, visible_key_range)


@autotune("forward")
@triton.jit
def zero_init_attention_forward_kernel(
        Q, K, V, PREFIX_K, PREFIX_V, GATE, OUT, LSE_W, LSE_P, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh, stride_gb, stride_gh,
        stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
        seqlen_q, seqlen_k, prefix_len, heads_q, group, softmax_scale, seqlen_q_bucket, seqlen_k_bucket,
        CAUSAL: tl.constexpr, GATE_TANH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr, HAS_PREFIX: tl.constexpr, VARLEN: tl.constexpr, SHARED_OFFSETS: tl.constexpr,
        HAS_SEQUSED: tl.constexpr, INTERPRETER: tl.constexpr, ARCH: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M) · B · Hq,)``. Writes ``OUT`` (q's layout) and ``LSE_W``, ``LSE_P``."""
    pid_m, pid_bh = tile_and_row(tl.program_id(0), seqlen_q, BLOCK_M)
    b = pid_bh // heads_q
    head = pid_bh % heads_q
    kv_head = head // group
    q_token0, k_token0, n_q, n_k = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, b, seqlen_q, seqlen_k,
                                                   VARLEN, SHARED_OFFSETS, HAS_SEQUSED)
    start_m = pid_m * BLOCK_M
    if start_m >= n_q:  # a varlen sequence shorter than the longest one
        return

    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    qk_scale = softmax_scale * LOG2E
    q = load_rows(head_base(Q, b, q_token0, head, stride_qb, stride_qs, stride_qh), stride_qs, rows, n_q, cols,
                  HEAD_DIM, BLOCK_D)

    # -- words: full tiles first, then the diagonal (or the ragged last tile) with masks
    shift = n_k - n_q  # bottom-right alignment: query i sees keys j <= i + shift
    n_full, n_hi = visible_key_range(start_m, n_q, n_k, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = head_base(K, b, k_token0, kv_head, stride_kb, stride_ks, stride_kh)
    v_base = head_base(V, b, k_token0, kv_head, stride_vb, stride_vs, stride_vh)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows, cols, 0,
                                         n_full, n_k, shift, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N,
                                         INTERPRETER)
    acc, l_i, m_i = online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows, cols, n_full,
                                         n_hi, n_k, shift, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_D, MASKED_BLOCK_N,
                                         INTERPRETER)
    seen = l_i > 0.0  # rows with no visible word give 0 (and lse_w = -inf)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse_w = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))

    # -- prefix: one tile, its own softmax, scaled by the gate
    if HAS_PREFIX:
        out_p, lse_p = prefix_softmax(q, PREFIX_K, PREFIX_V, b, kv_head, stride_pkb, stride_pks, stride_pkh,
                                      stride_pvb, stride_pvs, stride_pvh, prefix_len, cols, qk_scale, HEAD_DIM,
                                      BLOCK_D, BLOCK_P, INTERPRETER)
        out = out + gate_value(GATE, b, head, stride_gb, stride_gh, GATE_TANH) * out_p
    else:
        lse_p = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    o_base = head_base(OUT, b, q_token0, head, stride_ob, stride_os, stride_oh)
    store_rows(o_base, stride_os, rows, n_q, cols, to_dtype(out, OUT.dtype.element_ty, INTERPRETER), HEAD_DIM, BLOCK_D)
    stats = stats_offset(b, head, q_token0, stride_lb, stride_lh) + rows
    tl.store(LSE_W + stats, lse_w, mask=rows < n_q)
    tl.store(LSE_P + stats, lse_p, mask=rows < n_q)


def forward_grid(layout: Layout):
    """Launch grid: query tiles × (sequence, query head), flattened (see :func:`.tiles.tile_and_row`)."""
    return lambda meta: (triton.cdiv(layout.seqlen_q, meta["BLOCK_M"]) * layout.batch * layout.heads_q,)


def attention_forward(inp: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Args:
        inp: the :class:`~.problem.AttentionProblem` of the call: ``q [B, Sq, Hq, D]``,
            ``k, v [B, Sk, Hkv, D]`` (``seqused_k [B]`` optional), or varlen ``q [Tq, Hq, D]``,
            ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_q``, ``cu_seqlens_k``; gate fp32 ``[Bg, Hq]``.

    Returns:
        ``out`` (q's shape and dtype, contiguous) and fp32 ``lse_w, lse_p`` of shape ``inp.lse_shape()``
        (``[B, Hq, Sq]`` or ``[Hq, Tq]``), natural log, ``-inf`` where nothing is visible or P == 0.
    """
    layout = Layout.of(inp)
    # Varlen tokens outside every sequence (cu_seqlens_q[-1] < Tq) are never visited: give them 0 and -inf.
    if layout.varlen:
        out = torch.zeros(inp.q.shape, dtype=inp.dtype, device=inp.device)
        lse_w = torch.full(inp.lse_shape(), float("-inf"), dtype=torch.float32, device=inp.device)
    else:
        out = torch.empty(inp.q.shape, dtype=inp.dtype, device=inp.device)
        lse_w = torch.empty(inp.lse_shape(), dtype=torch.float32, device=inp.device)
    lse_p = torch.empty_like(lse_w) if not layout.varlen else lse_w.clone()
    if out.numel() == 0:
        return out, lse_w, lse_p
    with device_guard(inp.device):
        launch("forward", zero_init_attention_forward_kernel, forward_grid(layout),
               forward_arguments(inp, layout, out, lse_w, lse_p))
    return out, lse_w, lse_p
