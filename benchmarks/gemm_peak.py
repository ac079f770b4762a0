"""The machine's GEMM peak, measured in the same process as the op it judges: the one definition of "% of peak".

On the AMD CPUs this project runs on, MKL's sgemm (what ``torch.matmul`` fp32 calls) reaches about a third of what
oneDNN's reaches, so a fraction of MKL's speed says little. The peak here is a oneDNN GEMM through torch
(``torch._C._nn.mkldnn_linear`` on oneDNN-layout tensors: fp32 on its FMA kernels, bf16 on its AVX512-BF16 / AMX
kernels where the CPU has them), of the op's dtype, on the same thread count, timed interleaved with the op: one
GEMM run beside every run of the op, so that a shared machine's load slows both alike. The op's FLOPs are
``benchmarks.flops.attention_flops`` (causal words part + prefix part; forward + backward = 3.5 x forward).

    peak = GemmPeak(torch.bfloat16)            # builds the oneDNN operands once
    runs = {"op": op_call, "gemm": peak.call}   # time them interleaved (benchmarks.cpu_kernel_targets)
    peak.gflops(seconds_of_one_gemm)           # GFLOP/s of the GEMM
    percent_of_peak(op_flops / op_seconds / 1e9, peak.gflops(gemm_seconds))

``python -m benchmarks.gemm_peak`` prints the peak of fp32 and bf16 with MKL's ``torch.matmul`` beside it
(``--emulate avx2``: as on an AVX2-only CPU, ``benchmarks/emulated_cpu.py``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch

from fastadapter.decode_linear import has_native_products

from .emulated_cpu import add_emulate_argument, emulation_line, run_emulated_if_asked

#: The GEMM that stands for the machine's peak: C [M, N] = A [M, K] · Bᵀ, square and large enough that a
#: library runs at its best (2 GFLOP: ~10 ms at 200 GFLOP/s), small enough to run beside every op run.
PEAK_SHAPE = (1024, 1024, 1024)


def gemm_flops(m: int, n: int, k: int) -> float:
    """FLOPs of one ``[M, K] x [K, N]`` product (a multiply and an add per term)."""
    return 2.0 * m * n * k


class GemmPeak:
    """A oneDNN GEMM of ``dtype`` (``PEAK_SHAPE``) ready to run: ``call()`` runs it once, ``gflops(seconds)`` is the
    rate of a run that took ``seconds``. The operands are converted to oneDNN's layout once, so a run is the
    product alone (what the op's own products could at best reach)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, int, int] = PEAK_SHAPE):
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("this build of torch has no oneDNN (torch.backends.mkldnn): no peak to measure")
        self.dtype, self.shape = dtype, shape
        m, n, k = shape
        generator = torch.Generator().manual_seed(0)
        self._a = torch.randn(m, k, generator=generator).to(dtype).to_mkldnn()
        self._b = torch.randn(n, k, generator=generator).to(dtype).to_mkldnn()
        self.flops = gemm_flops(m, n, k)

    def call(self) -> torch.Tensor:
        """One oneDNN GEMM ``a · bᵀ`` (an ``nn.Linear`` without bias, as oneDNN runs it)."""
        return torch._C._nn.mkldnn_linear(self._a, self._b, None)

    def gflops(self, seconds: float) -> float:
        """GFLOP/s of one run of :meth:`call` that took ``seconds``."""
        return self.flops / seconds / 1e9


_PEAKS: dict[torch.dtype, GemmPeak] = {}


def peak_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the GEMM that judges ops of ``dtype``: its own, except fp32 for fp16 (oneDNN's fp16 GEMM on a
    CPU without AVX512-FP16 is no peak) and for bf16 where oneDNN has no bf16 GEMM (an AVX2 CPU, whose bf16
    products, torch's and fastadapter's alike, compute in fp32; oneDNN refuses a bf16 ``mkldnn_linear`` there:
    ``fastadapter.decode_linear.has_native_products``)."""
    if dtype == torch.float16:
        return torch.float32
    if dtype == torch.bfloat16 and not has_native_products(dtype):
        return torch.float32
    return dtype


def peak_for(dtype: torch.dtype) -> GemmPeak:
    """The :class:`GemmPeak` that judges ops of ``dtype`` (a GEMM of :func:`peak_dtype`), built once per process."""
    dtype = peak_dtype(dtype)
    if dtype not in _PEAKS:
        _PEAKS[dtype] = GemmPeak(dtype)
    return _PEAKS[dtype]


def interleaved_with_peak(call, peak: GemmPeak, *, warmup: int, repeats: int,
                          max_seconds: Optional[float] = None) -> tuple[list[float], list[float]]:
    """``(op_ms, gemm_ms)``: run times of ``call()`` and of the GEMM, one GEMM run right after every op run (the
    two see the same load). At least one pair of runs; stops early once the op's runs add up to ``max_seconds``."""
    for _ in range(warmup):
        call()
    peak.call()
    op_ms: list[float] = []
    gemm_ms: list[float] = []
    for _ in range(max(1, repeats)):
        for run, out in ((call, op_ms), (peak.call, gemm_ms)):
            start = time.perf_counter()
            run()
            out.append(1e3 * (time.perf_counter() - start))
        if max_seconds is not None and sum(op_ms) > 1e3 * max_seconds:
            break
    return op_ms, gemm_ms


def percent_of_peak(op_gflops: float, peak_gflops: float) -> float:
    """The op's rate as a percentage of the same-run GEMM peak."""
    return 100.0 * op_gflops / peak_gflops


def context_line() -> str:
    """CPU model, threads, the load average and torch's kernel variant (with the switches of an emulated CPU,
    ``benchmarks/emulated_cpu.py``): the line every table of a shared machine carries."""
    import os
    import platform
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"CPU {model} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"{emulation_line()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="oneDNN GEMM peak (and MKL's torch.matmul beside it)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    add_emulate_argument(parser)
    args = parser.parse_args(argv)
    emulated_status = run_emulated_if_asked(args.emulate, __spec__.name, argv)
    if emulated_status is not None:
        return emulated_status
    if args.threads:
        torch.set_num_threads(args.threads)
    print(context_line())
    m, n, k = PEAK_SHAPE
    for dtype in (torch.float32, torch.bfloat16):
        peak = peak_for(dtype)
        a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        onednn = "oneDNN" if peak.dtype == dtype else f"oneDNN {str(peak.dtype).removeprefix('torch.')}"
        runs = {onednn: peak.call, "torch.matmul": lambda: a @ b.t()}
        times = {name: [] for name in runs}
        for run in runs.values():
            run()
        for _ in range(args.repeats):  # interleaved
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        print(f"{str(dtype).removeprefix('torch.'):>9} {m}x{n}x{k}: " + ", ".join(
            f"{name} {peak.gflops(statistics.median(t)):.1f} GFLOP/s (best {peak.gflops(min(t)):.1f})"
            for name, t in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
