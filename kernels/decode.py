"""Split-KV decode kernels of zero-init attention (flash-decoding) for a few query rows over a long KV cache.

Generation runs ``Sq ≤ 16`` query rows per step (one token, or a short speculative/chunked step) against a KV
cache of ``Sk`` keys. The forward kernel would give each (sequence, query head) one program with a mostly empty
128-row tile, and walk all ``Sk`` keys in it: batch 1 then occupies a handful of SMs. Ragged batches take the same
kernels: a padded cache ``[B, S_cache, Hkv, D]`` read up to each row's ``seqused_k[b]``, or an unpadded varlen
step (``max_seqlen_q ≤ 16`` queries per sequence over its packed keys, offsets of its own); each program reads its
sequence's bounds, and chunks past a sequence's keys are empty (see :func:`decode_not_supported_reasons` for
what takes this path). Here:

1. **split** (:func:`zero_init_attention_decode_split_kernel`): the keys are cut into ``num_splits`` chunks of
   ``chunk`` keys (a multiple of ``BLOCK_N``); one program handles one chunk for one row tile of one
   (sequence, kv head). The query heads of a kv group are stacked in the tile (row ``r = g · Sq + i`` is query
   row ``i`` of head ``kv_head · group + g``), so each k/v tile is read once per group, not once per query
   head. Each program runs the online softmax over its chunk (bottom-right causal: row ``i`` of sequence b sees
   keys ``j ≤ i + Sk_b − Sq_b``) and writes its partial state — running max ``m`` (log2 units), sum ``l`` and
   the unnormalised output ``acc`` — to fp32 scratch.
2. **merge** (:func:`zero_init_attention_decode_merge_kernel`): one program per row tile combines the chunks'
   states (``m = max m_s``, ``l = Σ l_s·2^(m_s−m)``, ``acc = Σ acc_s·2^(m_s−m)``), adds the prefix part
   (computed once, its own softmax, times ``γ = tanh(gate)`` or the raw gate) and writes ``out`` and the two
   log-sum-exps exactly as :func:`.forward.attention_forward` does, so the backward kernels take them as-is.

The number of splits follows the occupancy: enough programs for about two waves over the device's SMs, but no
chunk shorter than :data:`MIN_CHUNK_KEYS` (under the interpreter: at most :data:`INTERPRETER_SPLITS` small
chunks, so that tests cross chunk and tile boundaries). Tile sizes are fixed per shape (no timing-based
autotuning), so decoding is deterministic. :func:`decode_compile_specs` gives the launches the ahead-of-time
report compiles, :func:`compile_decode_kernels` compiles them and reads the cubins.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import triton
import triton.language as tl

from .layout import (Layout, broadcast_strides, device_guard, lse_strides, row_strides, sequence_arguments,
                     unit_stride_head_dim)
from .problem import AttentionProblem
from .tiles import (LN2, LOG2E, MASKED_BLOCK_N, head_base, online_softmax_tiles, prefix_softmax, query_bounds,
                    sequence_bounds, to_dtype)

#: The most query rows per step that take the decode path (generation: 1; short multi-token steps: a few).
MAX_DECODE_QUERIES = 16
#: Key tile of the split kernel under the interpreter, and the largest stacked row tile (compiled / interpreted).
BLOCK_N_INTERPRETER = 32
MAX_BLOCK_M_COMPILED, MAX_BLOCK_M_INTERPRETER = 64, 32
#: No chunk shorter than this many keys (a shorter one costs more in the merge than it gains in occupancy).
MIN_CHUNK_KEYS = 256
#: The most chunks one row tile is split into.
MAX_SPLITS = 128
#: Under the interpreter: a small fixed number of chunks (several per test, ragged last chunk).
INTERPRETER_SPLITS = 3
#: SM counts of the architectures the compile specs target (A100, H100), used instead of a device query.
SM_COUNT_OF_ARCH = {80: 108, 86: 84, 89: 128, 90: 132}


@triton.jit
def _stacked_rows(tile, seqlen_q, n_q, group, kv_head, BLOCK_M: tl.constexpr):
    """Rows of one tile of the stacked ``[group · Sq]`` queries of a kv head: ``(r, query row i, query head,
    valid)`` with ``r = g · Sq + i`` and head ``kv_head · group + g``. ``Sq`` is the launch's (longest) query
    count; rows past the sequence's own ``n_q`` queries are not valid."""
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    i = r % seqlen_q
    valid = (r < group * seqlen_q) & (i < n_q)
    head = kv_head * group + r // seqlen_q
    return r, i, head, valid


