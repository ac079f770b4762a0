"""Autotuning configurations of every kernel and the rule that prunes those that cannot run well.

Each kernel has a short list of ``triton.Config`` (tile sizes, warps, pipeline stages). Before benchmarking,
:func:`prune` drops the configurations that

* need more shared memory than the device has (estimated from the tiles the kernel keeps in flight),
* keep more fp32 accumulator values per thread than the register file holds without spilling (the
  accumulators live in registers for the whole kernel), or
* use tiles larger than the (power-of-two bucket of the) sequence, when a smaller configuration remains.

Under Triton's interpreter a single small configuration is used (no GPU timer; and small tiles still cover
the multi-tile paths on short test sequences).
"""
from __future__ import annotations

from typing import Callable, Optional

import triton

from ._interpreter import interpreting

#: Shared memory a block may opt in to, per compute capability (A100: 163 KB, H100: 227 KB).
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: fp32 accumulator values a thread may hold; beyond this, flash-style kernels start to spill at D = 128.
MAX_ACCUMULATOR_VALUES_PER_THREAD = 160


def _config(block_m: int, block_n: Optional[int], num_warps: int, num_stages: int) -> triton.Config:
    kwargs = {"BLOCK_M": block_m} if block_n is None else {"BLOCK_M": block_m, "BLOCK_N": block_n}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the query tile, BLOCK_N the key tile. Chosen from the
# ahead-of-time compile report at D = 128 (python -m fastadapter.kernels.report): every configuration here
# compiles without spills for sm_80 and sm_90 where it fits. Dropped because they spill on sm_80 or sm_90:
# 64-row query tiles on 4 warps in forward and dq (ptxas even falls back to 32 registers and kilobytes of stack
# for dq), 64×128 and 32×128 dk/dv tiles, 64-row preprocess tiles on 8 warps. Several survivors sit at 255
# registers, so a change to a kernel must be followed by tests/test_kernels_compile.py.
_COMPILED_CONFIGS = {
    # One program per query tile; key/value tiles stream through shared memory. 128×128 fits sm_90 only.
    "forward": [_config(128, 64, 8, 3), _config(128, 128, 8, 2)],
    # Row statistics and prefix gradients: no loop over keys, only over query tiles.
    "backward_preprocess": [_config(32, None, 8, 2), _config(64, None, 4, 1)],
    # One program per key tile (dk, dv accumulators resident); query tiles stream.
    "backward_dkdv": [_config(32, 64, 4, 2), _config(16, 128, 8, 2)],
    # One program per query tile (dq accumulator resident); key/value tiles stream.
    "backward_dq": [_config(128, 32, 8, 3), _config(128, 32, 8, 2)],
}

_INTERPRETER_CONFIGS = {
    # Query and key tiles of different sizes, so that tests on short sequences cross tile and diagonal
    # boundaries in both directions; larger tiles only make the interpreter faster (fewer Python-level steps).
    "forward": [_config(64, 32, 4, 1)],
    "backward_preprocess": [_config(32, None, 4, 1)],
    "backward_dkdv": [_config(32, 64, 4, 1)],
    "backward_dq": [_config(64, 32, 4, 1)],
}

KERNELS = tuple(_COMPILED_CONFIGS)


def configs(kernel: str, interpreter: Optional[bool] = None) -> list[triton.Config]:
    """The configurations the autotuner tries for ``kernel`` (before pruning)."""
    if interpreter is None:
        interpreter = interpreting()
    return list((_INTERPRETER_CONFIGS if interpreter else _COMPILED_CONFIGS)[kernel])


