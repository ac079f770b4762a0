"""``python -m fastadapter.info``: which backends of zero-init attention run here, and why the others don't."""
from __future__ import annotations

import sys

import torch

from .backends import all_backends


def backend_report() -> list[tuple[str, bool, str]]:
    """``(name, available, detail)`` for every registered backend on this machine."""
    rows = []
    for backend in all_backends():
        reason = backend.unavailable_reason()
        rows.append((backend.name, reason is None, reason or ("fused kernels" if backend.fused else "composition")))
    return rows


def main() -> int:
    print(f"fastadapter on torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name, ok, detail in backend_report():
        print(f"  {name:<10} {'available' if ok else 'unavailable':<12} {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
