"""The ragged forms of the ``cpu`` backend's C++ kernels (issue 11): separate query and key offsets
(``cu_seqlens_q``/``cu_seqlens_k``), ``seqused_k`` over a padded KV cache (dense) and over packed keys (varlen).

The backend-independent grid is in test_ragged_attention.py; here the kernel variants this CPU runs (avx2 and
generic; avx512 where the CPU has it) with both kinds of products (MKL, register tiles) on every path of the
kernels (the decode split, the tiled forward, the backward's chunked word pass), what the kernels write where no
sequence reads (exact zeros, -inf), that the decode step over a ragged cache equals one call per row (the gathering
the thin model did), that the balanced split of ragged work does not change results with the thread count, and
the C++ checks of the new arguments.
"""
from __future__ import annotations

import re

import pytest
import torch

from fastadapter import zero_init_attention

from attention_cases import BF16, FP16, VARIANT_PRODUCTS, Case, backend_inputs, check_against_reference

#: One case per path of the kernels, odd sizes (97 keys, head dim 80), fp32/bf16/fp16.
VARIANT_RAGGED_CASES = [
    # decode split over packed keys of their own offsets (Sq_b <= 16), empty query and key sequences, tails
    Case(seqlens=[1, 9, 0, 4], seqlens_k=[97, 9, 5, 0], head_dim=80, prefix_batch=4, gate_shape="rows",
         unused_tail=3, unused_tail_k=2),
    # tiled forward and chunked backward: prefill chunks (Sq_b < Sk_b) reading part of their keys
    Case(seqlens=[20, 33], seqlens_k=[97, 40], seqused=[90, 33], head_dim=80, dtype=BF16),
    # the thin model's decode step: a padded cache [B, S_cache] read up to each row's length, GQA, fp16
    Case(batch=8, seqlen_q=1, seqlen_k=97, seqused=[97, 1, 0, 33, 64, 65, 2, 80], heads_q=8, heads_kv=2,
         head_dim=80, dtype=FP16),
    # tiled path with seqused_k < Sq: the first rows of row 1 see no key (word part 0, prefix only)
    Case(batch=3, seqlen_q=20, seqlen_k=97, seqused=[97, 10, 19], heads_q=4, heads_kv=1, prefix_batch=3),
    # not causal, MQA, per-sequence key counts in varlen mode
    Case(seqlens=[17, 1, 30], seqlens_k=[5, 97, 30], seqused=[5, 0, 29], heads_q=4, heads_kv=1, causal=False,
         dtype=BF16, gate_activation="none"),
]


@pytest.mark.parametrize("variant,gemm", VARIANT_PRODUCTS, ids=[f"{v}-{g}" for v, g in VARIANT_PRODUCTS])
@pytest.mark.parametrize("case", VARIANT_RAGGED_CASES, ids=lambda c: c.id)
def test_every_variant_and_product_runs_ragged_inputs_like_the_reference(case, variant, gemm, force_cpu_variant):
    """Forward and the gradient of every input against the fp32 reference."""
    force_cpu_variant(variant, gemm)
    check_against_reference(case, "cpu")


def _op_args(case: Case) -> dict:
    """``case`` as the keyword arguments of ``torch.ops.fastadapter_cpu.forward`` (validated by the Python layer)."""
    inp = backend_inputs(case)
    return dict(q=inp.q, k=inp.k, v=inp.v, prefix_k=inp.prefix_k, prefix_v=inp.prefix_v, gate=inp.gate,
                cu_seqlens_q=inp.cu_seqlens_q, cu_seqlens_k=inp.cu_seqlens_k, seqused_k=inp.seqused_k,
                max_seqlen_q=inp.max_seqlen_q, max_seqlen_k=inp.max_seqlen_k, causal=inp.causal,
                softmax_scale=inp.softmax_scale, gate_tanh=inp.gate_tanh)


