"""Tile configurations of every kernel, and the facts that decide whether one may launch on a GPU.

Each kernel has a short list of candidate ``triton.Config`` (tile sizes, warps, pipeline stages) per head-dim
tile (:func:`candidates`). Which of them may launch is decided by the compiler, not by an estimate: every
candidate is compiled for the device's architecture and its registers, spills and shared memory are read from
the compiled kernel (:mod:`.compiler_facts`, as :class:`Resources`); :mod:`.autotune` keeps those that fit
(the launch plan) and times them.

This module holds the data of that decision only, and imports no kernel: the candidates, the compile-time
switches of a call (:class:`KernelFacts`), what the compiler made of one configuration (:class:`Resources`),
the shared memory of each architecture (:data:`SHARED_MEMORY_PER_BLOCK`) and what no configuration can change
(:func:`target_reason`).

Under Triton's interpreter a single small configuration per kernel is used (no GPU timer; and small tiles still
cover the multi-tile paths on short test sequences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ._interpreter import interpreting

#: Shared memory a block may opt in to, per compute capability, for the ahead-of-time plan (at run time the
#: device's own figure is used): V100 96 KB, T4 64 KB, A100 163 KB, A10/RTX 3090 and L4/L40S/RTX 4090 99 KB,
#: H100/H200 227 KB.
SHARED_MEMORY_PER_BLOCK = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: bf16 tensor-core instructions exist from Ampere (sm_80) on.
MIN_BF16_CAPABILITY = 80
#: Triton's NVIDIA backend compiles for Volta (sm_70) and newer.
MIN_CAPABILITY = 70


def _config(block_m: int, block_n: Optional[int], num_warps: int, num_stages: int) -> triton.Config:
    kwargs = {"BLOCK_M": block_m} if block_n is None else {"BLOCK_M": block_m, "BLOCK_N": block_n}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M is the query tile, BLOCK_N the key tile. Preferred first
# (deterministic mode launches the first one that fits). Chosen from ahead-of-time compiles (python -m
# fastadapter.kernels.report): head-dim tiles up to 128 keep the fp32 accumulators of 128-row tiles in the
# registers of 8 warps. Tried and dropped because they spill: forward 64×64 on 4 warps (152 B on sm_86); dk/dv
# 64×128 and 32×128; 64-row preprocess tiles on 8 warps; at D = 256 forward 128×64, 64×64 and 64×32 tiles
# (720-3000 B). Every candidate is compiled for the device before it may launch, so a short list keeps that
# first-call cost (and the compile test) small.
_COMPILED_CONFIGS = {
    128: {
        # One program per query tile; key/value tiles stream through shared memory. 128×64 on 8 warps sits at
        # 255 registers and spills 16-32 B at D = 80 (the masked, padded head dim): 64×64 on 8 warps is the
        # fallback there. (128×128 is added on Hopper: it spills 56-72 B on sm_80/86.)
        "forward": [_config(128, 64, 8, 3), _config(64, 64, 8, 2)],
        # Row statistics and prefix gradients: no loop over keys, only over query tiles.
        "backward_preprocess": [_config(32, None, 8, 2)],
        # One program per key tile (dk, dv accumulators resident); query tiles stream. 32×64 on 4 warps spills
        # 8-16 B on sm_86/89 (and at D = 80 on sm_80): 8 warps halve the accumulators per thread. Varlen GQA
        # (separate key offsets, the group's heads looped over) spills 16-56 B even on 8 warps on sm_90 at
        # D = 80/128: 16-row query tiles on 8 warps fit there (207-216 registers), so ragged Hugging Face batches
        # keep the kernel rather than falling back to sdpa.
        "backward_dkdv": [_config(32, 64, 4, 2), _config(32, 64, 8, 2), _config(16, 64, 8, 2)],
        # One program per query tile (dq accumulator resident); key/value tiles stream.
        "backward_dq": [_config(128, 32, 8, 2)],
    },
    256: {
        # 32×32 on 4 warps spills 104-160 B; ptxas gives 32×32 dq tiles on 4 warps 32 registers and spills kBs.
        "forward": [_config(32, 32, 4, 2), _config(32, 32, 8, 2)],
        "backward_preprocess": [_config(32, None, 8, 1)],
        "backward_dkdv": [_config(16, 32, 4, 1)],
        "backward_dq": [_config(32, 32, 4, 1), _config(32, 32, 8, 1), _config(64, 32, 8, 2)],
    },
}

#: Candidates only an architecture from this compute capability on may try: Hopper's register file and shared
#: memory hold 128×128 forward tiles.
_HOPPER_CONFIGS = {128: {"forward": [_config(128, 128, 8, 2)]}}
HOPPER = 90

_INTERPRETER_CONFIGS = {
    # Query and key tiles of different sizes, so that tests on short sequences cross tile and diagonal
    # boundaries in both directions; larger tiles only make the interpreter faster (fewer Python-level steps).
    "forward": [_config(64, 32, 4, 1)],
    "backward_preprocess": [_config(32, None, 4, 1)],
    "backward_dkdv": [_config(32, 64, 4, 1)],
    "backward_dq": [_config(64, 32, 4, 1)],
}

KERNELS = tuple(_INTERPRETER_CONFIGS)
#: The kernels of a forward call and those a backward call adds.
FORWARD_KERNELS = ("forward",)
BACKWARD_KERNELS = ("backward_preprocess", "backward_dkdv", "backward_dq")


def _width_class(block_d: int) -> int:
    return 128 if block_d <= 128 else 256


def candidates(kernel: str, block_d: int = 128, interpreter: Optional[bool] = None,
               capability: int = HOPPER) -> list[triton.Config]:
    """The configurations ``kernel`` may try for a head-dim tile of ``block_d`` on ``sm_<capability>`` (before
    the resource check)."""
    if kernel not in _INTERPRETER_CONFIGS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if interpreter is None:
        interpreter = interpreting()
    if interpreter:
        return list(_INTERPRETER_CONFIGS[kernel])
    width = _width_class(block_d)
    extra = _HOPPER_CONFIGS.get(width, {}).get(kernel, []) if capability >= HOPPER else []
    return list(_COMPILED_CONFIGS[width][kernel]) + list(extra)


def configs(kernel: str, interpreter: Optional[bool] = None) -> list[triton.Config]:
    """Every configuration the autotuner of ``kernel`` is built with (all head-dim tiles; the plan picks)."""
    if interpreter is None:
        interpreter = interpreting()
    if interpreter:
        return list(_INTERPRETER_CONFIGS[kernel])
    seen, out = set(), []
    for width in sorted(_COMPILED_CONFIGS):
        for c in _COMPILED_CONFIGS[width][kernel] + _HOPPER_CONFIGS.get(width, {}).get(kernel, []):
            if config_name(c) not in seen:
                seen.add(config_name(c))
                out.append(c)
    return out


def config_name(config: triton.Config) -> str:
    """``"BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"``."""
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}"


@dataclass(frozen=True)
class KernelFacts:
    """What decides a kernel's binary besides its tile configuration (the compile-time switches)."""

    dtype: torch.dtype
    head_dim: int
    block_p: int = 16
    has_prefix: bool = True
    varlen: bool = False
    causal: bool = True
    gate_tanh: bool = True
    grouped: bool = False  # GQA/MQA: more than one query head per kv head
    seqused: bool = False  # seqused_k given: each sequence reads only its first keys
    shared_offsets: bool = False  # varlen q and k share one cu_seqlens (packed self-attention)

    @property
    def block_d(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))

    @staticmethod
    def of(inp) -> "KernelFacts":
        """The facts of an :class:`~.problem.AttentionProblem`."""
        return KernelFacts(dtype=inp.dtype, head_dim=inp.head_dim,
                           block_p=max(16, triton.next_power_of_2(max(inp.prefix_len, 1))),
                           has_prefix=inp.prefix_len > 0, varlen=inp.varlen, causal=inp.causal,
                           gate_tanh=inp.gate_tanh, grouped=inp.heads_q != inp.heads_kv,
                           seqused=inp.seqused_k is not None, shared_offsets=inp.shares_offsets)


