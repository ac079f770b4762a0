"""Wall-clock timing of a callable: median and 20th/80th percentiles of repeated runs.

On CUDA every run is bracketed by CUDA events (the time the GPU spent, not the time Python took to queue the
kernels) and the L2 cache is flushed before each run so that a kernel never reads its inputs from the previous
run's cache; on CPU the clock is ``time.perf_counter``. Quantiles rather than the mean, because a shared machine
gives a long right tail (another process taking the core) that says nothing about the code.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

#: Bytes written before each CUDA run to evict the previous run's data from L2 (larger than any L2 today:
#: A100 40 MiB, H100 50 MiB).
_L2_FLUSH_BYTES = 256 * 1024 * 1024


def quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, linearly interpolated between neighbours."""
    if not sorted_values:
        raise ValueError("quantile of no values: measure at least one run")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(times_ms: list[float]) -> dict:
    """``{median_ms, p20_ms, p80_ms, min_ms, runs}`` of a list of run times in milliseconds.

    The minimum is the run least disturbed by other processes: on a shared machine two providers whose medians
    differ but whose minima agree differ by the load, not by their code."""
    ordered = sorted(times_ms)
    return {"median_ms": statistics.median(ordered), "p20_ms": quantile(ordered, 0.2),
            "p80_ms": quantile(ordered, 0.8), "min_ms": ordered[0], "runs": len(ordered)}


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, device="cpu",
            max_seconds: Optional[float] = None) -> dict:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls.

    Args:
        fn: a callable without arguments; what it returns is dropped after each run.
        warmup: untimed calls first (compilation, autotuning, allocator caches, lazy initialisation).
        repeats: timed calls.
        device: ``"cpu"`` (``time.perf_counter``) or a CUDA device (CUDA events, synchronised, L2 flushed).
        max_seconds: stop after this much measured time even if fewer than ``repeats`` runs were made (at least
            one run always is). Keeps slow baselines (eager at long sequences) from dominating a sweep.

    Returns:
        ``{"median_ms", "p20_ms", "p80_ms", "min_ms", "runs"}``: quantiles of the run times in milliseconds and
        the number of timed runs.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}")
    cuda = _is_cuda(device)
    for _ in range(warmup):
        fn()
    times_ms: list[float] = []
    if cuda:
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
            if max_seconds is not None and sum(times_ms) > 1e3 * max_seconds:
                break
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times_ms.append(1e3 * (time.perf_counter() - start))
            if max_seconds is not None and sum(times_ms) > 1e3 * max_seconds:
                break
    return summarize(times_ms)


def per_step_summary(prefill_ms: list[float], whole_ms: list[float], steps: int) -> dict:
    """:func:`summarize` of the time of one decoding step, ``(whole − prefill) / steps``, taken run by run from
    interleaved timings of a prefill and of a whole generation (``prefill_ms[i]`` and ``whole_ms[i]`` ran next to
    each other, so each difference sees the same load). On a noisy machine at tiny shapes a difference can be
    negative: it is reported as measured, never clamped."""
    steps = max(steps, 1)
    return summarize([(whole - first) / steps for first, whole in zip(prefill_ms, whole_ms)])