def _forward_backward(args: dict, poison: bool = False):
    """The op's results and gradients. ``poison``: blocks of k's size filled with NaN are freed just before the
    backward, so that the allocator likely hands that memory to dk and dv (allocated uninitialised): a gradient
    row the kernels leave unwritten then shows up as NaN rather than as a lucky 0."""
    out, lse_w, lse_p = torch.ops.fastadapter_cpu.forward(**args)
    if poison:
        freed = [torch.full(args["k"].shape, float("nan")) for _ in range(16)]
        del freed
    grads = torch.ops.fastadapter_cpu.backward(grad_out=torch.randn(out.shape).to(out.dtype), out=out,
                                               lse_w=lse_w, lse_p=lse_p, **args)
    return out, lse_w, lse_p, grads


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seqlens", [[2, 0, 5], [20, 0, 18]], ids=["decode", "tiled"])
def test_what_no_sequence_reads_is_exactly_zero(seqlens, dtype):
    """Keys past seqused_k and key tokens after cu_seqlens_k[-1] get dk = dv = 0 (the kernels never read them:
    the backward allocates dk, dv uninitialised, so a row it forgets holds garbage); query tokens after
    cu_seqlens_q[-1] give out 0 and lse -inf; a sequence whose query rows see no key (seqused_k = 0) has
    lse_w -inf and only the gated prefix part."""
    case = Case(seqlens=seqlens, seqlens_k=[30, 6, 40], seqused=[11, 0, 40], unused_tail=4, unused_tail_k=5,
                head_dim=80, dtype=dtype)
    args = _op_args(case)
    out, lse_w, lse_p, (dq, dk, dv, *_) = _forward_backward(args, poison=True)
    cu_q, cu_k = args["cu_seqlens_q"].tolist(), args["cu_seqlens_k"].tolist()
    for n, used in enumerate(args["seqused_k"].tolist()):
        unread = slice(cu_k[n] + used, cu_k[n + 1])
        assert (dk[unread] == 0).all() and (dv[unread] == 0).all(), f"sequence {n}: keys past seqused_k"
        read = slice(cu_k[n], cu_k[n] + used)
        if used and seqlens[n]:
            assert dk[read].abs().sum() > 0 and dv[read].abs().sum() > 0, f"sequence {n}: keys it reads"
    assert (dk[cu_k[-1]:] == 0).all() and (dv[cu_k[-1]:] == 0).all(), "key tokens after the last sequence"
    tail = slice(cu_q[-1], None)
    assert (out[tail] == 0).all() and (dq[tail] == 0).all()
    assert (lse_w[:, tail] == float("-inf")).all() and (lse_p[:, tail] == float("-inf")).all()
    no_key = slice(cu_q[1], cu_q[2])  # sequence 1: seqused_k = 0
    if seqlens[1]:
        assert (lse_w[:, no_key] == float("-inf")).all() and torch.isfinite(lse_p[:, no_key]).all()


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_decode_over_a_ragged_cache_equals_one_call_per_row(dtype):
    """One call with seqused_k over the padded cache [8, S_cache] is what the thin model computed by gathering
    each row's keys and calling the op once per row (the rows' results agree to fp32 rounding: the split of the
    cache into chunks differs)."""
    lengths = [97, 1, 0, 300, 64, 65, 2, 129]
    torch.manual_seed(3)
    q = torch.randn(8, 1, 8, 80).to(dtype)
    k, v = (torch.randn(8, 320, 2, 80).to(dtype) for _ in range(2))
    pk, pv = (torch.randn(8, 10, 2, 80).to(dtype) for _ in range(2))
    gate = torch.randn(8, 8)
    out = zero_init_attention(q, k, v, pk, pv, gate, seqused_k=torch.tensor(lengths, dtype=torch.int32),
                              backend="cpu")
    for row, length in enumerate(lengths):
        alone = zero_init_attention(q[row:row + 1], k[row:row + 1, :length], v[row:row + 1, :length],
                                    pk[row:row + 1], pv[row:row + 1], gate[row:row + 1], backend="cpu")
        torch.testing.assert_close(out[row:row + 1], alone, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5 if dtype == torch.float32 else 1e-2, msg=f"row {row}")


