"""Op-level benchmark: zero-init attention by every provider, forward / backward / forward+backward.

For each shape of a sweep (sequence length, batch, GQA ratio, prefix length; LLaMA-7B heads by default:
Hq = 32, D = 128, P = 10) and each provider of :mod:`benchmarks.op_providers`, one row per mode with the
median and p20/p80 time, TFLOP/s (:mod:`benchmarks.flops`), the peak memory of the call and the bytes the forward
saves for the backward. On CPU each row also has ``peak_gflops`` and ``pct_of_peak``: the oneDNN GEMM of the
shape's dtype, run beside every run of the op (:mod:`benchmarks.gemm_peak`), and the op's GFLOP/s as a percentage
of it. Shapes a provider cannot or should not run give a row with ``skipped`` set to the reason.

    python -m benchmarks.bench_ops --quick            # this module alone; `fastadapter bench` runs every suite
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .flops import attention_flops, tflops_per_second
from .gemm_peak import interleaved_with_peak, peak_for, percent_of_peak
from .memory import SavedTensorCounter, peak_memory_bytes
from .op_providers import COMPILED_PROVIDERS, OpConfig, OpProvider, check_provider, op_providers
from .timing import measure, summarize

MODES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Sweep:
    """One axis of the benchmark: a name (the x axis of its plots) and its shapes."""

    name: str
    axis: str  # the OpConfig field that varies
    configs: tuple[OpConfig, ...]


@dataclass(frozen=True)
class Plan:
    """What to run: the sweeps, and how long to time each measurement."""

    sweeps: tuple[Sweep, ...]
    warmup: int
    repeats: int
    max_seconds: float  # per measurement: slow baselines stop early (at least one timed run)
    #: Run the providers that torch.compile each shape (op_providers.COMPILED_PROVIDERS): minutes of compiling on
    #: CPU, so the smoke and quick presets leave them out (a row says so).
    compiled: bool = True


def _sweep(name: str, axis: str, base: OpConfig, values) -> Sweep:
    return Sweep(name, axis, tuple(dataclasses.replace(base, **{axis: v}) for v in values))


def plan_for(preset: str, device) -> Plan:
    """The shapes of ``preset`` ("smoke", "quick", "default" or "full") on ``device``.

    CPU runs fp32 with batch 1 (what a CPU can finish in minutes); CUDA runs bf16 with batch 4. Every preset keeps
    LLaMA-7B's heads (Hq = 32, D = 128) and prompt (P = 10).
    """
    cuda = torch.device(device).type == "cuda"
    base = OpConfig(batch=4 if cuda else 1, seqlen=1024, dtype=torch.bfloat16 if cuda else torch.float32)
    if preset == "smoke":  # one short sequence, one timed run: checks that the suite runs
        return Plan((_sweep("seqlen", "seqlen", base, (64,)),), warmup=0, repeats=1, max_seconds=0.1, compiled=False)
    if preset == "quick":
        return Plan((_sweep("seqlen", "seqlen", base, (128, 512)),), warmup=1, repeats=3, max_seconds=0.5,
                    compiled=False)
    if preset == "default":
        seqlens = (128, 256, 512, 1024, 2048, 4096) if cuda else (128, 256, 512, 1024, 2048)
        return Plan((_sweep("seqlen", "seqlen", base, seqlens),
                     _sweep("gqa", "heads_kv", dataclasses.replace(base, seqlen=1024), (8,))),
                    warmup=1 if not cuda else 10, repeats=10 if not cuda else 30, max_seconds=1.5)
    if preset == "full":
        at_1k = dataclasses.replace(base, seqlen=1024)
        return Plan((_sweep("seqlen", "seqlen", base, (128, 256, 512, 1024, 2048, 4096)),
                     _sweep("batch", "batch", dataclasses.replace(base, seqlen=512), (1, 2, 4)),
                     _sweep("gqa", "heads_kv", at_1k, (32, 8, 1)),
                     _sweep("prefix", "prefix_len", at_1k, (0, 10, 64))),
                    warmup=1 if not cuda else 10, repeats=5 if not cuda else 30, max_seconds=3.0)
    raise ValueError(f"unknown preset {preset!r}; expected 'smoke', 'quick', 'default' or 'full'")


def mode_callable(mode: str, fn: Callable, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor,
                  out: Optional[torch.Tensor] = None) -> Callable[[], object]:
    """A zero-argument callable that runs ``mode`` once.

    The backward is timed alone on one retained graph — ``out``, or a forward run here when it is None — outside
    the timer, as flash-attention's and Triton's benchmarks do.
    """
    if mode == "forward":
        return lambda: fn(*inputs)
    if mode == "backward":
        graph = fn(*inputs) if out is None else out
        return lambda: torch.autograd.grad(graph, inputs, grad_out, retain_graph=True)
    if mode == "forward+backward":
        return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _config_fields(sweep: Sweep, config: OpConfig) -> dict:
    return {"sweep": sweep.name, "x_axis": sweep.axis, "x": getattr(config, sweep.axis),
            "batch": config.batch, "seqlen": config.seqlen, "heads_q": config.heads_q,
            "heads_kv": config.heads_kv, "head_dim": config.head_dim, "prefix_len": config.prefix_len,
            "dtype": config.dtype_name}


def benchmark_provider(provider: OpProvider, config: OpConfig, device, plan: Plan,
                       modes=MODES, measure_memory: bool = True) -> list[dict]:
    """The rows of one provider on one shape: timing per mode, TFLOP/s, peak memory and saved bytes."""
    torch.manual_seed(0)
    cpu = torch.device(device).type == "cpu"
    inputs = config.make_inputs(device)
    grad_out = torch.randn(config.batch, config.seqlen, config.heads_q, config.head_dim, device=device,
                           dtype=config.dtype)
    # One forward both counts what is saved for the backward and builds the graph the backward mode replays.
    with SavedTensorCounter(exclude=inputs) as saved:
        out = provider.fn(*inputs)
    rows = []
    no_backward = provider.no_backward(str(device))
    for mode in modes:
        if no_backward and mode != "forward":
            rows.append({"provider": provider.name, "mode": mode, "config": config.label, "median_ms": None,
                         "skipped": no_backward})
            continue
        call = mode_callable(mode, provider.fn, inputs, grad_out, out)
        peak = None
        if measure_memory and cpu:
            # Before the timing on CPU: a profiled call is no warm-up (the first plain call after it still pays
            # for fresh pages from the OS), so the warm-ups follow it.
            peak = peak_memory_bytes(call, device)
        gemm_ms = None
        if cpu:  # the same-run oneDNN GEMM peak, one GEMM run beside every run of the op (benchmarks/gemm_peak.py)
            op_ms, gemm_ms = interleaved_with_peak(call, peak_for(config.dtype), warmup=plan.warmup,
                                                   repeats=plan.repeats, max_seconds=plan.max_seconds)
            timing = summarize(op_ms)
        else:
            timing = measure(call, warmup=plan.warmup, repeats=plan.repeats, device=device,
                             max_seconds=plan.max_seconds)
        if measure_memory and not cpu:  # after the warm-ups: autotuning's trial buffers are not the op's memory
            peak = peak_memory_bytes(call, device)
        flops = attention_flops(config.batch, config.heads_q, config.seqlen, config.seqlen, config.head_dim,
                                config.prefix_len, causal=True, mode=mode)
        row = {"provider": provider.name, "mode": mode, "config": config.label, **timing,
               "tflops": tflops_per_second(flops, timing["median_ms"])}
        if gemm_ms is not None:
            peak_gflops = peak_for(config.dtype).gflops(statistics.median(gemm_ms) / 1e3)
            row.update(peak_gflops=peak_gflops, pct_of_peak=percent_of_peak(1e3 * row["tflops"], peak_gflops))
        if measure_memory:
            row["peak_mem_mb"] = peak / 2**20
            row["saved_bytes"] = saved.bytes
        rows.append(row)
    return rows


def run(quick: bool, device: str, *, full: bool = False, preset: Optional[str] = None,
        providers: Optional[list[str]] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the op-level benchmark on the shapes of a preset (see :func:`plan_for`).

    Args:
        quick: the quick preset (two short sequences), for smoke runs; ``full`` the long sweeps; ``preset``
            (a name of :func:`plan_for`) overrides both.
        device: ``"cpu"`` or a CUDA device.
        providers: run only these provider names (default: every provider).
        log: progress lines go here.

    Returns:
        Flat rows: ``suite, provider, mode, config, median_ms, p20_ms, p80_ms, runs, tflops, peak_mem_mb,
        saved_bytes`` plus the shape (``sweep, x_axis, x, batch, seqlen, heads_q, heads_kv, head_dim, prefix_len,
        dtype``); a row with ``skipped`` set (and no times) for each provider that does not run a shape.
    """
    plan = plan_for(preset or ("quick" if quick else "full" if full else "default"), device)
    return run_plan(plan, device, providers=providers, log=log)


