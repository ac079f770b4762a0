"""Hand the training step's large freed buffers back to the operating system (glibc's ``malloc`` on Linux).

A CPU training step allocates and frees the same large activation buffers every step. glibc raises its mmap
threshold each time such a buffer is freed (up to 32 MiB on 64-bit), after which these buffers come from the heap,
where freed memory stays in the process: the resident size (RSS) then holds the high-water mark of every step's
fragments. Pinning the thresholds makes every buffer of at least :data:`THRESHOLD_BYTES` an mmap of its own that
goes back to the system when freed, and is faulted in afresh when allocated again. Measured on SmolLM2-135M
(``benchmarks/bench_real_models.py --preset default``'s fastadapter side, 6 steps of 4 Alpaca rows, fp32, 2 idle
cores): peak RSS 2285 MB and 268 real tokens/s with glibc's defaults; pinned at 256 KiB 1955 MB and 186 tokens/s;
at 1 MiB 1976 MB and 204 tokens/s; at 4 MiB 2189 MB and 256 tokens/s. Memory for speed: it is off by default.

It is process-wide (it sets ``mallopt``), so :class:`~fastadapter.training.trainer.Trainer` applies it only when
``TrainConfig.return_memory_to_os`` asks, and only on the CPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

#: Buffers at least this large are mapped and unmapped one by one (glibc's initial mmap threshold is 128 KiB).
THRESHOLD_BYTES = 256 * 1024
#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=None)
def return_freed_memory_to_os(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap and trim thresholds at ``threshold_bytes``; returns whether it applied (False off Linux or
    on another C library, where nothing changes). Once per process and threshold."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