def shared_memory_estimate(kernel: str, config: triton.Config, block_d: int, block_p: int,
                           element_bytes: int) -> int:
    """Bytes of shared memory the tiles of one program keep in flight (an upper estimate)."""
    m, stages = config.kwargs["BLOCK_M"], max(config.num_stages, 1)
    n = config.kwargs.get("BLOCK_N", 0)
    prefix = 2 * block_p * block_d  # prefix_k and prefix_v tiles
    if kernel == "forward":  # q resident; k and v tiles pipelined
        tiles = m * block_d + stages * 2 * n * block_d + prefix
    elif kernel == "backward_preprocess":  # q, out, grad_out tiles
        tiles = stages * 3 * m * block_d + prefix
    elif kernel == "backward_dkdv":  # k, v resident; q and grad_out tiles pipelined
        tiles = 2 * n * block_d + stages * 2 * m * block_d
    elif kernel == "backward_dq":  # q, grad_out resident; k and v tiles pipelined
        tiles = 2 * m * block_d + stages * 2 * n * block_d + prefix
    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    return tiles * element_bytes


def accumulator_values_per_thread(kernel: str, config: triton.Config, block_d: int) -> int:
    """fp32 values each thread keeps live across the main loop (accumulators and the score tile)."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs.get("BLOCK_N", 0)
    threads = 32 * config.num_warps
    if kernel == "forward":  # output accumulator + scores
        values = m * block_d + m * n
    elif kernel == "backward_preprocess":
        values = m * block_d
    elif kernel == "backward_dkdv":  # dk, dv accumulators + transposed scores
        values = 2 * n * block_d + m * n
    elif kernel == "backward_dq":
        values = m * block_d + m * n
    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    return values // threads


def prune(kernel: str, candidates: list[triton.Config], *, block_d: int, block_p: int, element_bytes: int,
          shared_memory_limit: int, seqlen_bucket: int) -> list[triton.Config]:
    """The configurations of ``candidates`` worth benchmarking (never empty: the smallest one survives)."""
    fits = [c for c in candidates
            if shared_memory_estimate(kernel, c, block_d, block_p, element_bytes) <= shared_memory_limit
            and accumulator_values_per_thread(kernel, c, block_d) <= MAX_ACCUMULATOR_VALUES_PER_THREAD]
    short = [c for c in fits if max(c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N", 0)) <= max(seqlen_bucket, 16)]
    kept = short or fits
    if not kept:  # nothing fits: the configuration with the smallest footprint is the best left
        kept = [min(candidates, key=lambda c: shared_memory_estimate(kernel, c, block_d, block_p, element_bytes))]
    return kept


def _device_shared_memory(tensor) -> int:
    if interpreting() or tensor.device.type != "cuda":
        return max(SHARED_MEMORY_PER_BLOCK.values())
    properties = triton.runtime.driver.active.utils.get_device_properties(tensor.device.index or 0)
    return properties["max_shared_mem"]


def autotune_pruner(kernel: str) -> Callable:
    """An ``early_config_prune`` hook for ``triton.autotune`` that reads the launch's shapes and device.

    The launchers pass ``BLOCK_D``, ``BLOCK_P`` (kernels that read the prefix) and ``seqlen_bucket`` by keyword
    and the query tensor ``Q``.
    """
    def early_config_prune(candidates, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        return prune(kernel, list(candidates), block_d=args["BLOCK_D"], block_p=args.get("BLOCK_P", 16),
                     element_bytes=q.element_size(), shared_memory_limit=_device_shared_memory(q),
                     seqlen_bucket=args["seqlen_bucket"])
    return early_config_prune


#: What the tuned configuration depends on (the autotuner adds the tensors' dtypes).
AUTOTUNE_KEY = ("seqlen_bucket", "HEAD_DIM", "CAUSAL", "VARLEN", "HAS_PREFIX")


def autotune(kernel: str):
    """``triton.autotune`` for ``kernel``, keyed on those of :data:`AUTOTUNE_KEY` the kernel takes."""
    def decorate(fn):
        key = [name for name in AUTOTUNE_KEY if name in fn.arg_names]
        return triton.autotune(configs=configs(kernel), key=key,
                               prune_configs_by={"early_config_prune": autotune_pruner(kernel)})(fn)
    return decorate