@triton.jit
def _load_stacked(base, b, token0, i, head, valid, stride_b, stride_s, stride_h, cols, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """``[BLOCK_M, BLOCK_D]`` tile of rows ``(i, head)`` of sequence b (whose first token is ``token0``);
    invalid rows and padded columns read 0."""
    token = tl.cast(token0, tl.int64) + tl.cast(i, tl.int64)
    offsets = (tl.cast(b, tl.int64) * stride_b + token[:, None] * stride_s
               + tl.cast(head, tl.int64)[:, None] * stride_h + cols[None, :])
    mask = valid[:, None]
    if HEAD_DIM != BLOCK_D:
        mask = mask & (cols[None, :] < HEAD_DIM)
    return tl.load(base + offsets, mask=mask, other=0.0)


@triton.jit
def zero_init_attention_decode_split_kernel(
        Q, K, V, M_PART, L_PART, ACC_PART, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        seqlen_q, seqlen_k, heads_kv, group, softmax_scale, num_splits, row_tiles, chunk,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, SHARED_OFFSETS: tl.constexpr,
        HAS_SEQUSED: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(num_splits · row_tiles · B · Hkv,)``: the partial softmax state of one key chunk for one row tile.

    Writes ``M_PART, L_PART [B·Hkv·row_tiles, num_splits, BLOCK_M]`` (max in log2 units, sum) and
    ``ACC_PART [B·Hkv·row_tiles, num_splits, BLOCK_M, BLOCK_D]`` (unnormalised output), all fp32. A chunk past
    the sequence's keys (a shorter varlen sequence, ``seqused_k``) writes the empty state (``-inf``, 0, 0).
    """
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits  # (sequence, kv head, row tile), flattened
    tile = rest % row_tiles
    bh = rest // row_tiles
    b = bh // heads_kv
    kv_head = bh % heads_kv
    q_token0, k_token0, n_q, n_k = sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, b, seqlen_q, seqlen_k,
                                                   VARLEN, SHARED_OFFSETS, HAS_SEQUSED)
    r, i, head, valid = _stacked_rows(tile, seqlen_q, n_q, group, kv_head, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_stacked(Q, b, q_token0, i, head, valid, stride_qb, stride_qs, stride_qh, cols, HEAD_DIM, BLOCK_D)

    # -- this chunk's keys: [lo, hi) (empty past the sequence's keys); from the diagonal on the causal mask
    shift = n_k - n_q  # bottom-right alignment, per sequence
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_k)
    if CAUSAL:
        unmasked_end = tl.minimum(tl.maximum(shift + 1, 0), hi)  # every row sees keys <= shift
    else:
        unmasked_end = hi
    n_full = tl.maximum(lo + (unmasked_end - lo) // BLOCK_N * BLOCK_N, lo)
    k_base = head_base(K, b, k_token0, kv_head, stride_kb, stride_ks, stride_kh)
    v_base = head_base(V, b, k_token0, kv_head, stride_vb, stride_vs, stride_vh)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    qk_scale = softmax_scale * LOG2E
    # The chunk's end plays the sequence end: keys from hi on read 0 and are hidden (masked tiles).
    acc, l_i, m_i = online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, i, cols, lo,
                                         n_full, hi, shift, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N,
                                         INTERPRETER)
    acc, l_i, m_i = online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, i, cols, n_full,
                                         hi, hi, shift, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_D, MASKED_BLOCK_N,
                                         INTERPRETER)

    part = tl.cast(rest, tl.int64) * num_splits + split
    slots = tl.arange(0, BLOCK_M)
    tl.store(M_PART + part * BLOCK_M + slots, m_i)
    tl.store(L_PART + part * BLOCK_M + slots, l_i)
    tl.store(ACC_PART + part * (BLOCK_M * BLOCK_D) + slots[:, None] * BLOCK_D + cols[None, :], acc)


@triton.jit
def zero_init_attention_decode_merge_kernel(
        Q, PREFIX_K, PREFIX_V, GATE, OUT, LSE_W, LSE_P, M_PART, L_PART, ACC_PART, CU_SEQLENS_Q,
        stride_qb, stride_qs, stride_qh, stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs, stride_pvh,
        stride_gb, stride_gh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
        seqlen_q, prefix_len, heads_kv, group, softmax_scale, num_splits, row_tiles,
        GATE_TANH: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr, HAS_PREFIX: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid ``(row_tiles · B · Hkv,)``: merge the chunks' states, add the gated prefix, write out and lse."""
    rest = tl.program_id(0)
    tile = rest % row_tiles
    bh = rest // row_tiles
    b = bh // heads_kv
    kv_head = bh % heads_kv
    q_token0, n_q = query_bounds(CU_SEQLENS_Q, b, seqlen_q, VARLEN)
    r, i, head, valid = _stacked_rows(tile, seqlen_q, n_q, group, kv_head, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, BLOCK_M)

    # -- words: combine the partial softmax states of the chunks
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_w = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(0, num_splits):
        part = tl.cast(rest, tl.int64) * num_splits + split
        m_s = tl.load(M_PART + part * BLOCK_M + slots)
        l_s = tl.load(L_PART + part * BLOCK_M + slots)
        acc_s = tl.load(ACC_PART + part * (BLOCK_M * BLOCK_D) + slots[:, None] * BLOCK_D + cols[None, :])
        m_new = tl.maximum(m, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        beta = tl.exp2(m_s - m_ref)
        l_w = l_w * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new
    seen = l_w > 0.0  # rows with no visible word give 0 (and lse_w = -inf)
    out = acc / tl.where(seen, l_w, 1.0)[:, None]
    lse_w = tl.where(seen, (m + tl.log2(tl.where(seen, l_w, 1.0))) * LN2, float("-inf"))

    # -- prefix: one tile for the whole group, its own softmax, scaled by each row's gate
    if HAS_PREFIX:
        q = _load_stacked(Q, b, q_token0, i, head, valid, stride_qb, stride_qs, stride_qh, cols, HEAD_DIM, BLOCK_D)
        out_p, lse_p = prefix_softmax(q, PREFIX_K, PREFIX_V, b, kv_head, stride_pkb, stride_pks, stride_pkh,
                                      stride_pvb, stride_pvs, stride_pvh, prefix_len, cols, softmax_scale * LOG2E,
                                      HEAD_DIM, BLOCK_D, BLOCK_P, INTERPRETER)
        gamma = tl.load(GATE + b * stride_gb + head * stride_gh, mask=valid, other=0.0)
        if GATE_TANH:  # as tiles.gate_value: exact 0 at 0 (the zero-init property)
            gamma = 2.0 * tl.sigmoid(2.0 * gamma) - 1.0
        out = out + gamma[:, None] * out_p
    else:
        lse_p = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    token = tl.cast(q_token0, tl.int64) + tl.cast(i, tl.int64)
    o_offsets = (tl.cast(b, tl.int64) * stride_ob + token[:, None] * stride_os
                 + tl.cast(head, tl.int64)[:, None] * stride_oh + cols[None, :])
    o_mask = valid[:, None]
    if HEAD_DIM != BLOCK_D:
        o_mask = o_mask & (cols[None, :] < HEAD_DIM)
    tl.store(OUT + o_offsets, to_dtype(out, OUT.dtype.element_ty, INTERPRETER), mask=o_mask)
    stats = tl.cast(b, tl.int64) * stride_lb + tl.cast(head, tl.int64) * stride_lh + q_token0 + i
    tl.store(LSE_W + stats, lse_w, mask=valid)
    tl.store(LSE_P + stats, lse_p, mask=valid)


def decode_not_supported_reasons(inp: AttentionProblem) -> list[str]:
    """Why the decode kernels do not take ``inp`` (empty: they do). The forward kernel handles the rest.

    They take a few query rows per sequence over its keys, where the forward kernel would give each (sequence,
    query head) one mostly empty 64/128-row tile and walk every key in it:

    * dense ``1 ≤ Sq ≤ 16`` (with or without ``seqused_k``: a padded KV cache read up to each row's length);
    * varlen with ``max_seqlen_q ≤ 16`` and more keys than queries (``max_seqlen_k > max_seqlen_q``): an unpadded
      decode step (one query per sequence over its packed cache, as a Hugging Face batch gives once unpadded) or
      a short chunked/speculative step. Packed self-attention (``Sq_b == Sk_b``, shared offsets) keeps the
      forward kernel even for short sequences: with no long cache there is nothing to split, and a packed batch
      of thousands of sequences would only pay for the split kernels' fp32 scratch (``N · Hkv · BLOCK_M · D``).
    """
    reasons = []
    if inp.varlen:
        if inp.max_seqlen_q > MAX_DECODE_QUERIES:
            reasons.append(f"max_seqlen_q = {inp.max_seqlen_q} > {MAX_DECODE_QUERIES} query rows per sequence "
                           f"(not a decode step)")
        elif inp.max_seqlen_k <= inp.max_seqlen_q:
            reasons.append(f"max_seqlen_k = {inp.max_seqlen_k} <= max_seqlen_q = {inp.max_seqlen_q}: packed "
                           f"sequences with no longer key cache (the forward kernel)")
        elif inp.q.shape[0] == 0:
            reasons.append("no query token: nothing to compute")
    elif inp.seqlen_q > MAX_DECODE_QUERIES:
        reasons.append(f"Sq = {inp.seqlen_q} > {MAX_DECODE_QUERIES} query rows (not a decode step)")
    elif inp.seqlen_q == 0:
        reasons.append("Sq = 0: nothing to compute")
    return reasons


def decode_applies(inp: AttentionProblem) -> bool:
    """True when :func:`attention_decode` takes ``inp`` (see :func:`decode_not_supported_reasons`)."""
    return not decode_not_supported_reasons(inp)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles, warps and pipeline stages of one decode launch (fixed per shape: no timing-based tuning)."""

    block_m: int
    block_n: int
    split_warps: int
    split_stages: int
    merge_warps: int


def decode_config(layout: Layout, element_bytes: int) -> DecodeConfig:
    """The configuration of the decode kernels for ``layout`` and the inputs' element size.

    ``BLOCK_M`` is the stacked ``group · Sq`` rows rounded up to a power of two (at least 16, the smallest
    ``tl.dot``; at most 64, 32 for D = 256 and fp32). The split kernel streams ``BLOCK_N × D`` k and v tiles through
    shared memory. Chosen from compiling for sm_80, sm_86 and sm_90 (registers, spills and shared memory read
    from the cubins; the bf16 D = 128 and D = 256 rows are tests/kernels/test_triton_decode.py's):

    * fp16/bf16, D ≤ 128: 64-key tiles, 3 stages, 4 warps (sm_80 72-90 KB, sm_90 72-115 KB, no spills);
    * fp16/bf16, D = 256: 32-row and 32-key tiles, 2 stages, 4 warps; 8 warps for the merge (42-52 KB);
    * fp32 (IEEE dots on the CUDA cores, no tensor cores): 32-row and 32-key tiles, 1 stage, 8 warps (sm_86 and
      sm_90: D = 256 no spills at 220-237 registers; 4 warps spill at D = 128, and so do 64-row tiles on 8).
    """
    if layout.interpreter:
        block_m = min(max(16, triton.next_power_of_2(layout.group * layout.seqlen_q)), MAX_BLOCK_M_INTERPRETER)
        return DecodeConfig(block_m, BLOCK_N_INTERPRETER, 4, 1, 4)
    wide, fp32 = layout.block_d > 128, element_bytes == 4
    block_m = min(max(16, triton.next_power_of_2(layout.group * layout.seqlen_q)),
                  32 if wide or fp32 else MAX_BLOCK_M_COMPILED)
    block_n = 32 if wide or fp32 else 64
    stages = 1 if fp32 else 2 if wide else 3
    return DecodeConfig(block_m, block_n, split_warps=8 if fp32 else 4, split_stages=stages,
                        merge_warps=8 if wide or fp32 else 4)


def split_plan(layout: Layout, sm_count: Optional[int], block_m: int, block_n: int) -> tuple[int, int, int]:
    """``(row_tiles, num_splits, chunk)``: row tiles per kv head, key chunks and keys per chunk.

    ``sm_count`` None means the interpreter (:data:`INTERPRETER_SPLITS` chunks). Otherwise the chunks give
    about two waves of programs over the SMs, no chunk shorter than :data:`MIN_CHUNK_KEYS` keys, at most
    :data:`MAX_SPLITS`. ``chunk`` is a multiple of ``block_n``; the last chunk may be ragged.
    """
    row_tiles = triton.cdiv(layout.group * layout.seqlen_q, block_m)
    seqlen_k = max(layout.seqlen_k, 1)
    if sm_count is None:
        wanted = INTERPRETER_SPLITS
    else:
        programs = layout.batch * layout.heads_kv * row_tiles
        wanted = min(triton.cdiv(2 * sm_count, programs), seqlen_k // MIN_CHUNK_KEYS, MAX_SPLITS)
    wanted = max(1, min(wanted, triton.cdiv(seqlen_k, block_n)))
    chunk = triton.cdiv(triton.cdiv(seqlen_k, wanted), block_n) * block_n
    return row_tiles, triton.cdiv(seqlen_k, chunk), chunk


def decode_arguments(inp: AttentionProblem, layout: Layout, out: torch.Tensor, lse_w: torch.Tensor,
                     lse_p: torch.Tensor, sm_count: Optional[int]) -> tuple[dict, dict, tuple, tuple, DecodeConfig]:
    """Arguments and grids of the split and the merge kernel: ``(split_args, merge_args, split_grid,
    merge_grid, config)``, the fp32 scratch allocated on ``inp``'s device."""
    config = decode_config(layout, inp.q.element_size())
    block_m, block_n = config.block_m, config.block_n
    row_tiles, num_splits, chunk = split_plan(layout, sm_count, block_m, block_n)
    q, k, v = (unit_stride_head_dim(t) for t in (inp.q, inp.k, inp.v))
    pk, pv = (unit_stride_head_dim(t) for t in (inp.prefix_k, inp.prefix_v))
    states = layout.batch * layout.heads_kv * row_tiles
    scratch = dict(device=inp.device, dtype=torch.float32)
    m_part = torch.empty(states, num_splits, block_m, **scratch)
    l_part = torch.empty(states, num_splits, block_m, **scratch)
    acc_part = torch.empty(states, num_splits, block_m, layout.block_d, **scratch)
    varlen = layout.varlen
    qb, qs, qh = row_strides(q, varlen)
    kb, ks, kh = row_strides(k, varlen)
    vb, vs, vh = row_strides(v, varlen)
    ob, os_, oh = row_strides(out, varlen)
    pkb, pks, pkh, _ = broadcast_strides(pk)
    pvb, pvs, pvh, _ = broadcast_strides(pv)
    gb, gh = broadcast_strides(inp.gate)
    lb, lh = lse_strides(lse_w, varlen)
    shape = dict(seqlen_q=layout.seqlen_q, heads_kv=layout.heads_kv, group=layout.group,
                 softmax_scale=inp.softmax_scale, num_splits=num_splits, row_tiles=row_tiles)
    common = dict(HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d, INTERPRETER=layout.interpreter,
                  BLOCK_M=block_m)
    split = dict(Q=q, K=k, V=v, M_PART=m_part, L_PART=l_part, ACC_PART=acc_part, **sequence_arguments(inp),
                 stride_qb=qb, stride_qs=qs, stride_qh=qh, stride_kb=kb, stride_ks=ks, stride_kh=kh,
                 stride_vb=vb, stride_vs=vs, stride_vh=vh, seqlen_k=layout.seqlen_k, chunk=chunk, **shape,
                 CAUSAL=inp.causal, VARLEN=varlen, SHARED_OFFSETS=layout.shared_offsets, HAS_SEQUSED=layout.seqused,
                 BLOCK_N=block_n, **common)
    merge = dict(Q=q, PREFIX_K=pk, PREFIX_V=pv, GATE=inp.gate, OUT=out, LSE_W=lse_w, LSE_P=lse_p,
                 M_PART=m_part, L_PART=l_part, ACC_PART=acc_part, CU_SEQLENS_Q=inp.cu_seqlens_q,
                 stride_qb=qb, stride_qs=qs, stride_qh=qh, stride_pkb=pkb, stride_pks=pks, stride_pkh=pkh,
                 stride_pvb=pvb, stride_pvs=pvs, stride_pvh=pvh, stride_gb=gb, stride_gh=gh,
                 stride_ob=ob, stride_os=os_, stride_oh=oh, stride_lb=lb, stride_lh=lh,
                 prefix_len=layout.prefix_len, **shape, GATE_TANH=inp.gate_tanh, VARLEN=varlen,
                 BLOCK_P=layout.block_p,
                 HAS_PREFIX=layout.prefix_len > 0, **common)
    return split, merge, (num_splits * states,), (states,), config


def attention_decode(inp: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass of a decode step with the split-KV kernels.

    Args:
        inp: the :class:`~.problem.AttentionProblem` of the call that
            :func:`decode_applies` to: dense ``q [B, Sq, Hq, D]`` with ``1 ≤ Sq ≤ 16``, ``k, v [B, Sk, Hkv, D]``
            (the KV cache, ``seqused_k [B]`` optional), or varlen ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with
            ``max_seqlen_q ≤ 16 < max_seqlen_k``; ``prefix_k, prefix_v [Bp, P, Hkv, D]``, gate fp32 ``[Bg, Hq]``.

    Returns:
        As :func:`.forward.attention_forward`: ``out`` (q's shape and dtype, contiguous) and fp32
        ``lse_w, lse_p`` (``[B, Hq, Sq]`` or ``[Hq, Tq]``), natural log, ``-inf`` where nothing is visible or
        P == 0; query tokens after ``cu_seqlens_q[-1]`` give 0 and ``-inf``.
    """
    reasons = decode_not_supported_reasons(inp)
    if reasons:
        raise ValueError(f"the decode kernels do not take these inputs: {'; '.join(reasons)}")
    layout = Layout.of(inp)
    if layout.varlen:  # tokens outside every sequence are never visited
        out = torch.zeros(inp.q.shape, dtype=inp.dtype, device=inp.device)
        lse_w = torch.full(inp.lse_shape(), float("-inf"), dtype=torch.float32, device=inp.device)
    else:
        out = torch.empty(inp.q.shape, dtype=inp.dtype, device=inp.device)
        lse_w = torch.empty(inp.lse_shape(), dtype=torch.float32, device=inp.device)
    lse_p = torch.empty_like(lse_w) if not layout.varlen else lse_w.clone()
    if out.numel() == 0:
        return out, lse_w, lse_p
    sm_count = None if layout.interpreter else _sm_count(inp.device.index or 0)
    split, merge, split_grid, merge_grid, config = decode_arguments(inp, layout, out, lse_w, lse_p, sm_count)
    with device_guard(inp.device):
        zero_init_attention_decode_split_kernel[split_grid](**split, num_warps=config.split_warps,
                                                            num_stages=config.split_stages)
        zero_init_attention_decode_merge_kernel[merge_grid](**merge, num_warps=config.merge_warps, num_stages=1)
    return out, lse_w, lse_p


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): the launches of LLaMA-7B decode steps, compiled for sm_80 / sm_90.

#: Decode steps at LLaMA-7B heads (bf16, D = 128, P = 10, Hq = 32, a 2048-token cache): ``(Sq, Hkv, batch,
#: mode)``. One token with multi-head and grouped (Hkv = 8) attention, and a 16-row step of the grouped model
#: (the largest row tile), at batch 1; then a batch of 8 ragged rows: a padded cache read up to each row's length
#: (``seqused_k``, the thin model's generation) and one query per sequence over packed caches (varlen with its
#: own key offsets, an unpadded Hugging Face decode step).
DECODE_COMPILE_SHAPES = {"llama7b-Sq1-Hkv32": (1, 32, 1, "dense"), "llama7b-Sq1-Hkv8": (1, 8, 1, "dense"),
                         "llama7b-Sq16-Hkv8": (16, 8, 1, "dense"),
                         "llama7b-B8-Sq1-Hkv8-seqused": (1, 8, 8, "seqused"),
                         "llama7b-N8-Sq1-Hkv8-varlen": (1, 8, 8, "varlen")}
#: The ragged entries of :data:`DECODE_COMPILE_SHAPES`.
RAGGED_DECODE_SHAPES = tuple(name for name, (*_, mode) in DECODE_COMPILE_SHAPES.items() if mode != "dense")
_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}
#: The cache length of :data:`DECODE_COMPILE_SHAPES`.
_COMPILE_CACHE_LEN = 2048


def _compile_problem(seqlen_q: int, heads_kv: int, batch: int, mode: str, dtype: torch.dtype, head_dim: int,
                     prefix_len: int) -> AttentionProblem:
    """The inputs of one entry of :data:`DECODE_COMPILE_SHAPES`, on the ``meta`` device."""
    meta = dict(device="meta", dtype=dtype)
    offsets = dict(device="meta", dtype=torch.int32)
    lengths = {}
    if mode == "varlen":
        q = torch.empty(batch * seqlen_q, 32, head_dim, **meta)
        k = torch.empty(batch * _COMPILE_CACHE_LEN, heads_kv, head_dim, **meta)
        lengths = dict(cu_seqlens_q=torch.empty(batch + 1, **offsets), cu_seqlens_k=torch.empty(batch + 1, **offsets),
                       max_seqlen_q=seqlen_q, max_seqlen_k=_COMPILE_CACHE_LEN)
    else:
        q = torch.empty(batch, seqlen_q, 32, head_dim, **meta)
        k = torch.empty(batch, _COMPILE_CACHE_LEN, heads_kv, head_dim, **meta)
        if mode == "seqused":
            lengths = dict(seqused_k=torch.empty(batch, **offsets))
    return AttentionProblem(q=q, k=k, v=torch.empty_like(k),
                            prefix_k=torch.empty(1, prefix_len, heads_kv, head_dim, **meta),
                            prefix_v=torch.empty(1, prefix_len, heads_kv, head_dim, **meta),
                            gate=torch.empty(1, 32, device="meta", dtype=torch.float32), causal=True,
                            softmax_scale=head_dim ** -0.5, gate_tanh=True, **lengths)


def decode_compile_specs(arch: str = "sm_90", dtype: torch.dtype = torch.bfloat16, head_dim: int = 128,
                         prefix_len: int = 10, shapes: Optional[Iterable[str]] = None) -> list[dict]:
    """The launches of :func:`attention_decode` at the shapes of :data:`DECODE_COMPILE_SHAPES`, for compiling.

    Args:
        arch: ``"sm_80"`` or ``"sm_90"`` (its SM count sets the split plan, as on that GPU).
        dtype, head_dim, prefix_len: the inputs' dtype, D and P (Hq = 32, Sk = 2048, causal, tanh gate).
        shapes: the keys of :data:`DECODE_COMPILE_SHAPES` to compile (None: all of them).

    Returns:
        One dict per (kernel, shape): ``kernel`` ("decode_split" or "decode_merge"), ``shape`` (the key of
        :data:`DECODE_COMPILE_SHAPES`), ``fn`` (the ``@triton.jit`` function; an interpreted function under
        ``TRITON_INTERPRET=1``, which cannot be compiled), ``arguments`` (every argument of a real launch,
        tensors on the ``meta`` device), ``num_warps`` and ``num_stages``.
    """
    cc = int(arch.removeprefix("sm_").rstrip("a"))
    if cc not in SM_COUNT_OF_ARCH:
        raise ValueError(f"no SM count known for {arch!r}; known: {sorted(f'sm_{c}' for c in SM_COUNT_OF_ARCH)}")
    unknown = set(shapes or ()) - set(DECODE_COMPILE_SHAPES)
    if unknown:
        raise ValueError(f"unknown decode shapes {sorted(unknown)}; known: {list(DECODE_COMPILE_SHAPES)}")
    specs = []
    for shape, (seqlen_q, heads_kv, batch, mode) in DECODE_COMPILE_SHAPES.items():
        if shapes is not None and shape not in shapes:
            continue
        inp = _compile_problem(seqlen_q, heads_kv, batch, mode, dtype, head_dim, prefix_len)
        layout = Layout(**{**Layout.of(inp).__dict__, "interpreter": False})
        out = torch.empty(inp.q.shape, device="meta", dtype=dtype)
        lse = torch.empty(inp.lse_shape(), device="meta", dtype=torch.float32)
        split, merge, _, _, config = decode_arguments(inp, layout, out, lse, torch.empty_like(lse),
                                                      SM_COUNT_OF_ARCH[cc])
        specs.append(dict(kernel="decode_split", shape=shape, fn=zero_init_attention_decode_split_kernel,
                          arguments=split, num_warps=config.split_warps, num_stages=config.split_stages))
        specs.append(dict(kernel="decode_merge", shape=shape, fn=zero_init_attention_decode_merge_kernel,
                          arguments=merge, num_warps=config.merge_warps, num_stages=1))
    return specs


def _signature(fn, args: dict):
    """``(signature, constexprs, attrs)`` for ``ASTSource``, specialised as Triton's launcher would (integers
    equal to 1 become constants, pointers and integers divisible by 16 get the divisibility hint)."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = args[param.name]
        if (param.is_constexpr or value is None or isinstance(value, bool)
                or (isinstance(value, int) and value == 1)):
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"argument {param.name} of {fn.__name__} has unexpected type {type(value).__name__}")
    return signature, constexprs, attrs


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise FileNotFoundError(f"cuobjdump is not in the triton wheel (expected {tool})")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([tool, flag, handle.name], capture_output=True, text=True, check=True).stdout


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _compile_in_process(archs: tuple[str, ...], variants: tuple[tuple[str, int, int], ...],
                        shapes: Optional[tuple[str, ...]]) -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    rows = []
    for arch, (dtype, head_dim, prefix_len) in ((a, v) for a in archs for v in variants):
        cc = int(arch.removeprefix("sm_").rstrip("a"))
        for spec in decode_compile_specs(arch, _DTYPES[dtype], head_dim, prefix_len, shapes):
            signature, constexprs, attrs = _signature(spec["fn"], spec["arguments"])
            compiled = triton.compile(ASTSource(spec["fn"], signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                               "enable_fp_fusion": True})
            cubin = compiled.asm["cubin"]
            usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)",
                                                         _cuobjdump(cubin, "--dump-resource-usage"))}
            mnemonics = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)",
                                   _cuobjdump(cubin, "-sass"), flags=re.M)
            args = spec["arguments"]
            rows.append(dict(kernel=spec["kernel"], shape=spec["shape"], arch=arch, dtype=dtype, head_dim=head_dim,
                             config=f"BLOCK_M={args['BLOCK_M']}" + (f" BLOCK_N={args['BLOCK_N']}" if "BLOCK_N" in args
                                                                    else "")
                             + f" warps={spec['num_warps']} stages={spec['num_stages']} splits={args['num_splits']}",
                             registers=usage["REG"],
                             # ptxas places spilled registers in the thread's stack frame, in local memory.
                             spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0),
                             shared_bytes=compiled.metadata.shared + usage.get("SHARED", 0),
                             tensor_cores=sorted({m for m in mnemonics if m in ("HGMMA", "HMMA")}),
                             local_memory_instructions=sum(m in ("LDL", "STL") for m in mnemonics)))
    return rows


