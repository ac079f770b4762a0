"""Tile configurations of every kernel, and which of them may launch on a given GPU.

Each kernel has a short list of candidate ``triton.Config`` (tile sizes, warps, pipeline stages) per head-dim
tile (:func:`candidates`). Which of them may launch is decided by the compiler, not by an estimate: every
candidate is compiled for the device's architecture and its registers, spills and shared memory are read from
the compiled kernel (:func:`launch_plan`, cached per key):

* at run time on CUDA, from Triton's compiled kernel object (``n_regs``, ``n_spills``, ``metadata.shared``) and
  the device's opt-in shared memory per block;
* ahead of time (no GPU, :mod:`.aot_compile`), from the cubin of ``triton.compile(..., target=GPUTarget(...))``
  and :data:`SHARED_MEMORY_PER_BLOCK`.

A configuration launches only if it spills nothing and fits the shared memory. When no candidate of a kernel
does, the plan is empty and the ``triton`` backend declines the inputs with that reason
(``not_supported_reasons``), so the automatic choice moves on; nothing fails at launch time.

Among the configurations that may launch, the autotuner times those whose tiles do not exceed the (power-of-two
bucket of the) sequence, keyed on :data:`AUTOTUNE_KEY`. Timing makes the choice depend on the run, so runs are
not bit-reproducible across processes; in **deterministic mode** (:func:`deterministic`: when
``torch.are_deterministic_algorithms_enabled()`` or ``FASTADAPTER_DETERMINISTIC=1``) the first configuration of
the plan is launched, a fixed choice per key, with no timing.

Under Triton's interpreter a single small configuration is used (no GPU timer; and small tiles still cover the
multi-tile paths on short test sequences); :func:`forced_configs` runs chosen configurations instead (the tests
run the compiled tile sizes under the interpreter with it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

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
_DETERMINISTIC_ENV = "FASTADAPTER_DETERMINISTIC"
_FALSE_VALUES = ("", "0", "false", "off", "no")


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


#: How resources of one (kernel, config, facts) are measured: ``resource_source(kernel, config, facts, target)``
#: with ``target`` a ``(capability, device index or None)`` pair; None means ahead of time.
def _measure(kernel: str, config: triton.Config, facts: KernelFacts, capability: int,
             device_index: Optional[int]) -> Resources:
    from . import aot_compile
    if device_index is None:
        return aot_compile.resources_ahead_of_time(kernel, config, facts, capability)
    return aot_compile.resources_on_device(kernel, config, facts, device_index)


_PLAN_LOCK = threading.Lock()
#: The switches a kernel does not take (its binary does not depend on them): normalised away from plan keys.
_IGNORED_FACTS = {"backward_preprocess": dict(causal=True, seqused=False, shared_offsets=False),
                  "backward_dkdv": dict(block_p=16, has_prefix=True, gate_tanh=True)}


def _relevant(kernel: str, facts: KernelFacts) -> KernelFacts:
    return dataclasses.replace(facts, **_IGNORED_FACTS.get(kernel, {}))


@functools.lru_cache(maxsize=None)
def _plan(kernel: str, facts: KernelFacts, capability: int, device_index: Optional[int]
          ) -> tuple[tuple[triton.Config, ...], tuple[str, ...]]:
    kept, rejected = [], []
    for config in candidates(kernel, facts.block_d, interpreter=False, capability=capability):
        resources = _measure(kernel, config, facts, capability, device_index)
        if resources.fits:
            kept.append(config)
        else:
            rejected.append(f"{config_name(config)}: {resources.why_not()}")
    return tuple(kept), tuple(rejected)


def launch_plan(kernel: str, facts: KernelFacts, capability: int, device_index: Optional[int] = None
                ) -> tuple[list[triton.Config], list[str]]:
    """``(configurations that may launch, why each other candidate may not)`` for ``kernel`` on ``facts``.

    ``capability`` is the compute capability (80 for sm_80); ``device_index`` the CUDA device to read the
    compiled kernel's figures on, or None to compile ahead of time. Cached per key; empty when nothing fits.
    """
    reason = target_reason(facts.dtype, capability)
    if reason:
        return [], [reason]
    with _PLAN_LOCK:
        kept, rejected = _plan(kernel, _relevant(kernel, facts), capability, device_index)
    return list(kept), list(rejected)


def decline_reason(kernel: str, facts: KernelFacts, capability: int, device_index: Optional[int] = None
                   ) -> Optional[str]:
    """The backend's reason to decline ``facts`` on this target because of ``kernel`` (None when it fits)."""
    kept, rejected = launch_plan(kernel, facts, capability, device_index)
    if kept:
        return None
    return (f"no {kernel} configuration fits sm_{capability} (dtype {facts.dtype}, head_dim {facts.head_dim}): "
            + "; ".join(rejected))


