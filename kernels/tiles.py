"""``@triton.jit`` building blocks shared by the forward and backward kernels.

Every kernel addresses its tensors the same way: a program owns one (sequence, head) pair; the sequence's first
token is ``token0`` (0 in batched mode; in varlen mode ``cu_seqlens_q[b]`` for q, out, their gradients and row
statistics, ``cu_seqlens_k[b]`` for k, v and theirs) and its base pointer is
``ptr + b * stride_b + token0 * stride_s + head * stride_h`` (``stride_b`` is 0 in varlen mode). Rows of a tile
are then ``row * stride_s`` away and the head dimension is contiguous.
"""
import triton
import triton.language as tl

#: log2(e) and ln(2): the kernels work with exp2 (one MUFU instruction) and convert at the boundaries.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: Key tile of the masked (causal diagonal, ragged last) tiles: narrower than the unmasked loop's ``BLOCK_N`` (a
#: divisor of every ``BLOCK_N``) so that setting the value tile's non-finite numbers to 0 there costs no spill.
MASKED_BLOCK_N = tl.constexpr(16)


@triton.jit
def tile_and_row(pid, seqlen, BLOCK: tl.constexpr):
    """``(tile, batch·head row)`` of a program of a flattened 1-D grid, tiles of one head adjacent.

    One grid axis, not two: CUDA caps the second axis at 65535 programs, which ``B · H`` exceeds with a few
    thousand packed sequences; adjacent programs then also share their head's k/v tiles in L2.
    """
    tiles = tl.cdiv(seqlen, BLOCK)
    return pid % tiles, pid // tiles


@triton.jit
def query_bounds(CU_SEQLENS_Q, b, seqlen_q, VARLEN: tl.constexpr):
    """``(q_token0, n_q)`` of sequence ``b``: its first query token and its query count."""
    q_token0 = 0
    n_q = seqlen_q
    if VARLEN:
        q_token0 = tl.load(CU_SEQLENS_Q + b)
        n_q = tl.load(CU_SEQLENS_Q + b + 1) - q_token0
    return q_token0, n_q


@triton.jit
def sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr,
                    SHARED_OFFSETS: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """``(q_token0, k_token0, n_q, n_k)`` of sequence ``b``: the first query and key token, and how many queries
    and keys it has. Dense: 0, 0, Sq and Sk; varlen: from ``cu_seqlens_q`` and ``cu_seqlens_k`` (read once when
    ``SHARED_OFFSETS``: packed self-attention, whose kernels then keep one token offset in registers, not two);
    with ``seqused_k`` the sequence uses only its first ``seqused_k[b]`` keys (a padded KV cache)."""
    q_token0, n_q = query_bounds(CU_SEQLENS_Q, b, seqlen_q, VARLEN)
    k_token0 = 0
    n_k = seqlen_k
    if VARLEN:
        if SHARED_OFFSETS:
            k_token0 = q_token0
            n_k = n_q
        else:
            k_token0 = tl.load(CU_SEQLENS_K + b)
            n_k = tl.load(CU_SEQLENS_K + b + 1) - k_token0
    if HAS_SEQUSED:
        n_k = tl.load(SEQUSED_K + b)
    return q_token0, k_token0, n_q, n_k


@triton.jit
def head_base(ptr, b, token0, head, stride_b, stride_s, stride_h):
    """Pointer to the first row of ``(sequence b, head)``; 64-bit offsets so large batches cannot overflow."""
    return (ptr + tl.cast(b, tl.int64) * stride_b + tl.cast(token0, tl.int64) * stride_s
            + tl.cast(head, tl.int64) * stride_h)


@triton.jit
def load_rows(base, stride_row, rows, n_rows, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile ``[len(rows), BLOCK_D]``; rows ``>= n_rows`` and columns ``>= HEAD_DIM`` (padding) read as 0.

    Row offsets are 64-bit: ``row · stride_row`` passes 2^31 for long sequences or views into fused qkv rows.
    """
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (cols[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(base, stride_row, rows, n_rows, cols, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a ``[len(rows), BLOCK_D]`` tile, skipping padding rows and columns (64-bit row offsets)."""
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None].to(tl.int64) * stride_row + cols[None, :], value, mask=mask)


