"""``python -m fastadapter.info``: which backends of zero-init attention run here, and why the others don't; for
the ``cpu`` backend also which kernel variant runs on this CPU (AVX-512 tiles, AVX2 tiles or MKL) and why. On a
machine without a CUDA GPU, a missing triton is reported as not needed (the ``bench`` extra leaves it out)."""
from __future__ import annotations

import importlib.util
import sys

import torch

from .backends import all_backends


def _detail(backend) -> str:
    detail = "fused kernels" if backend.fused else "composition"
    if backend.name == "cpu":
        from . import _cpu_extension
        try:
            path = _cpu_extension.cpu_path()
        except RuntimeError as error:  # a bad FASTADAPTER_CPU_ISA
            return f"{detail}; {str(error).splitlines()[0]}"
        if path is not None:
            variant, what = path
            detail += f", {variant} variant: {what} (FASTADAPTER_CPU_ISA=avx512|avx2|generic forces one)"
    return detail


#: Why a CPU-only machine needs no triton (the ``bench`` extra leaves it out on purpose).
TRITON_NOT_NEEDED = ("triton is not installed, and not needed on this machine: its kernels run on CUDA GPUs (on a "
                     "CPU only in Triton's interpreter, which the tests use); the cpu backend is the fused path on "
                     "a CPU. With a CUDA GPU: pip install triton")


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # a module named triton without a spec
        return True


def backend_report() -> list[tuple[str, bool, str]]:
    """``(name, available, detail)`` for every registered backend on this machine."""
    rows = []
    for backend in all_backends():
        reason = backend.unavailable_reason()
        if reason and backend.name == "triton" and not torch.cuda.is_available() and not _triton_installed():
            reason = TRITON_NOT_NEEDED
        rows.append((backend.name, reason is None, reason or _detail(backend)))
    return rows


def main() -> int:
    print(f"fastadapter on torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name, ok, detail in backend_report():
        print(f"  {name:<10} {'available' if ok else 'unavailable':<12} {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
