"""The targets of the compiled CPU kernels (issue 3), measured side by side: ``python -m benchmarks.cpu_kernel_targets``.

At LLaMA-7B attention shapes (B = 1, H = 32, D = 128, P = 10), fp32 and bf16, against the baselines of
``benchmarks/baselines.py``:

* forward + backward: >= 3x faster than ``eager_v1`` and at least as fast as ``two_sdpa`` (S = 512, 2048);
* forward alone: >= 1.1x ``two_sdpa``;
* decode (Sq = 1 over a KV cache of Sk = 512..4096, B = 1..8): >= 1.5x ``two_sdpa``;
* bytes saved for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``) = the inputs, the output
  and the two fp32 log-sum-exps, nothing else.

``--compare-mkl`` adds a table of the register tiles against MKL products in the same kernel variant
(``FASTADAPTER_CPU_GEMM=mkl``); ``FASTADAPTER_CPU_ISA=avx2`` runs the whole benchmark on the AVX2 variant (save
it with ``--out benchmarks/results/cpu-kernel-targets-avx2.txt``). The variant that ran is printed first.

The tables are printed and saved to ``benchmarks/results/cpu-kernel-targets.txt`` (``--out``), with the machine,
library versions and git commit beside them (``.json``). The machine is shared, so timings are interleaved: every repetition runs each provider once, in turn, and the
table reports the median of the repetitions and the ratios of those medians, all from one process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import time

import torch

from .baselines import eager_v1, two_sdpa
from .metadata import collect_metadata
from fastadapter import _cpu_extension, zero_init_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fastadapter_cpu(q, k, v, prefix_k, prefix_v, gate, gate_tanh: bool = True):
    return zero_init_attention(q, k, v, prefix_k, prefix_v, gate, gate_activation="tanh" if gate_tanh else "none",
                               backend="cpu")


@contextlib.contextmanager
def _mkl_products():
    """FASTADAPTER_CPU_GEMM=mkl for the calls inside (the kernels read it on every call)."""
    before = os.environ.get("FASTADAPTER_CPU_GEMM")
    os.environ["FASTADAPTER_CPU_GEMM"] = "mkl"
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTADAPTER_CPU_GEMM"]
        else:
            os.environ["FASTADAPTER_CPU_GEMM"] = before


def fastadapter_cpu_mkl(*args, **kwargs):
    with _mkl_products():
        return fastadapter_cpu(*args, **kwargs)


def _forward_backward_mkl(args):
    grad = torch.randn(args[0].shape, dtype=args[0].dtype)

    def run():
        with _mkl_products():
            out = fastadapter_cpu(*args)
            torch.autograd.grad(out, args, grad)
    return run


def mkl_rows(seqlens, dtypes, repeats):
    """Register tiles against MKL products of the same variant: prefill forward and forward + backward."""
    rows = []
    for dt in dtypes:
        for seqlen in seqlens:
            args = make_inputs(1, seqlen, seqlen, 32, 128, 10, DTYPES[dt], requires_grad=True)
            fwd = interleaved_medians({"tiles": _forward(fastadapter_cpu, args),
                                       "mkl": _forward(fastadapter_cpu_mkl, args)}, repeats)
            fb = interleaved_medians({"tiles": _forward_backward(fastadapter_cpu, args),
                                      "mkl": _forward_backward_mkl(args)}, repeats)
            rows.append((dt, seqlen, fwd, fb))
    return rows


def make_inputs(batch, seqlen_q, seqlen_k, heads, head_dim, prefix_len, dtype, requires_grad):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)
    return (randn(batch, seqlen_q, heads, head_dim), randn(batch, seqlen_k, heads, head_dim),
            randn(batch, seqlen_k, heads, head_dim), randn(1, prefix_len, heads, head_dim),
            randn(1, prefix_len, heads, head_dim), (0.5 * torch.randn(heads)).requires_grad_(requires_grad))


def _forward(fn, args):
    def run():
        with torch.no_grad():
            fn(*args)
    return run


def _forward_backward(fn, args):
    grad = torch.randn(args[0].shape, dtype=args[0].dtype)

    def run():
        out = fn(*args)
        torch.autograd.grad(out, args, grad)
    return run


def interleaved_medians(runs: dict, repeats: int, warmup: int = 1, rotate: bool = False) -> dict:
    """Median seconds of each callable, every repetition running all of them once, in turn. ``rotate``: each
    repetition starts one provider later, so that none always runs right after the same other one (a backward
    measured 6-10% slower or faster by its place in the order alone)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        shift = repeat % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def saved_bytes(fn, args) -> int:
    """Bytes of the distinct storages autograd saves for backward when running ``fn(*args)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def prefill_rows(seqlens, dtypes, repeats, with_eager):
    rows = []
    for dt in dtypes:
        for seqlen in seqlens:
            args = make_inputs(1, seqlen, seqlen, 32, 128, 10, DTYPES[dt], requires_grad=True)
            fwd = interleaved_medians({"cpu": _forward(fastadapter_cpu, args),
                                       "two_sdpa": _forward(two_sdpa, args)}, repeats)
            providers = {"cpu": fastadapter_cpu, "two_sdpa": two_sdpa}
            if with_eager:
                providers["eager_v1"] = eager_v1
            fb = interleaved_medians({n: _forward_backward(f, args) for n, f in providers.items()}, repeats)
            rows.append((dt, seqlen, fwd, fb))
    return rows


def decode_rows(seqlens_k, batches, dtypes, repeats):
    rows = []
    for dt in dtypes:
        for batch in batches:
            for seqlen_k in seqlens_k:
                args = make_inputs(batch, 1, seqlen_k, 32, 128, 10, DTYPES[dt], requires_grad=False)
                med = interleaved_medians({"cpu": _forward(fastadapter_cpu, args),
                                           "two_sdpa": _forward(two_sdpa, args)}, repeats)
                rows.append((dt, batch, seqlen_k, med))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per provider (median)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--decode-seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-eager", action="store_true", help="skip eager_v1 (it materialises S×S scores)")
    parser.add_argument("--compare-mkl", action="store_true",
                        help="add a table of the register tiles against MKL products (FASTADAPTER_CPU_GEMM=mkl)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" /
                        "cpu-kernel-targets.txt", help="where to save the printed tables (and a .json of metadata)")
    args = parser.parse_args(argv)
    lines = []

    def emit(text: str = "") -> None:  # print, and keep the line for --out
        print(text)
        lines.append(text)

    torch.manual_seed(0)
    emit(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=1 H=32 D=128 P=10; "
         f"median of {args.repeats} interleaved runs (shared machine: ratios are the figures to read)")
    path = _cpu_extension.cpu_path()
    emit(f"cpu kernels: {path[0]} variant, {path[1]}" if path else "cpu kernels: unavailable")

    emit("\n# prefill (causal, Sq = Sk): milliseconds and speed-ups of fastadapter cpu")
    emit(f"{'dtype':<5} {'S':>5} | {'fwd cpu':>8} {'fwd 2sdpa':>9} {'x2sdpa':>7} (>=1.1) | {'f+b cpu':>8} "
         f"{'f+b 2sdpa':>9} {'x2sdpa':>7} (>=1.0) {'f+b eager':>9} {'xeager':>7} (>=3)")
    for dt, seqlen, fwd, fb in prefill_rows(args.seqlens, args.dtypes, args.repeats, not args.no_eager):
        eager = (f"{1e3 * fb['eager_v1']:9.1f} {fb['eager_v1'] / fb['cpu']:7.2f}" if "eager_v1" in fb else
                 f"{'-':>9} {'-':>7}")
        emit(f"{dt:<5} {seqlen:>5} | {1e3 * fwd['cpu']:8.1f} {1e3 * fwd['two_sdpa']:9.1f} "
             f"{fwd['two_sdpa'] / fwd['cpu']:7.2f}         | {1e3 * fb['cpu']:8.1f} {1e3 * fb['two_sdpa']:9.1f} "
             f"{fb['two_sdpa'] / fb['cpu']:7.2f}         {eager}")

    emit("\n# decode (Sq = 1, causal bottom-right over the cache): milliseconds, speed-up (target >= 1.5)")
    emit(f"{'dtype':<5} {'B':>2} {'Sk':>5} | {'cpu':>7} {'2sdpa':>7} {'x2sdpa':>7}")
    for dt, batch, seqlen_k, med in decode_rows(args.decode_seqlens, args.decode_batches, args.dtypes,
                                                args.repeats):
        emit(f"{dt:<5} {batch:>2} {seqlen_k:>5} | {1e3 * med['cpu']:7.2f} {1e3 * med['two_sdpa']:7.2f} "
             f"{med['two_sdpa'] / med['cpu']:7.2f}")

    if args.compare_mkl:
        emit("\n# register tiles against MKL products (FASTADAPTER_CPU_GEMM=mkl), same variant: ms, speed-up")
        emit(f"{'dtype':<5} {'S':>5} | {'fwd tile':>8} {'fwd mkl':>8} {'xmkl':>6} | {'f+b tile':>8} {'f+b mkl':>8} "
             f"{'xmkl':>6}")
        for dt, seqlen, fwd, fb in mkl_rows(args.seqlens, args.dtypes, args.repeats):
            emit(f"{dt:<5} {seqlen:>5} | {1e3 * fwd['tiles']:8.1f} {1e3 * fwd['mkl']:8.1f} "
                 f"{fwd['mkl'] / fwd['tiles']:6.2f} | {1e3 * fb['tiles']:8.1f} {1e3 * fb['mkl']:8.1f} "
                 f"{fb['mkl'] / fb['tiles']:6.2f}")

    emit("\n# bytes saved for backward (target: inputs + output + 2 fp32 lse)")
    for dt in args.dtypes:
        seqlen = min(args.seqlens)
        inputs = make_inputs(1, seqlen, seqlen, 32, 128, 10, DTYPES[dt], requires_grad=True)
        expected = (sum(t.numel() * t.element_size() for t in inputs)  # q, k, v, prefix_k, prefix_v, gate
                    + inputs[0].numel() * inputs[0].element_size()      # out
                    + 2 * 32 * seqlen * 4)                              # lse_w, lse_p
        measured = {"cpu": saved_bytes(fastadapter_cpu, inputs), "two_sdpa": saved_bytes(two_sdpa, inputs)}
        emit(f"{dt} S={seqlen}: cpu {measured['cpu'] / 2**20:.2f} MiB (expected {expected / 2**20:.2f} MiB, "
             f"{'equal' if measured['cpu'] == expected else 'DIFFERENT'}), two_sdpa {measured['two_sdpa'] / 2**20:.2f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    metadata = collect_metadata("cpu", "cpu-kernel-targets", argv if argv is not None else sys.argv[1:])
    args.out.with_suffix(".json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    print(f"\nsaved {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
