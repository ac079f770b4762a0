"""The scratch memory the cpu backend's kernels keep between calls (csrc/workspace.h): a call never reads what an
earlier one left there, the memory kept stays within FASTADAPTER_CPU_WORKSPACE_MB, each calling thread has its
own, and release_workspace frees it."""
import dataclasses
import threading

import pytest
import torch

from fastadapter.backends import get_backend
from fastadapter.backends.cpu import release_workspace, workspace_bytes

from attention_cases import BF16, VARIANT_PRODUCTS, Case, backend_inputs

#: Shapes on every path that takes scratch memory: GQA with odd sizes (97, head dim 80), MHA at a head dim with a
#: partial AMX chunk (136) and an odd prompt, a prompt wider than a column tile, and ragged packed sequences with
#: their own key offsets and unused tokens after them.
CASES = [
    Case(batch=2, seqlen_q=97, seqlen_k=97, head_dim=80),
    Case(batch=1, seqlen_q=33, seqlen_k=33, heads_q=3, heads_kv=3, head_dim=136, prefix_len=7),
    Case(batch=1, seqlen_q=70, seqlen_k=130, heads_q=4, heads_kv=1, head_dim=48, prefix_len=17, causal=False),
    Case(seqlens=[33, 1, 70], seqlens_k=[40, 97, 70], unused_tail=3, unused_tail_k=5, head_dim=64, prefix_len=3,
         prefix_batch=3, gate_shape="rows"),
]


def _forward_backward(inp):
    """Every result of the cpu backend's forward and backward on ``inp`` (a fixed output gradient)."""
    backend = get_backend("cpu")
    out, lse_w, lse_p = backend.forward(inp)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, lse_w, lse_p) + tuple(backend.backward(inp, out, lse_w, lse_p, grad_out))