@functools.lru_cache(maxsize=None)
def _compile_cached(archs: tuple[str, ...], variants: tuple[tuple[str, int, int], ...],
                    shapes: Optional[tuple[str, ...]]) -> tuple[dict, ...]:
    from ._interpreter import interpreting
    if not interpreting():
        return tuple(_compile_in_process(archs, variants, shapes))
    # Interpreted functions cannot be compiled: compile in a child process with the interpreter off.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from fastadapter.kernels.decode import compile_decode_kernels; "
            f"json.dump(compile_decode_kernels({archs!r}, {variants!r}, {shapes!r}), sys.stdout)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the decode kernels in a child process failed:\n{result.stderr[-4000:]}")
    return tuple(json.loads(result.stdout))


def compile_decode_kernels(archs: Iterable[str] = ("sm_80", "sm_90"),
                           variants: Iterable[tuple[str, int, int]] = (("bf16", 128, 10),),
                           shapes: Optional[Iterable[str]] = None) -> list[dict]:
    """Compile every launch of :func:`decode_compile_specs` for each arch and each ``(dtype, head_dim,
    prefix_len)`` variant (dtype "bf16", "fp16" or "fp32"; default LLaMA-7B's) at ``shapes`` (keys of
    :data:`DECODE_COMPILE_SHAPES`; None: all) and read the cubins.

    Returns:
        One dict per (kernel, shape, arch, variant): ``kernel``, ``shape``, ``arch``, ``dtype``, ``head_dim``,
        ``config`` (tiles, warps, stages, splits), ``registers`` (per thread), ``spill_bytes`` (stack + local
        memory per thread), ``shared_bytes`` (per block), ``tensor_cores`` (HMMA/HGMMA families in the SASS),
        ``local_memory_instructions``.
    """
    shapes = None if shapes is None else tuple(shapes)
    return [dict(row) for row in _compile_cached(tuple(archs), tuple(tuple(v) for v in variants), shapes)]
