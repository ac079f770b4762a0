"""Benchmarks run as on a CPU with fewer instructions than this one: every library in the process held to one ISA.

``FASTADAPTER_CPU_ISA=avx2`` selects fastadapter's AVX2 variant, but the alternatives it is measured against keep
this CPU's instructions: torch's SDPA and its bf16 products on AVX-512 and AMX, the oneDNN GEMM that sets the peak
on them too, MKL's sgemm (the AVX2 variant's products) on AVX-512. No real CPU gives that comparison. An emulated
CPU holds every library to the ISA, each through its own switch, read once when the library starts (so the switches
are set before the process starts):

=============  ==============================================================
torch          ``ATEN_CPU_CAPABILITY`` (the variant of torch's own kernels)
oneDNN         ``ONEDNN_MAX_CPU_ISA`` (its GEMMs and torch's checks for bf16 products follow it)
MKL            ``MKL_ENABLE_INSTRUCTIONS``
fastadapter    ``FASTADAPTER_CPU_ISA``
=============  ==============================================================

Two CPUs are emulated (:data:`EMULATIONS`): ``avx2`` (AVX2 + FMA, fastadapter's avx2 variant) and ``generic``
(x86-64 before AVX: SSE4, torch's baseline kernels, fastadapter's generic variant). What stays this CPU's own: its
caches, clock and memory. A benchmark with ``--emulate ISA`` re-runs itself in a child process with the switches
set (:func:`rerun_emulated`) and checks that torch took its own (:func:`check_emulation`)::

    python -m benchmarks.cpu_kernel_targets --emulate avx2 ...
    python -m benchmarks.bench_decode_linear --emulate avx2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

import torch

#: The switches of each emulated CPU (module docstring), by ``--emulate`` value.
EMULATIONS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "FASTADAPTER_CPU_ISA": "avx2"},
    # x86-64 before AVX (SSE4.2): torch's baseline kernels, fastadapter's generic variant
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "FASTADAPTER_CPU_ISA": "generic"},
}


def is_emulating(isa: str) -> bool:
    """Whether this process started with every switch of ``isa`` set (it runs as the emulated CPU)."""
    return all(os.environ.get(name) == value for name, value in EMULATIONS[isa].items())


def emulated_isa() -> Optional[str]:
    """The ISA this process emulates (:func:`is_emulating`), or None."""
    return next((isa for isa in EMULATIONS if is_emulating(isa)), None)


def rerun_emulated(isa: str, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` in a child process with the switches of ``isa`` set; its exit status.

    ``module`` is the caller's ``__spec__.name`` (``benchmarks.x`` from a checkout, ``fastadapter.benchmarks.x``
    from an install), ``argv`` its arguments, ``--emulate`` included (the child, finding the switches set, runs).
    """
    if isa not in EMULATIONS:
        raise ValueError(f"--emulate {isa!r}: expected one of {sorted(EMULATIONS)}")
    env = {**os.environ, **EMULATIONS[isa]}
    return subprocess.call([sys.executable, "-m", module, *argv], env=env)


def check_emulation(isa: str) -> None:
    """Raise if torch did not take the emulated ISA (a torch that ignores ``ATEN_CPU_CAPABILITY``, or a CPU
    without the ISA at all): the tables would then be those of another CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    wanted = EMULATIONS[isa]["ATEN_CPU_CAPABILITY"]
    if capability.lower() != wanted:
        raise RuntimeError(f"--emulate {isa}: torch runs its {capability} kernels, not {wanted.upper()} "
                           f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')!r}); a CPU without "
                           f"{isa.upper()} cannot emulate it")


def emulation_line() -> str:
    """What the process runs as: torch's kernel variant, and the switches of an emulated CPU that are set (the
    line a table of such a run carries under its context line)."""
    switches = sorted({name for switches in EMULATIONS.values() for name in switches} - {"FASTADAPTER_CPU_ISA"})
    set_here = [f"{name}={os.environ[name]}" for name in switches if name in os.environ]
    line = f"torch kernels {torch.backends.cpu.get_cpu_capability()}"
    return line + (f"; emulated CPU: {', '.join(set_here)}" if set_here else "")


def add_emulate_argument(parser: argparse.ArgumentParser) -> None:
    """``--emulate ISA`` on a benchmark's command line (:func:`run_emulated_if_asked` acts on it)."""
    parser.add_argument("--emulate", choices=sorted(EMULATIONS),
                        help="run as on a CPU with only this ISA: torch, oneDNN, MKL and fastadapter all held to it "
                             "(benchmarks/emulated_cpu.py), in a child process")


def run_emulated_if_asked(isa: Optional[str], module: str, argv: Optional[list[str]]) -> Optional[int]:
    """For a benchmark's ``main(argv)`` given ``--emulate isa``: the exit status of its run in a child process with
    the switches set (:func:`rerun_emulated`; ``argv`` None: ``sys.argv``), or None when this process is to run it
    (no ``--emulate``, or this is the child, whose torch is checked with :func:`check_emulation`)."""
    if not isa:
        return None
    if not is_emulating(isa):
        return rerun_emulated(isa, module, list(sys.argv[1:] if argv is None else argv))
    check_emulation(isa)
    return None
