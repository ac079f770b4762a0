"""``python -m fastadapter.info``: which backends of zero-init attention run here, and why the others don't; for
the ``cpu`` backend also which kernel variant runs on this CPU (AVX-512 tiles, AVX2 tiles or MKL) and why."""
from __future__ import annotations

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


def backend_report() -> list[tuple[str, bool, str]]:
    """``(name, available, detail)`` for every registered backend on this machine."""
    rows = []
    for backend in all_backends():
        reason = backend.unavailable_reason()
        rows.append((backend.name, reason is None, reason or _detail(backend)))
    return rows


def main() -> int:
    print(f"fastadapter on torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name, ok, detail in backend_report():
        print(f"  {name:<10} {'available' if ok else 'unavailable':<12} {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
