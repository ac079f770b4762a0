"""The targets of the compiled CPU kernels (issues 3 and 23), measured side by side: ``python -m benchmarks.cpu_kernel_targets``.

At LLaMA-7B attention shapes (B = 1, Hq = 32, D = 128, P = 10; Hkv = 32 and 8), fp32 and bf16, every row runs
interleaved with a oneDNN GEMM of its dtype on the same threads (``benchmarks/gemm_peak.py``): the machine's
same-run peak, which a shared machine's load slows as much as the op. Each row gives the op's GFLOP/s
(``benchmarks/flops.py``: causal words part + prefix part, forward + backward = 3.5 x forward) and its percentage
of that peak, and its speed-up over the alternatives:

* ``two_sdpa`` (two ``scaled_dot_product_attention`` calls, ``benchmarks/baselines.py``), ``eager_v1``, and
  ``eager_v1`` under ``torch.compile`` (``benchmarks/op_providers.py``: ``compiled-eager-v1``);
* ``flex_attention``, two compiled calls: forward only (torch has no CPU backward for it);
* decode (Sq = 1 over a KV cache of 512..8192, B = 1 and 8): many interleaved repetitions, the minimum and the
  median wall time, and the median process CPU time beside them (a loaded machine's medians alone are scheduler
  noise);
* bytes saved for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``) = the inputs, the output
  and the two fp32 log-sum-exps, nothing else.

``--compare-products`` adds a table of the variant's product choices against each other, interleaved: AMX tiles,
register tiles and MKL (``FASTADAPTER_CPU_GEMM=amx|tiles|mkl``, those this CPU runs). ``FASTADAPTER_CPU_ISA=avx2``
runs fastadapter's AVX2 variant against alternatives that keep this CPU's instructions; ``--emulate avx2`` runs
every library as on an AVX2-only CPU (``benchmarks/emulated_cpu.py``), where bf16 rows are judged against the fp32
GEMM (oneDNN has no bf16 GEMM there). The CPU model, thread count, load average, torch's kernel variant and
fastadapter's are printed first.

Each measured row prints a progress line on stderr (its place, its name, the time so far). The tables are printed
and saved to ``benchmarks/results/cpu-kernel-targets.txt`` (``--out``), with the machine, library versions and git
commit beside them (``.json``). The machine is shared, so timings are interleaved: every repetition runs each
provider once, in turn (the GEMM included), and the table reports the median of the repetitions and the ratios of
those medians, all from one process.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

import torch

from .baselines import eager_v1, two_sdpa
from .emulated_cpu import add_emulate_argument, run_emulated_if_asked
from .flops import attention_flops
from .gemm_peak import context_line, peak_dtype, peak_for, percent_of_peak
from .metadata import save_text_report
from .op_providers import compiled_eager_v1, flex_two_calls
from fastadapter import _cpu_extension, zero_init_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fastadapter_cpu(q, k, v, prefix_k, prefix_v, gate, gate_tanh: bool = True):
    return zero_init_attention(q, k, v, prefix_k, prefix_v, gate, gate_activation="tanh" if gate_tanh else "none",
                               backend="cpu")


@contextlib.contextmanager
def _products(name: str):
    """FASTADAPTER_CPU_GEMM=name for the calls inside (the kernels read it on every call)."""
    before = os.environ.get("FASTADAPTER_CPU_GEMM")
    os.environ["FASTADAPTER_CPU_GEMM"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTADAPTER_CPU_GEMM"]
        else:
            os.environ["FASTADAPTER_CPU_GEMM"] = before


class RowProgress:
    """A line on stderr as each row of a table is measured, with its place and the time so far: a table prints
    once all its rows are measured, minutes apart on a long run. stderr keeps the lines out of the saved tables."""

    def __init__(self, table: str, total: int):
        self.table, self.total, self.done, self.start = table, total, 0, time.perf_counter()

    def row(self, what: str) -> None:
        """One more row measured: ``what`` names it."""
        self.done += 1
        print(f"  {self.table} {self.done}/{self.total}: {what} ({time.perf_counter() - self.start:.0f} s)",
              file=sys.stderr, flush=True)


def available_products() -> list[str]:
    """The FASTADAPTER_CPU_GEMM choices this variant and CPU run: AMX tiles (avx512 variant on an AMX CPU), the
    register tiles (avx512 and avx2 variants), MKL (always)."""
    names = []
    for name, marker in (("amx", "AMX tiles"), ("tiles", "register tiles")):
        with _products(name):
            path = _cpu_extension.cpu_path()
        if path and marker in path[1]:
            names.append(name)
    return names + ["mkl"]


def _with_products(name, run):
    def wrapped():
        with _products(name):
            run()
    return wrapped


def product_rows(seqlens, dtypes, repeats):
    """Each product choice of the same variant (available_products), interleaved: prefill forward and forward +
    backward, {name: seconds}."""
    names = available_products()
    rows = []
    progress = RowProgress("products", len(dtypes) * len(seqlens))
    for dt in dtypes:
        for seqlen in seqlens:
            args = make_inputs(1, seqlen, seqlen, 32, 128, 10, DTYPES[dt], requires_grad=True)
            fwd = interleaved_medians({n: _with_products(n, _forward(fastadapter_cpu, args)) for n in names},
                                      repeats)
            fb = interleaved_medians({n: _with_products(n, _forward_backward(fastadapter_cpu, args))
                                      for n in names}, repeats)
            rows.append((dt, seqlen, fwd, fb))
            progress.row(f"{dt} S={seqlen}")
    return names, rows


def make_inputs(batch, seqlen_q, seqlen_k, heads, head_dim, prefix_len, dtype, requires_grad, heads_kv=None):
    heads_kv = heads if heads_kv is None else heads_kv

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)
    return (randn(batch, seqlen_q, heads, head_dim), randn(batch, seqlen_k, heads_kv, head_dim),
            randn(batch, seqlen_k, heads_kv, head_dim), randn(1, prefix_len, heads_kv, head_dim),
            randn(1, prefix_len, heads_kv, head_dim), (0.5 * torch.randn(heads)).requires_grad_(requires_grad))


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


def interleaved_samples(runs: dict, repeats: int, warmup: int = 1, rotate: bool = False) -> dict:
    """``{name: {"wall": [s, ...], "cpu": [s, ...]}}``: wall and process CPU seconds of each callable, every
    repetition running all of them once, in turn. ``rotate``: each repetition starts one provider later, so that
    none always runs right after the same other one (a backward measured 6-10% slower or faster by its place in the
    order alone)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples = {name: {"wall": [], "cpu": []} for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        shift = repeat % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            samples[name]["cpu"].append(time.process_time() - start_cpu)
            samples[name]["wall"].append(time.perf_counter() - start)
    return samples


def interleaved_medians(runs: dict, repeats: int, warmup: int = 1, rotate: bool = False) -> dict:
    """Median wall seconds of each callable, timed by :func:`interleaved_samples`."""
    samples = interleaved_samples(runs, repeats, warmup, rotate)
    return {name: statistics.median(s["wall"]) for name, s in samples.items()}


def saved_bytes(fn, args) -> int:
    """Bytes of the distinct storages autograd saves for backward when running ``fn(*args)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def prefill_rows(seqlens, heads_kv, dtypes, repeats, with_eager, with_compiled):
    """Per (dtype, Hkv, S): the forward's and forward + backward's median seconds of every provider and of the
    same-run oneDNN GEMM ("gemm"), interleaved."""
    rows = []
    progress = RowProgress("prefill", len(dtypes) * len(heads_kv) * len(seqlens))
    for dt in dtypes:
        peak = peak_for(DTYPES[dt])
        for hkv in heads_kv:
            for seqlen in seqlens:
                args = make_inputs(1, seqlen, seqlen, 32, 128, 10, DTYPES[dt], requires_grad=True, heads_kv=hkv)
                forward = {"cpu": fastadapter_cpu, "two_sdpa": two_sdpa}
                both = {"cpu": fastadapter_cpu, "two_sdpa": two_sdpa}
                if with_compiled:
                    forward["compiled_eager"] = both["compiled_eager"] = compiled_eager_v1
                    forward["flex"] = flex_two_calls
                if with_eager:
                    both["eager_v1"] = eager_v1
                fwd = interleaved_medians({**{n: _forward(f, args) for n, f in forward.items()},
                                           "gemm": peak.call}, repeats, warmup=2)
                fb = interleaved_medians({**{n: _forward_backward(f, args) for n, f in both.items()},
                                          "gemm": peak.call}, repeats, warmup=2)
                rows.append((dt, hkv, seqlen, fwd, fb))
                progress.row(f"{dt} Hkv={hkv} S={seqlen}")
    return rows


def decode_rows(seqlens_k, batches, dtypes, repeats):
    """Per (dtype, B, Sk): wall and CPU seconds of many interleaved decode steps of cpu and two_sdpa."""
    rows = []
    progress = RowProgress("decode", len(dtypes) * len(batches) * len(seqlens_k))
    for dt in dtypes:
        for batch in batches:
            for seqlen_k in seqlens_k:
                args = make_inputs(batch, 1, seqlen_k, 32, 128, 10, DTYPES[dt], requires_grad=False)
                samples = interleaved_samples({"cpu": _forward(fastadapter_cpu, args),
                                               "two_sdpa": _forward(two_sdpa, args)}, repeats, warmup=3,
                                              rotate=True)
                rows.append((dt, batch, seqlen_k, samples))
                progress.row(f"{dt} B={batch} Sk={seqlen_k}")
    return rows


def _rate(dt, hkv, seqlen, mode, seconds, peak_seconds):
    """(GFLOP/s of the op, % of the same-run GEMM's GFLOP/s)."""
    flops = attention_flops(1, 32, seqlen, seqlen, 128, 10, causal=True, mode=mode)
    gflops = flops / seconds / 1e9
    return gflops, percent_of_peak(gflops, peak_for(DTYPES[dt]).gflops(peak_seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per provider (median)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--heads-kv", type=int, nargs="+", default=[32, 8], help="kv heads (Hq = 32)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--decode-seqlens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode-repeats", type=int, default=50, help="timed decode steps per provider")
    parser.add_argument("--no-eager", action="store_true", help="skip eager_v1 (it materialises S×S scores)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the providers that torch.compile each shape, eager_v1 compiled and flex_attention "
                             "(inductor: minutes per shape on a loaded machine)")
    parser.add_argument("--compare-products", action="store_true",
                        help="add a table of every product choice of the variant against each other "
                             "(FASTADAPTER_CPU_GEMM=amx|tiles|mkl)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" /
                        "cpu-kernel-targets.txt", help="where to save the printed tables (and a .json of metadata)")
    add_emulate_argument(parser)
    args = parser.parse_args(argv)
    emulated_status = run_emulated_if_asked(args.emulate, __spec__.name, argv)
    if emulated_status is not None:
        return emulated_status
    lines = []

    def emit(text: str = "") -> None:  # print, and keep the line for --out
        print(text)
        lines.append(text)

    torch.manual_seed(0)
    emit(context_line())
    path = _cpu_extension.cpu_path()
    emit(f"cpu kernels: {path[0]} variant, {path[1]}" if path else "cpu kernels: unavailable")
    emit(f"B=1 Hq=32 D=128 P=10; median of {args.repeats} interleaved runs, each beside a oneDNN GEMM "
         f"(benchmarks/gemm_peak.py) of the row's dtype: 'peak' is its GFLOP/s, '%' the op's share of it")
    for dt in args.dtypes:
        if peak_dtype(DTYPES[dt]) != DTYPES[dt]:
            judge = next(name for name, dtype in DTYPES.items() if dtype == peak_dtype(DTYPES[dt]))
            emit(f"{dt} rows are judged against the {judge} GEMM: oneDNN has no {dt} GEMM on this CPU")

    def cell(fast: dict, name: str) -> str:  # speed-up of cpu over `name`
        return f"{fast[name] / fast['cpu']:6.2f}" if name in fast else f"{'-':>6}"

    prefill = prefill_rows(args.seqlens, args.heads_kv, args.dtypes, args.repeats, not args.no_eager,
                           not args.no_compile)
    for title, index, mode, others in (
            ("forward", 3, "forward", ("two_sdpa", "compiled_eager", "flex")),
            ("forward + backward", 4, "forward+backward", ("two_sdpa", "compiled_eager", "eager_v1"))):
        emit(f"\n# prefill {title} (causal, Sq = Sk): fastadapter cpu, GFLOP/s against the same-run oneDNN GEMM, "
             f"speed-ups over the alternatives")
        emit(f"{'dtype':<5} {'Hkv':>3} {'S':>5} | {'ms':>8} {'GFLOP/s':>8} {'peak':>7} {'%':>5} | "
             + " ".join(f"{'x' + n:>15}" for n in others))
        for row in prefill:
            dt, hkv, seqlen, timing = row[0], row[1], row[2], row[index]
            gflops, pct = _rate(dt, hkv, seqlen, mode, timing["cpu"], timing["gemm"])
            peak_gflops = peak_for(DTYPES[dt]).gflops(timing["gemm"])
            emit(f"{dt:<5} {hkv:>3} {seqlen:>5} | {1e3 * timing['cpu']:8.1f} {gflops:8.1f} {peak_gflops:7.1f} "
                 f"{pct:5.1f} | " + " ".join(f"{cell(timing, n):>15}" for n in others))

    emit(f"\n# decode (Sq = 1, Hkv = 32, over a KV cache of Sk): {args.decode_repeats} interleaved steps each; "
         f"wall min / median and process CPU time median (ms), speed-up of cpu over two_sdpa")
    emit(f"{'dtype':<5} {'B':>2} {'Sk':>5} | {'cpu min':>8} {'med':>7} {'cpu-t':>7} | {'2sdpa min':>9} {'med':>7} "
         f"{'cpu-t':>7} | {'x min':>6} {'x med':>6} {'x cpu-t':>7}")
    for dt, batch, seqlen_k, samples in decode_rows(args.decode_seqlens, args.decode_batches, args.dtypes,
                                                    args.decode_repeats):
        fig = {name: (min(s["wall"]), statistics.median(s["wall"]), statistics.median(s["cpu"]))
               for name, s in samples.items()}
        (cmin, cmed, ccpu), (smin, smed, scpu) = fig["cpu"], fig["two_sdpa"]
        emit(f"{dt:<5} {batch:>2} {seqlen_k:>5} | {1e3 * cmin:8.3f} {1e3 * cmed:7.3f} {1e3 * ccpu:7.3f} | "
             f"{1e3 * smin:9.3f} {1e3 * smed:7.3f} {1e3 * scpu:7.3f} | {smin / cmin:6.2f} {smed / cmed:6.2f} "
             f"{scpu / max(ccpu, 1e-9):7.2f}")

    if args.compare_products:
        names, rows = product_rows(args.seqlens, args.dtypes, args.repeats)
        emit("\n# products of the same variant (FASTADAPTER_CPU_GEMM=" + "|".join(names) + "), interleaved: ms of "
             "forward, then of forward + backward, and each one's speed-up over MKL's")
        others = [n for n in names if n != "mkl"]  # the speed-up columns (none where MKL is the only choice)
        emit(f"{'dtype':<5} {'S':>5} | " + " ".join(f"{'fwd ' + n:>10}" for n in names) + " | "
             + " ".join(f"{'f+b ' + n:>10}" for n in names)
             + (" | " + " ".join(f"{'x mkl ' + n:>11}" for n in others) if others else ""))
        for dt, seqlen, fwd, fb in rows:
            ratios = " ".join(f"{fwd['mkl'] / fwd[n]:5.2f}/{fb['mkl'] / fb[n]:5.2f}" for n in others)
            emit(f"{dt:<5} {seqlen:>5} | " + " ".join(f"{1e3 * fwd[n]:10.1f}" for n in names) + " | "
                 + " ".join(f"{1e3 * fb[n]:10.1f}" for n in names) + (f" | {ratios}" if others else ""))

    emit(f"\nfinished: {context_line()}")
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
    save_text_report(args.out, lines, "cpu-kernel-targets", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