@triton.jit
def dot(a, b, INTERPRETER: tl.constexpr):
    """``a @ b`` accumulated in fp32.

    fp32 operands are multiplied in IEEE precision (TF32 would lose the accuracy fp32 callers ask for). Under
    the interpreter, where ``tl.dot`` on bf16 operands is broken (triton issue 11584), fp16/bf16 operands are
    upcast first: exact products, as the tensor cores give. Compiled fp16/bf16 dots go to the tensor cores.
    """
    if INTERPRETER or a.dtype == tl.float32 or b.dtype == tl.float32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def to_dtype(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest even as the GPU's ``cvt.rn`` does.

    The interpreter truncates fp32 -> bf16 (rounds toward zero): a bias that adds up over long sums (the
    probabilities fed to ``P·V`` and ``Pᵀ·dO``) and makes the interpreted kernels look less accurate than the
    compiled ones. Round explicitly there: add half an ulp of bf16 (ties to even) and drop the low 16 bits.
    """
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def gate_value(GATE, b, head, stride_gb, stride_gh, GATE_TANH: tl.constexpr):
    """γ of (sequence b, head): ``tanh(gate)`` or the raw gate. ``stride_gb`` is 0 for one gate row."""
    g = tl.load(GATE + tl.cast(b, tl.int64) * stride_gb + tl.cast(head, tl.int64) * stride_gh)
    if GATE_TANH:
        # tanh(x) = 2·sigmoid(2x) − 1: exact 0 at 0 (the zero-init property) and available in the interpreter.
        g = 2.0 * tl.sigmoid(2.0 * g) - 1.0
    return g


@triton.jit
def load_lse(LSE, rows, n_rows):
    """Saved log-sum-exps of ``rows`` in log2 units, ready for ``exp2(s·scale·log2e − lse)``.

    A row with nothing visible saved ``-inf``; it is read as ``+inf`` so that its probabilities are exactly 0
    (``exp2(s − (−inf))`` would be inf). Rows past the sequence read ``+inf`` too.
    """
    lse = tl.load(LSE + rows, mask=rows < n_rows, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * LOG2E


@triton.jit
def stats_offset(b, head, token0, stride_lb, stride_lh):
    """Offset of the first row statistic (lse, D) of (sequence b, head), 64-bit (``head · T`` for varlen)."""
    return tl.cast(b, tl.int64) * stride_lb + tl.cast(head, tl.int64) * stride_lh + token0


@triton.jit
def visible_key_range(start_m, n_q, n_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(n_full, n_hi)`` for the query tile starting at ``start_m``: keys ``[0, n_full)`` are whole ``BLOCK_N``
    tiles every row of the tile sees (no mask), ``[n_full, n_hi)`` need the causal/length mask, and keys from
    ``n_hi`` on are seen by no row (never loaded). Causal is bottom-right aligned: row i sees ``j <= i + n_k - n_q``.
    """
    if CAUSAL:
        shift = n_k - n_q
        n_hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), n_k)
        n_full = tl.minimum(tl.maximum(start_m + 1 + shift, 0), n_k) // BLOCK_N * BLOCK_N
    else:
        n_hi = n_k
        n_full = n_k // BLOCK_N * BLOCK_N
    return n_full, n_hi