@pytest.mark.parametrize("variant,gemm", VARIANT_PRODUCTS, ids=[f"{v}-{g}" for v, g in VARIANT_PRODUCTS])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_a_call_never_reads_what_an_earlier_call_left(variant, gemm, dtype, force_cpu_variant, monkeypatch):
    """Every element of the kept memory set to NaN (fill_workspace(255)) before a call leaves its results bit for
    bit those of a call on memory of its own (FASTADAPTER_CPU_WORKSPACE_MB=0): the kernels write every element
    of a packed panel they read, padding included, and zero dq's copies before adding into them."""
    force_cpu_variant(variant, gemm)
    for case in CASES:
        inp = backend_inputs(Case(**{**case.__dict__, "dtype": dtype}))
        monkeypatch.setenv("FASTADAPTER_CPU_WORKSPACE_MB", "0")
        release_workspace()
        want = _forward_backward(inp)
        assert workspace_bytes() == 0
        monkeypatch.delenv("FASTADAPTER_CPU_WORKSPACE_MB")
        _forward_backward(inp)
        torch.ops.fastadapter_cpu.fill_workspace(255)
        got = _forward_backward(inp)
        for name, g, w in zip(("out", "lse_w", "lse_p", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate"), got,
                              want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f"{case.id}: {name}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant,gemm", VARIANT_PRODUCTS, ids=[f"{v}-{g}" for v, g in VARIANT_PRODUCTS])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_a_task_never_reads_what_an_earlier_task_on_its_thread_left(variant, gemm, dtype, threads,
                                                                     force_cpu_variant):
    """A thread's scratch goes from task to task holding the last task's values (on AMX, the backward's panels,
    key flags and fp32 dq rows of one (sequence, kv head) at a time). The longest sequence of a ragged batch runs
    first; NaN and infinities in its q, k, v and output gradient, at rows past the shorter sequences' lengths,
    leave the shorter sequences' outputs and gradients bit for bit as they are with finite values there: each
    task writes what it reads (the key flags included: row 60 of the long sequence's keys is NaN, row 60 the last
    key of the next sequence)."""
    force_cpu_variant(variant, gemm)
    inp = backend_inputs(Case(seqlens=[97, 61, 33], heads_q=4, heads_kv=2, head_dim=80, prefix_len=3,
                              dtype=dtype))
    poisoned = {name: getattr(inp, name).clone() for name in ("q", "k", "v")}
    for t in poisoned.values():
        t[33:97:3] = float("nan")
        t[34:97:5] = float("inf")
    poisoned["k"][60] = float("nan")
    grad_out = torch.randn(inp.q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    poisoned_grad = grad_out.clone()
    poisoned_grad[33:97:4] = float("nan")
    backend = get_backend("cpu")
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for problem, g in ((inp, grad_out), (dataclasses.replace(inp, **poisoned), poisoned_grad)):
            out, lse_w, lse_p = backend.forward(problem)
            dq, dk, dv = backend.backward(problem, out, lse_w, lse_p, g)[:3]
            results.append({"out": out, "dq": dq, "dk": dk, "dv": dv})
    finally:
        torch.set_num_threads(kept)
    clean, dirty = results
    assert dirty["dq"][:97].isnan().any(), "the poisoned sequence's gradients should show its NaN"
    for name in clean:
        torch.testing.assert_close(dirty[name][97:], clean[name][97:], rtol=0, atol=0, msg=name)


def test_more_threads_never_take_more_memory_for_the_forwards_panels(force_cpu_variant):
    """On AMX each thread packs the forward's kᵀ and v panels of one (sequence, kv head) at a time into its own,
    sized for the longest sequence, where those take no more memory than the panels of the whole call; with more
    threads than that allows (here 8 threads over one sequence's one kv head) the call's panels serve them all."""
    force_cpu_variant("avx512", "amx")
    inp = backend_inputs(Case(batch=1, seqlen_q=1024, seqlen_k=1024, heads_q=4, heads_kv=1, head_dim=128,
                              prefix_len=0, dtype=BF16))
    backend = get_backend("cpu")
    kept = torch.get_num_threads()
    held = {}
    try:
        for threads in (1, 8):
            torch.set_num_threads(threads)
            release_workspace()
            out = backend.forward(inp)[0]
            held[threads] = workspace_bytes()
            torch.set_num_threads(1)
            torch.testing.assert_close(out, backend.forward(inp)[0], rtol=0, atol=0)
    finally:
        torch.set_num_threads(kept)
        release_workspace()
    assert 0 < held[8] <= held[1], held


def test_kept_memory_stays_within_the_limit_and_is_released(monkeypatch):
    """A call keeps its scratch memory for the next one (default limit); FASTADAPTER_CPU_WORKSPACE_MB bounds what is
    kept (a buffer past it lives for its call only); release_workspace frees it all. On this CPU's own variant."""
    # dq's fp32 copies alone are 1024 x 4 x 128 x 4 bytes: 2 MiB.
    inp = backend_inputs(Case(batch=1, seqlen_q=1024, seqlen_k=1024, heads_q=4, heads_kv=4, head_dim=128))
    release_workspace()
    assert workspace_bytes() == 0
    want = _forward_backward(inp)
    kept = workspace_bytes()
    assert kept > (1 << 20)
    _forward_backward(inp)
    assert workspace_bytes() == kept  # the same buffers again
    release_workspace()
    monkeypatch.setenv("FASTADAPTER_CPU_WORKSPACE_MB", "1")
    got = _forward_backward(inp)
    assert workspace_bytes() <= (1 << 20)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    release_workspace()
    assert workspace_bytes() == 0


def test_each_calling_thread_keeps_its_own_memory():
    """Calls from other threads, at the same time, give the results of calls from this one and leave this thread's
    kept memory as it was. On this CPU's own variant."""
    inputs = [backend_inputs(c) for c in CASES]
    want = [_forward_backward(inp) for inp in inputs]
    kept = workspace_bytes()
    failures, bytes_seen = [], []

    def work(shift: int) -> None:
        try:
            for step in range(6):
                i = (shift + step) % len(inputs)
                for g, w in zip(_forward_backward(inputs[i]), want[i]):
                    torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
            bytes_seen.append(workspace_bytes())
            release_workspace()
        except Exception as error:  # noqa: BLE001 (reported in the main thread)
            failures.append(error)
    threads = [threading.Thread(target=work, args=(shift,)) for shift in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert len(bytes_seen) == 3 and all(b > 0 for b in bytes_seen)
    assert workspace_bytes() == kept


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_a_bad_limit_says_what_was_expected(value, monkeypatch):
    monkeypatch.setenv("FASTADAPTER_CPU_WORKSPACE_MB", value)
    inp = backend_inputs(Case(batch=1, seqlen_q=40, seqlen_k=40))
    with pytest.raises(RuntimeError, match=f"FASTADAPTER_CPU_WORKSPACE_MB must be a whole number of MiB .*got "
                                           f"'{value}'"):
        get_backend("cpu").forward(inp)