@dataclass(frozen=True)
class Resources:
    """What the compiler made of one configuration: per-thread registers and spilled bytes, per-block shared
    memory (bytes), and the shared memory the target allows a block."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    shared_limit: int

    @property
    def fits(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= self.shared_limit

    def why_not(self) -> str:
        """Why this configuration may not launch (empty when it may)."""
        problems = []
        if self.spill_bytes:
            problems.append(f"spills {self.spill_bytes} B/thread")
        if self.shared_bytes > self.shared_limit:
            problems.append(f"needs {self.shared_bytes} B of shared memory > {self.shared_limit} B")
        return ", ".join(problems)


def target_reason(dtype: torch.dtype, capability: int) -> Optional[str]:
    """Why the kernels cannot run ``dtype`` on compute capability ``capability`` at all (None when they can).

    float32 is declined on every GPU and left to the ``sdpa`` backend. In IEEE precision the kernels' fp32 tile
    products use no tensor cores and spill (3.5 KB/thread for the H100 forward at D = 128): slower than SDPA's
    own fp32 kernels. TF32 dots would use the tensor cores but round every operand to 10 mantissa bits (relative
    error ~5e-4 per product), which is not what a caller asking for fp32 expects, and would need a tolerance
    looser than the fp32 tests hold every other backend to. Training runs in bf16/fp16, where the kernels
    matter. Under the interpreter (CPU tensors, the tests) fp32 runs as every other dtype.
    """
    if dtype == torch.float32:
        return ("float32 on a GPU is left to the sdpa backend (IEEE-precision fp32 tiles use no tensor cores and "
                "spill; TF32 would lose the accuracy fp32 asks for)")
    if capability < MIN_CAPABILITY:
        return (f"compute capability sm_{capability} is older than sm_{MIN_CAPABILITY}, the oldest Triton "
                f"compiles for")
    if dtype == torch.bfloat16 and capability < MIN_BF16_CAPABILITY:
        return f"bfloat16 needs sm_{MIN_BF16_CAPABILITY} or newer (Ampere's tensor cores); this GPU is sm_{capability}"
    return None