def deterministic() -> bool:
    """Deterministic mode: ``torch.are_deterministic_algorithms_enabled()`` or ``FASTADAPTER_DETERMINISTIC=1``.

    Then every launch uses the first configuration of the plan (a fixed choice per key) instead of the fastest
    one measured in this process, so GPU runs are bit-reproducible across processes (``--resume``).
    """
    env = os.environ.get(_DETERMINISTIC_ENV, "0").strip().lower() not in _FALSE_VALUES
    return env or torch.are_deterministic_algorithms_enabled()


_FORCED: dict[str, triton.Config] = {}


@contextlib.contextmanager
def forced_configs(chosen: dict[str, triton.Config]) -> Iterator[None]:
    """Launch ``chosen[kernel]`` instead of the autotuner's choice inside the block (tests, benchmarks)."""
    unknown = set(chosen) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; expected some of {KERNELS}")
    previous = dict(_FORCED)
    _FORCED.update(chosen)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(previous)


def _short_enough(configs_: list[triton.Config], args: dict) -> list[triton.Config]:
    """Drop configurations whose query tile (``BLOCK_M``) exceeds the query sequences' bucket or whose key tile
    (``BLOCK_N``) exceeds the key sequences' bucket, when a smaller configuration remains."""
    q_bucket = max(args["seqlen_q_bucket"], 16)
    k_bucket = max(args.get("seqlen_k_bucket", q_bucket), 16)
    short = [c for c in configs_ if c.kwargs["BLOCK_M"] <= q_bucket and c.kwargs.get("BLOCK_N", 0) <= k_bucket]
    return short or configs_


def _args_facts(args: dict, q: torch.Tensor) -> KernelFacts:
    return KernelFacts(dtype=q.dtype, head_dim=args["HEAD_DIM"], block_p=args.get("BLOCK_P", 16),
                       has_prefix=args.get("HAS_PREFIX", True), varlen=args["VARLEN"],
                       causal=args.get("CAUSAL", True), gate_tanh=args.get("GATE_TANH", True),
                       grouped=args["group"] != 1, seqused=args.get("HAS_SEQUSED", False),
                       shared_offsets=args.get("SHARED_OFFSETS", False))


def autotune_pruner(kernel: str) -> Callable:
    """An ``early_config_prune`` hook for ``triton.autotune``: the plan of the launch's device, shortened to
    the sequence. The launchers pass the kernel's arguments by keyword (``Q``, ``HEAD_DIM``, ``group``, ...)."""
    def early_config_prune(configs_, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        if interpreting() or q.device.type != "cuda":
            return list(configs_)
        facts = _args_facts(args, q)
        capability = args["ARCH"]
        kept, rejected = launch_plan(kernel, facts, capability, q.device.index)
        names = {config_name(c) for c in kept}
        launchable = [c for c in configs_ if config_name(c) in names]
        if not launchable:  # the backend declines such inputs before launching anything
            raise RuntimeError(f"no configuration of {kernel} fits this GPU: " + "; ".join(rejected))
        return _short_enough(launchable, args)
    return early_config_prune


#: What the tuned configuration depends on besides the tensors' dtypes (the autotuner adds those): the query and
#: the key sequences' buckets (a few queries over a long cache are not tuned as a long prefill), the head dim,
#: the prefix tile, the GQA group, the switches, and the device's architecture.
AUTOTUNE_KEY = ("seqlen_q_bucket", "seqlen_k_bucket", "HEAD_DIM", "BLOCK_P", "group", "CAUSAL", "VARLEN",
                "SHARED_OFFSETS", "HAS_SEQUSED", "HAS_PREFIX", "ARCH")


def autotune(kernel: str):
    """``triton.autotune`` for ``kernel``, keyed on those of :data:`AUTOTUNE_KEY` the kernel takes."""
    def decorate(fn):
        key = [name for name in AUTOTUNE_KEY if name in fn.arg_names]
        return triton.autotune(configs=configs(kernel), key=key,
                               prune_configs_by={"early_config_prune": autotune_pruner(kernel)})(fn)
    return decorate


def launch(kernel: str, autotuned, grid, args: dict) -> None:
    """Launch ``autotuned`` (a :func:`autotune` kernel) on ``grid`` with ``args``.

    A forced configuration (:func:`forced_configs`) or, in deterministic mode, the first configuration of the
    plan is launched directly; otherwise the autotuner chooses.
    """
    config = _FORCED.get(kernel)
    if config is None and deterministic():
        q = args["Q"]
        if interpreting() or q.device.type != "cuda":
            config = candidates(kernel, interpreter=True)[0] if interpreting() else None
        else:
            kept, rejected = launch_plan(kernel, _args_facts(args, q), args["ARCH"], q.device.index)
            if not kept:
                raise RuntimeError(f"no configuration of {kernel} fits this GPU: " + "; ".join(rejected))
            config = _short_enough(kept, args)[0]
    if config is None:
        autotuned[grid](**args)
    else:
        autotuned.fn[grid](**args, **config.all_kwargs())