@triton.jit
def load_prefix(PREFIX, b, kv_head, stride_b, stride_s, stride_h, prefix_len, cols, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """The whole prefix of (sequence b, kv head) as one ``[BLOCK_P, BLOCK_D]`` tile (padding slots read 0).

    ``stride_b`` is 0 when one prompt serves the batch.
    """
    base = PREFIX + tl.cast(b, tl.int64) * stride_b + tl.cast(kv_head, tl.int64) * stride_h
    return load_rows(base, stride_s, tl.arange(0, BLOCK_P), prefix_len, cols, HEAD_DIM, BLOCK_D)


@triton.jit
def online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows, cols, n_lo, n_hi, n_k, shift,
                qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr):
    """Online softmax of the query tile ``q`` over the key tiles ``[n_lo, n_hi)`` (``n_lo`` a multiple of
    ``BLOCK_N``): returns the updated ``(acc [BLOCK_M, BLOCK_D], l_i [BLOCK_M], m_i [BLOCK_M])``, max in log2 units.

    Keys ``>= n_k`` read as 0; ``MASKED`` tiles hide them and, when ``CAUSAL``, the keys row ``rows[r]`` must not
    see (``j > rows[r] + shift``, bottom-right alignment). The forward kernel passes the sequence's key count as
    ``n_k``; the decode split kernel passes its chunk's end and each stacked row's query index as ``rows``.

    A row's output depends only on the values it sees: in a causal ``MASKED`` tile a non-finite value hidden from
    a row would reach it through ``p · v = 0 · NaN``. There the product runs over the value tile with its
    non-finite numbers set to 0, and a row that sees a key whose value row held one gets NaN probabilities for it
    (a ``[BLOCK_N]`` reduction of the value tile, elementwise on ``p``; no second product, no extra accumulator),
    which makes its ``l_i`` and ``acc`` NaN. The unmasked tiles are untouched.
    """
    for start_n in tl.range(n_lo, n_hi, BLOCK_N, num_stages=1 if MASKED and CAUSAL else None):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, stride_ks, keys, n_k, cols, HEAD_DIM, BLOCK_D)
        s = dot(q, tl.trans(k), INTERPRETER) * qk_scale
        if MASKED:
            visible = keys[None, :] < n_k
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        # -- update the running max; a row that has seen nothing yet keeps -inf and uses 0 as its reference
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        # -- rescale what was accumulated under the old max, add this tile
        v = load_rows(v_base, stride_vs, keys, n_k, cols, HEAD_DIM, BLOCK_D)
        if MASKED and CAUSAL:
            v_zero = v * 0.0  # 0 where v is finite, NaN where it is NaN or infinite (v's dtype)
            key_nan = tl.sum(v_zero, 1).to(tl.float32)  # [BLOCK_N]: NaN for a value row holding a non-finite
            v = tl.where(v_zero == 0.0, v, 0.0).to(v.dtype)
            p = p + tl.where(visible, key_nan[None, :], 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(to_dtype(p, v.dtype, INTERPRETER), v, INTERPRETER)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def prefix_softmax(q, PREFIX_K, PREFIX_V, b, kv_head, stride_pkb, stride_pks, stride_pkh, stride_pvb, stride_pvs,
                   stride_pvh, prefix_len, cols, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_P: tl.constexpr, INTERPRETER: tl.constexpr):
    """The prefix part of the query tile ``q [BLOCK_M, BLOCK_D]``: its own softmax over the whole prompt of
    (sequence b, kv head) as one tile. Returns ``(out_p [BLOCK_M, BLOCK_D], lse_p [BLOCK_M])``: the normalised
    ``softmax(S_p) prefix_v`` (before the gate) and the log-sum-exp in natural log."""
    slots = tl.arange(0, BLOCK_P)
    pk = load_prefix(PREFIX_K, b, kv_head, stride_pkb, stride_pks, stride_pkh, prefix_len, cols, HEAD_DIM,
                     BLOCK_D, BLOCK_P)
    s_p = dot(q, tl.trans(pk), INTERPRETER) * qk_scale
    s_p = tl.where(slots[None, :] < prefix_len, s_p, float("-inf"))
    m_p = tl.max(s_p, 1)
    p_p = tl.exp2(s_p - m_p[:, None])
    l_p = tl.sum(p_p, 1)
    pv = load_prefix(PREFIX_V, b, kv_head, stride_pvb, stride_pvs, stride_pvh, prefix_len, cols, HEAD_DIM,
                     BLOCK_D, BLOCK_P)
    out_p = dot(to_dtype(p_p, pv.dtype, INTERPRETER), pv, INTERPRETER) / l_p[:, None]
    return out_p, (m_p + tl.log2(l_p)) * LN2
