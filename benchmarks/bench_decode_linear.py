"""Op-level benchmark: the linear layers of a decoding step, ``F.linear`` (MKL) vs fastadapter's ``decode_linear``.

A decoding step of generation multiplies a few rows (one new token per sequence) by every weight of the model, so
its time is the time to stream the weights (``csrc/decode_linear.h`` says why MKL's GEMM is slow there). Each
config is one weight ``[N, K]`` against ``M`` rows; the two providers run the same tensors, interleaved run by run
(the machine's load reaches both alike), after checking that they agree. ``gb_per_s`` is the weight's bytes over
the median time: the figure that bounds a decoding step. A run repeats one call until it lasts ~5 ms, so a small
weight (the dim-512 layers: 1-3 MB) is read from the CPU's caches after the first call, as it partly is in a model
whose layers all fit there; the output head (65 MB) and LLaMA-7B's weights stream from memory.

Shapes: the thin model of ``bench_generation`` (dim 512: ``wq``, ``w1``, ``w2`` and the 32000-way output head) at
8 rows, in fp32 and bf16; ``default`` adds LLaMA-7B's layer and head shapes (dim 4096) in bf16, and 1 and 16 rows.
CPU only (on a GPU the thin model's linears are cuBLAS's).

    python -m benchmarks.bench_decode_linear            # default shapes
    python -m benchmarks.bench_decode_linear --quick --out bench-results/decode-linear.json
    python -m benchmarks.bench_decode_linear --emulate avx2   # as on an AVX2-only CPU (benchmarks/emulated_cpu.py)
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .bench_training import interleaved_times
from .emulated_cpu import add_emulate_argument, emulated_isa, run_emulated_if_asked
from .gemm_peak import context_line
from .timing import measure, summarize


@dataclass(frozen=True)
class LinearConfig:
    """``rows`` inputs ``[rows, in_features]`` against a weight ``[out_features, in_features]`` of ``dtype``."""

    rows: int
    in_features: int
    out_features: int
    dtype: str = "float32"
    name: str = ""

    @property
    def label(self) -> str:
        return f"M{self.rows}-K{self.in_features}-N{self.out_features}-{self.dtype}" + (
            f"-{self.name}" if self.name else "")


_THIN = [("wq", 512, 512), ("w1", 512, 1408), ("w2", 1408, 512), ("head", 512, 32000)]
_LLAMA_7B = [("7B-wq", 4096, 4096), ("7B-w1", 4096, 11008), ("7B-w2", 11008, 4096), ("7B-head", 4096, 32000)]


def configs_for(preset: str) -> list[LinearConfig]:
    """The shapes of ``preset`` (module docstring)."""
    if preset == "smoke":
        return [LinearConfig(8, 64, 97, name="tiny")]
    thin = [LinearConfig(8, k, n, dtype, name) for dtype in ("float32", "bfloat16") for name, k, n in _THIN]
    if preset == "quick":
        return [c for c in thin if c.dtype == "float32"]
    configs = thin + [LinearConfig(8, k, n, "bfloat16", name) for name, k, n in _LLAMA_7B]
    configs += [LinearConfig(rows, 512, 32000, "float32", "head") for rows in (1, 16)]
    if preset == "full":
        configs += [LinearConfig(rows, 4096, 11008, "bfloat16", "7B-w1") for rows in (1, 4, 16)]
    return configs


def config_for(preset: str) -> LinearConfig:
    """The first config of ``preset`` (the runner's tests read one label per preset)."""
    return configs_for(preset)[0]


def run(quick: bool, device: str, *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="decode_linear"``, providers ``F.linear`` (the baseline, first), ``decode_linear`` (what it
    chooses) and ``kernel-<variant>`` (the kernel itself, each variant this CPU runs), mode ``forward``, with ``gb_per_s`` (weight bytes over the median time) and ``max_abs_err`` (against ``F.linear``)."""
    import fastadapter.decode_linear as decode_linear_module

    preset = preset or ("quick" if quick else "full" if full else "default")
    from fastadapter import _cpu_extension

    unavailable = (f"a CPU kernel: nothing to time on {device}" if torch.device(device).type != "cpu"
                   else _cpu_extension.unavailable_reason())
    if unavailable:  # a row that says why (a build without fastadapter._C, a GPU run), not a failed suite
        return [{"suite": "decode_linear", "provider": "decode_linear", "mode": "forward", "config": "-",
                 "median_ms": None, "skipped": unavailable}]
    warmup, repeats = {"smoke": (0, 1), "quick": (2, 5)}.get(preset, (3, 9))
    rows = []
    for config in configs_for(preset):
        dtype = getattr(torch, config.dtype)
        generator = torch.Generator().manual_seed(config.out_features)
        x = torch.randn(config.rows, config.in_features, generator=generator).to(dtype)
        weight = (torch.randn(config.out_features, config.in_features, generator=generator)
                  / config.in_features ** 0.5).to(dtype)
        expected = F.linear(x, weight)
        got = decode_linear_module.decode_linear(x, weight)
        error = float((got.float() - expected.float()).abs().max())
        if error > 0.05 * max(1.0, float(expected.float().abs().max())):
            raise AssertionError(f"decode_linear differs from F.linear by {error:.3g} at {config.label}: not timed")
        log(f"  decode_linear: {config.label} (kernel: {decode_linear_module.runs_kernel(x, weight)})")
        calls = {"F.linear": lambda: F.linear(x, weight),
                 "decode_linear": lambda: decode_linear_module.decode_linear(x, weight)}
        # The kernel itself in every variant this CPU runs, whatever decode_linear chooses for this dtype: the
        # measurements that choice rests on (decode_linear.kernel_is_faster).
        for variant in _variants():
            calls[f"kernel-{variant}"] = _in_variant(variant, lambda: torch.ops.fastadapter_cpu.decode_linear(
                x, weight, None))
        # A run repeats a call until it lasts ~5 ms (one small layer takes ~0.1 ms: too short to time alone).
        once = min(measure(call, warmup=1, repeats=1, device=device)["median_ms"] for call in calls.values())
        inner = max(1, min(200, int(5.0 / max(once, 1e-3))))
        times = interleaved_times({name: _repeated(call, inner, getattr(call, "variant", None))
                                   for name, call in calls.items()}, warmup, repeats, device)
        times = {name: [t / inner for t in values] for name, values in times.items()}
        weight_gb = weight.numel() * weight.element_size() / 1e9
        errors = {"decode_linear": error}
        for name, call in calls.items():
            if name.startswith("kernel-"):
                _repeated(call, 1, call.variant)()  # a first run, then its result
                before = os.environ.get("FASTADAPTER_CPU_ISA")
                os.environ["FASTADAPTER_CPU_ISA"] = call.variant
                try:
                    errors[name] = float((call().float() - expected.float()).abs().max())
                finally:
                    _restore_isa(before)
        for provider in calls:
            timing = summarize(times[provider])
            rows.append({"suite": "decode_linear", "provider": provider, "mode": "forward", "config": config.label,
                         **timing, "gb_per_s": weight_gb / (timing["median_ms"] / 1e3), "dtype": config.dtype,
                         "max_abs_err": errors.get(provider, 0.0)})
    return rows


def _variants() -> list[str]:
    """The kernel variants this CPU and build run (FASTADAPTER_CPU_ISA values), widest first; on an emulated CPU
    (``--emulate``) none wider than its ISA."""
    runs = []
    from fastadapter import _cpu_extension

    widths = [isa for isa in _cpu_extension.ISA_CHOICES if isa != "auto"]  # widest first
    emulated = emulated_isa()
    before = os.environ.get("FASTADAPTER_CPU_ISA")
    try:
        for variant in widths[widths.index(emulated) if emulated else 0:]:
            os.environ["FASTADAPTER_CPU_ISA"] = variant
            try:
                torch.ops.fastadapter_cpu.cpu_path()
                runs.append(variant)
            except RuntimeError:
                pass
    finally:
        _restore_isa(before)
    return runs


def _restore_isa(value: Optional[str]) -> None:
    if value is None:
        os.environ.pop("FASTADAPTER_CPU_ISA", None)
    else:
        os.environ["FASTADAPTER_CPU_ISA"] = value


def _in_variant(variant: str, call: Callable[[], object]) -> Callable[[], object]:
    """``call`` marked to run with FASTADAPTER_CPU_ISA=variant (set by :func:`_repeated` around its runs)."""
    def run():
        return call()
    run.variant = variant
    return run


def _repeated(call: Callable[[], object], times: int, variant: Optional[str] = None) -> Callable[[], None]:
    def run_calls():
        before = os.environ.get("FASTADAPTER_CPU_ISA")
        if variant:
            os.environ["FASTADAPTER_CPU_ISA"] = variant
        try:
            for _ in range(times):
                call()
        finally:
            _restore_isa(before)
    return run_calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="decoding-step linears: F.linear vs decode_linear")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and the kernel")
    parser.add_argument("--out", help="also write the rows, with the machine's metadata, to this JSON file")
    add_emulate_argument(parser)
    args = parser.parse_args(argv)
    emulated_status = run_emulated_if_asked(args.emulate, __spec__.name, argv)
    if emulated_status is not None:
        return emulated_status
    if args.threads:
        torch.set_num_threads(args.threads)
    print(context_line())
    from .report import format_table, write_json
    preset = "quick" if args.quick else "full" if args.full else "default"
    rows = run(args.quick, "cpu", full=args.full)
    print(format_table(rows))
    by_key = {(r["config"], r["provider"]): r for r in rows}
    for config in dict.fromkeys(r["config"] for r in rows):
        base = by_key.get((config, "F.linear"))
        for provider in [r["provider"] for r in rows if r["config"] == config and r["provider"] != "F.linear"]:
            fast = by_key[(config, provider)]
            if base and fast.get("median_ms"):
                print(f"{config}: {provider} {base['median_ms'] / fast['median_ms']:.2f}x F.linear "
                      f"({fast['gb_per_s']:.1f} vs {base['gb_per_s']:.1f} GB/s of weights)")
    if args.out:
        from .metadata import collect_metadata
        write_json(args.out, collect_metadata("cpu", preset, argv), rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