@pytest.mark.parametrize("case", [VARIANT_RAGGED_CASES[0], VARIANT_RAGGED_CASES[1]], ids=["decode", "tiled"])
def test_thread_count_changes_only_the_rounding_of_ragged_work(case):
    """The kernels split ragged work by cost (decode chunks, forward tiles, the backward's chunks per sequence)
    and that split follows the thread count: any count gives the same results within rounding."""
    args = {name: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for name, t in _op_args(case).items()}
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 5):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            results.append(_forward_backward(args))
    finally:
        torch.set_num_threads(threads)
    (*fwd_a, grads_a), (*fwd_b, grads_b) = results
    for a, b in zip([*fwd_a, *grads_a], [*fwd_b, *grads_b]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


CPP_BAD_RAGGED = [
    (dict(cu_seqlens_k=None), r"cu_seqlens_q and cu_seqlens_k come together \(varlen\) or not at all \(dense\), "
                              r"got only cu_seqlens_q"),
    (dict(cu_seqlens_k=_i32(0, 3, 5, 9)), "must describe the same number of sequences, got 2 and 3"),
    (dict(cu_seqlens_k=_i32(0, 3, 10)), r"cu_seqlens_k must start at 0 and end at most at the number of tokens "
                                        r"\(9\), got 0 and 10"),
    (dict(max_seqlen_k=5), r"cu_seqlens_k must be non-decreasing with sequences no longer than max_seqlen_k \(5\); "
                           r"sequence 1 spans \[3, 9\)"),
    (dict(max_seqlen_k=2 ** 40), r"max_seqlen_k must be at most the 9 packed tokens, got 1099511627776"),
    (dict(seqused_k=_i32(3)), r"seqused_k must be a CPU int32 tensor \[2\] \(one length per sequence\)"),
    (dict(seqused_k=torch.tensor([3, 6])), "seqused_k must be a CPU int32 tensor"),
    (dict(seqused_k=_i32(3, 7)), r"seqused_k\[1\] must be between 0 and the 6 keys sequence 1 holds, got 7"),
    (dict(seqused_k=_i32(-1, 2)), r"seqused_k\[0\] must be between 0 and the 3 keys sequence 0 holds, got -1"),
    (dict(seqused_k=_i32(3, 0, 6, 0)[::2]), "seqused_k must be contiguous"),
]


@pytest.mark.parametrize("overrides,message", CPP_BAD_RAGGED, ids=[m for _, m in CPP_BAD_RAGGED])
def test_cpp_checks_of_the_ragged_arguments_say_what_was_expected(overrides, message):
    """The C++ ops check the offsets and seqused_k themselves, for callers of torch.ops.fastadapter_cpu."""
    q, k = torch.randn(6, 4, 8), torch.randn(9, 2, 8)
    pk = torch.randn(1, 3, 2, 8)
    args = dict(q=q, k=k, v=k, prefix_k=pk, prefix_v=pk, gate=torch.zeros(1, 4), cu_seqlens_q=_i32(0, 2, 6),
                cu_seqlens_k=_i32(0, 3, 9), seqused_k=None, max_seqlen_q=4, max_seqlen_k=6, causal=True,
                softmax_scale=0.3, gate_tanh=True)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastadapter_cpu.forward(**{**args, **overrides})


def test_dense_seqused_k_must_have_one_length_per_row():
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 5, 2, 8)
    pk = torch.randn(1, 3, 2, 8)
    args = dict(q=q, k=k, v=k, prefix_k=pk, prefix_v=pk, gate=torch.zeros(1, 4), cu_seqlens_q=None,
                cu_seqlens_k=None, seqused_k=_i32(5, 6), max_seqlen_q=0, max_seqlen_k=0, causal=True,
                softmax_scale=0.3, gate_tanh=True)
    with pytest.raises(RuntimeError, match=r"seqused_k\[1\] must be between 0 and the 5 keys sequence 1 holds"):
        torch.ops.fastadapter_cpu.forward(**args)


@pytest.mark.slow  # ~20 s of compiling; the dense trace runs by default (test_cpu_backend.py)
def test_ragged_ops_trace_under_torch_compile():
    """The fake kernels (fastadapter/_cpu_extension.py) take the ragged arguments: [Hq, Tq] log-sum-exps."""
    args = _op_args(VARIANT_RAGGED_CASES[1])
    args = {name: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for name, t in args.items()}
    rest = {name: value for name, value in args.items() if name not in ("q", "k", "v")}

    def attention(q, k, v):
        out, lse_w, _ = torch.ops.fastadapter_cpu.forward(q=q, k=k, v=v, **rest)
        return out * 2, lse_w

    eager = attention(args["q"], args["k"], args["v"])
    compiled = torch.compile(attention, fullgraph=True)(args["q"], args["k"], args["v"])
    assert eager[1].shape == (args["q"].shape[1], args["q"].shape[0])
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)


def test_ragged_benchmark_prints_and_saves_its_tables(tmp_path, capsys):
    """benchmarks/cpu_ragged.py at toy sizes: both tables, every provider, saved with its metadata."""
    from fastadapter.benchmarks import cpu_ragged
    out = tmp_path / "ragged.txt"
    assert cpu_ragged.main(["--repeats", "1", "--dtypes", "fp32", "--decode-lengths", "9", "1", "4",
                            "--prefill-lengths", "5", "1", "3", "--heads", "2", "--head-dim", "8",
                            "--prefix-len", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "# ragged decode step: 3 rows, cache lengths [9, 1, 4]" in text and "# packed prefill" in text
    rows = [line for line in text.splitlines() if line.startswith("fp32")]
    assert len(rows) == 3 and all(len(re.findall(r"\d+\.\d+", row)) >= 4 for row in rows), rows
    assert out.with_suffix(".json").exists()
