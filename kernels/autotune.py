"""Which tile configurations of a kernel may launch on a GPU (the launch plan), and the autotuner that picks
among them.

The plan of a kernel on a target is decided by the compiler, not by an estimate: each candidate of
:func:`.configs.candidates` is compiled for the target and its registers, spills and shared memory read back
(:mod:`.compiler_facts`); a configuration launches only if it spills nothing and fits the shared memory
(:func:`launch_plan`, cached per key):

* at run time on CUDA, from Triton's compiled kernel object and the device's opt-in shared memory per block;
* ahead of time (no GPU), from the cubin of ``triton.compile(..., target=GPUTarget(...))`` and
  :data:`.configs.SHARED_MEMORY_PER_BLOCK`.

When no candidate of a kernel fits, the plan is empty and the ``triton`` backend declines the inputs with that
reason (:func:`decline_reason`), so the automatic choice moves on; nothing fails at launch time.

The plan compiles the ``@triton.jit`` function it is handed: :func:`autotune` binds the function it decorates
into the autotuner's pruner, :func:`launch` hands over the function under the autotuner, and a caller above the
kernels takes it from :mod:`.jit_functions`. This module imports no kernel (the kernels import it).

Among the configurations that may launch, the autotuner times those whose tiles do not exceed the (power-of-two
bucket of the) sequence, keyed on :data:`AUTOTUNE_KEY`. Timing makes the choice depend on the run, so runs are
not bit-reproducible across processes; in **deterministic mode** (:func:`deterministic`: when
``torch.are_deterministic_algorithms_enabled()`` or ``FASTADAPTER_DETERMINISTIC=1``) the first configuration of
the plan is launched, a fixed choice per key, with no timing.

Under Triton's interpreter the one small configuration of :func:`.configs.candidates` runs (no GPU timer);
:func:`forced_configs` runs chosen configurations instead (the tests run the compiled tile sizes under the
interpreter with it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Callable, Iterator, Optional

import torch
import triton

from . import compiler_facts
from ._interpreter import interpreting
from .configs import KERNELS, KernelFacts, Resources, candidates, config_name, configs, target_reason

_DETERMINISTIC_ENV = "FASTADAPTER_DETERMINISTIC"
_FALSE_VALUES = ("", "0", "false", "off", "no")


def _measure(kernel: str, fn, config: triton.Config, facts: KernelFacts, capability: int,
             device_index: Optional[int]) -> Resources:
    """What the compiler makes of ``fn`` (the ``@triton.jit`` function of ``kernel``) in ``config`` on ``facts``:
    read on CUDA device ``device_index``, or ahead of time for ``sm_<capability>`` when it is None."""
    if device_index is None:
        return compiler_facts.resources_ahead_of_time(kernel, fn, config, facts, capability)
    return compiler_facts.resources_on_device(kernel, fn, config, facts, device_index)


_PLAN_LOCK = threading.Lock()
#: The switches a kernel does not take (its binary does not depend on them): normalised away from plan keys.
_IGNORED_FACTS = {"backward_preprocess": dict(causal=True, seqused=False, shared_offsets=False),
                  "backward_dkdv": dict(block_p=16, has_prefix=True, gate_tanh=True)}


def _relevant(kernel: str, facts: KernelFacts) -> KernelFacts:
    return dataclasses.replace(facts, **_IGNORED_FACTS.get(kernel, {}))


@functools.lru_cache(maxsize=None)
def _plan(kernel: str, fn, facts: KernelFacts, capability: int, device_index: Optional[int]
          ) -> tuple[tuple[triton.Config, ...], tuple[str, ...]]:
    kept, rejected = [], []
    for config in candidates(kernel, facts.block_d, interpreter=False, capability=capability):
        resources = _measure(kernel, fn, config, facts, capability, device_index)
        if resources.fits:
            kept.append(config)
        else:
            rejected.append(f"{config_name(config)}: {resources.why_not()}")
    return tuple(kept), tuple(rejected)


def launch_plan(kernel: str, fn, facts: KernelFacts, capability: int, device_index: Optional[int] = None
                ) -> tuple[list[triton.Config], list[str]]:
    """``(configurations that may launch, why each other candidate may not)`` for ``kernel`` on ``facts``.

    ``fn`` is the kernel's ``@triton.jit`` function (:func:`.jit_functions.jit_function`); ``capability`` the
    compute capability (80 for sm_80); ``device_index`` the CUDA device to read the compiled kernel's figures on,
    or None to compile ahead of time. Cached per key; empty when nothing fits.
    """
    reason = target_reason(facts.dtype, capability)
    if reason:
        return [], [reason]
    with _PLAN_LOCK:
        kept, rejected = _plan(kernel, fn, _relevant(kernel, facts), capability, device_index)
    return list(kept), list(rejected)


def decline_reason(kernel: str, fn, facts: KernelFacts, capability: int, device_index: Optional[int] = None
                   ) -> Optional[str]:
    """The backend's reason to decline ``facts`` on this target because of ``kernel`` (None when it fits)."""
    kept, rejected = launch_plan(kernel, fn, facts, capability, device_index)
    if kept:
        return None
    return (f"no {kernel} configuration fits sm_{capability} (dtype {facts.dtype}, head_dim {facts.head_dim}): "
            + "; ".join(rejected))


def deterministic() -> bool:
    """Deterministic mode: ``torch.are_deterministic_algorithms_enabled()`` or ``FASTADAPTER_DETERMINISTIC=1``.

    Then every launch uses the first configuration of the plan (a fixed choice per key) instead of the fastest
    one measured in this process, so GPU runs are bit-reproducible across processes (a resumed run).
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


def autotune_pruner(kernel: str, fn) -> Callable:
    """An ``early_config_prune`` hook for ``triton.autotune`` of ``fn`` (the ``@triton.jit`` function of
    ``kernel``): the plan of the launch's device, shortened to the sequence. The launchers pass the kernel's
    arguments by keyword (``Q``, ``HEAD_DIM``, ``group``, ...)."""
    def early_config_prune(configs_, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        if interpreting() or q.device.type != "cuda":
            return list(configs_)
        facts = _args_facts(args, q)
        capability = args["ARCH"]
        kept, rejected = launch_plan(kernel, fn, facts, capability, q.device.index)
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
    """``triton.autotune`` for ``kernel``, keyed on those of :data:`AUTOTUNE_KEY` the kernel takes; its pruner
    compiles the very function decorated."""
    def decorate(fn):
        key = [name for name in AUTOTUNE_KEY if name in fn.arg_names]
        return triton.autotune(configs=configs(kernel), key=key,
                               prune_configs_by={"early_config_prune": autotune_pruner(kernel, fn)})(fn)
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
            kept, rejected = launch_plan(kernel, autotuned.fn, _args_facts(args, q), args["ARCH"], q.device.index)
            if not kept:
                raise RuntimeError(f"no configuration of {kernel} fits this GPU: " + "; ".join(rejected))
            config = _short_enough(kept, args)[0]
    if config is None:
        autotuned[grid](**args)
    else:
        autotuned.fn[grid](**args, **config.all_kwargs())