def _error_reason(what: str, error: Exception) -> str:
    """The ``skipped`` reason of a provider that raised: what it was doing, the exception's type and the first
    line of its message (at most 300 characters: an import error can quote a whole linker message)."""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    return f"raised while {what}, not timed: {type(error).__name__}: {message}"


def run_plan(plan: Plan, device: str, *, providers: Optional[list[str]] = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run every provider on every shape of ``plan`` (see :func:`run` for the rows). Each provider is first
    checked against the fp32 reference; one that disagrees is reported as skipped, never timed.

    A provider that raises (a broken flash-attn or xformers install, a kernel running out of memory) gives
    ``skipped`` rows naming the exception instead of ending the suite: in its correctness check, for every shape;
    in a benchmark, for that shape only (the next shape is tried again).
    """
    chosen = [p for p in op_providers() if providers is None or p.name in providers]
    if providers is not None and len(chosen) != len(set(providers)):
        known = [p.name for p in op_providers()]
        raise ValueError(f"unknown provider in {providers}; known providers: {known}")
    dtypes = {c.dtype for s in plan.sweeps for c in s.configs}
    wrong: dict[str, str] = {}
    if not plan.compiled:
        for provider in chosen:
            if provider.name in COMPILED_PROVIDERS:
                wrong[provider.name] = "compiles every shape (minutes on CPU): left out of this preset"
    for provider in chosen:
        if provider.name in wrong:
            continue
        try:
            if all(provider.skip_reason(c, device) is not None for sweep in plan.sweeps for c in sweep.configs):
                continue  # runs no shape of the plan: nothing to check
            for dtype in dtypes:
                problem = check_provider(provider, device, dtype,
                                         check_grads=provider.no_backward(device) is None)
                if problem:
                    wrong[provider.name] = f"wrong result, not timed: {problem}"
                    log(f"  {wrong[provider.name]}")
                    break
        except Exception as error:  # one broken provider must not stop the others
            wrong[provider.name] = _error_reason("checked against the reference", error)
            log(f"  {provider.name}: {wrong[provider.name]}")
    rows = []
    for sweep in plan.sweeps:
        for config in sweep.configs:
            shape = _config_fields(sweep, config)
            for provider in chosen:
                try:
                    reason = wrong.get(provider.name) or provider.skip_reason(config, device)
                except Exception as error:
                    reason = _error_reason("deciding whether it runs", error)
                if not reason:
                    log(f"  ops {sweep.name}: {config.label} {provider.name}")
                    try:
                        rows += [{"suite": "ops", **row, **shape}
                                 for row in benchmark_provider(provider, config, device, plan)]
                    except Exception as error:
                        reason = _error_reason("benchmarked", error)
                        log(f"  {provider.name} on {config.label}: {reason}")
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                if reason:
                    rows += [{"suite": "ops", "provider": provider.name, "mode": mode, "config": config.label,
                              "median_ms": None, "skipped": reason, **shape} for mode in MODES]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="zero-init attention, every provider (see module docstring)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+")
    args = parser.parse_args(argv)
    from .report import format_table
    print(format_table(run(args.quick, args.device, full=args.full, providers=args.providers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
