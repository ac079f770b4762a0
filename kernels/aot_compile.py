"""The compile matrix: every candidate configuration of every kernel compiled ahead of time (no GPU) for a grid
of architectures, dtypes and head dims, and which configurations the backend may launch or which combinations
it declines (why).

Each row is read by :mod:`.compiler_facts` (registers, spills, shared memory from the cubin); this module only
lays out the grid, runs it in parallel worker processes, and shapes the rows: the facts
``tests/kernels/test_kernels_compile.py`` checks and ``python -m fastadapter.kernels.report --json FILE`` saves.
Triton's own on-disk cache makes a second run fast.

Compilation needs ``@triton.jit`` functions; under ``TRITON_INTERPRET=1`` (the tests) the kernels are
interpreted Python functions instead, so the matrix is then produced by a child process with the interpreter
off (``python -m fastadapter.kernels.report``).
"""
from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from typing import Iterable, Optional

import torch

from ._interpreter import interpreting
from .compiler_facts import DTYPE_NAMES, check_capability, compile_row, config_key, parse_arch
from .configs import KERNELS, KernelFacts, Resources, candidates, target_reason
from .jit_functions import jit_function

#: The grid of the compile matrix: every architecture the backend is checked for, dtypes, head dims.
MATRIX_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
MATRIX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MATRIX_HEAD_DIMS = (64, 80, 128, 256)
#: LLaMA-7B attention: 32 heads of 128, the paper's prompt of 10 tokens, bf16 (the README's table).
LLAMA_7B = KernelFacts(dtype=torch.bfloat16, head_dim=128)

_DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


# -- the compile matrix ------------------------------------------------------------------------------------------

def _matrix_task(task: tuple) -> dict:
    kernel, key, capability, facts = task
    return compile_row(kernel, jit_function(kernel), key, capability, facts)


def _matrix_in_process(archs: tuple[str, ...], dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...],
                       workers: int) -> list[dict]:
    combos = [(parse_arch(a), dt, d) for a in archs for dt in dtypes for d in head_dims]
    tasks, declined = [], []
    for cc, dtype, head_dim in combos:
        check_capability(cc)
        facts = KernelFacts(dtype=dtype, head_dim=head_dim)
        reason = target_reason(dtype, cc)
        for kernel in KERNELS:
            if reason:
                declined.append(dict(kernel=kernel, config=None, arch=f"sm_{cc}", dtype=DTYPE_NAMES[dtype],
                                     head_dim=head_dim, declined=reason))
                continue
            for config in candidates(kernel, facts.block_d, interpreter=False, capability=cc):
                tasks.append((kernel, config_key(config), cc, facts))
    if workers > 1 and len(tasks) > 1:
        # Workers start from a clean interpreter (spawn) and inherit this process's environment (no interpreter).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            compiled = list(pool.map(_matrix_task, tasks, chunksize=1))
    else:
        compiled = [_matrix_task(t) for t in tasks]
    rows = []
    by_combo: dict[tuple, list[dict]] = {}
    for task, row in zip(tasks, compiled):
        kernel, _, cc, facts = task
        row = dict(row)
        resources = Resources(row["registers"], row["spill_bytes"], row["shared_bytes"], row["shared_limit"])
        row["launches"] = resources.fits
        if not resources.fits:
            row["rejected"] = resources.why_not()
        by_combo.setdefault((kernel, cc, facts), []).append(row)
        rows.append(row)
    for (kernel, cc, facts), combo_rows in by_combo.items():
        if not any(r["launches"] for r in combo_rows):
            rows.append(dict(kernel=kernel, config=None, arch=f"sm_{cc}", dtype=DTYPE_NAMES[facts.dtype],
                             head_dim=facts.head_dim,
                             declined=f"no {kernel} configuration fits sm_{cc} (dtype {facts.dtype}, head_dim "
                                      f"{facts.head_dim}): " + "; ".join(f"{r['config']}: {r['rejected']}"
                                                                           for r in combo_rows)))
    return rows + declined


def _jsonable(rows: list[dict], cubins: bool) -> list[dict]:
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "cubin" or cubins}
        if cubins and "cubin" in row:
            row["cubin"] = base64.b64encode(row["cubin"]).decode("ascii")
        out.append(row)
    return out


def _matrix_in_child(archs, dtypes, head_dims, workers: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "matrix.json")
        command = [sys.executable, "-m", "fastadapter.kernels.report", "--matrix", "--cubins", "--json", path,
                   "--archs", *archs, "--dtypes", *(DTYPE_NAMES[d] for d in dtypes),
                   "--head-dims", *(str(d) for d in head_dims), "--workers", str(workers)]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"the compile matrix child process failed:\n{result.stderr[-4000:]}")
        with open(path) as handle:
            rows = json.load(handle)
    for row in rows:
        if "cubin" in row:
            row["cubin"] = base64.b64decode(row["cubin"])
    return rows


def default_workers() -> int:
    """Worker processes for the matrix: one per CPU core (``FASTADAPTER_COMPILE_WORKERS`` overrides)."""
    return max(1, int(os.environ.get("FASTADAPTER_COMPILE_WORKERS", 0)) or os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _matrix(archs: tuple[str, ...], dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...],
            workers: int) -> tuple[dict, ...]:
    if interpreting():
        return tuple(_matrix_in_child(archs, dtypes, head_dims, workers))
    return tuple(_matrix_in_process(archs, dtypes, head_dims, workers))


def compile_matrix(archs: Iterable[str] = MATRIX_ARCHS, dtypes: Iterable[torch.dtype] = MATRIX_DTYPES,
                   head_dims: Iterable[int] = MATRIX_HEAD_DIMS, workers: Optional[int] = None) -> list[dict]:
    """Compile every candidate configuration of every kernel for each (arch, dtype, head dim).

    Returns one row per compiled (kernel, configuration, arch, dtype, head_dim) with ``registers`` (per thread),
    ``spill_bytes`` (stack + local memory per thread: 0 means no spills), ``shared_bytes`` (per block),
    ``shared_limit`` (the arch's), ``launches`` (the backend may launch it: no spills, fits) or ``rejected``
    (why not), ``tensor_cores`` (the tensor-core instruction families in the SASS), ``local_memory_instructions``
    and ``cubin``; plus one row with ``config`` None and ``declined`` (the backend's reason) per (kernel, arch,
    dtype, head_dim) for which nothing may launch. Representative inputs: :func:`representative_inputs` of
    ``KernelFacts(dtype, head_dim)`` (P = 10, causal, batched, tanh gate, one query head per kv head).
    """
    archs = tuple(archs)
    for arch in archs:
        check_capability(parse_arch(arch))
    return [dict(r) for r in _matrix(archs, tuple(dtypes), tuple(head_dims), workers or default_workers())]


def compile_report(archs: Iterable[str] = ("sm_80", "sm_90")) -> list[dict]:
    """The configurations the backend may launch at LLaMA-7B shapes (bf16, D = 128, P = 10), per arch: the
    rows of :func:`compile_matrix` that launch, each with ``seqlens`` (the S values of the README's table)."""
    return llama7b_rows(compile_matrix(archs, (LLAMA_7B.dtype,), (LLAMA_7B.head_dim,)))


def llama7b_rows(rows: list[dict]) -> list[dict]:
    """The rows of a compile matrix that may launch at LLaMA-7B shapes (bf16, D = 128), with ``seqlens``."""
    kept = [dict(r) for r in rows if r.get("launches") and r["dtype"] == DTYPE_NAMES[LLAMA_7B.dtype]
            and r["head_dim"] == LLAMA_7B.head_dim]
    for row in kept:
        row["seqlens"] = (512, 2048)
    return kept


# -- the compile-time branches the matrix does not take ----------------------------------------------------------

#: Input families compiled by :func:`compile_code_paths`, beyond the matrix's (batched, causal, P = 10, tanh).
CODE_PATHS = {
    "varlen-fp16-D72-P0-full-GQA": KernelFacts(dtype=torch.float16, head_dim=72, has_prefix=False, varlen=True,
                                               causal=False, grouped=True, shared_offsets=True),
    "varlen-seqused-bf16-D80-GQA": KernelFacts(dtype=torch.bfloat16, head_dim=80, varlen=True, grouped=True,
                                               seqused=True),
    "seqused-fp16-D128": KernelFacts(dtype=torch.float16, head_dim=128, seqused=True),
    "bf16-D64-P64-raw-gate": KernelFacts(dtype=torch.bfloat16, head_dim=64, block_p=64, gate_tanh=False),
}


def _code_paths_in_process(capability: int) -> list[dict]:
    rows = []
    for name, facts in CODE_PATHS.items():
        for kernel in KERNELS:
            config = candidates(kernel, facts.block_d, interpreter=False)[0]
            row = dict(compile_row(kernel, jit_function(kernel), config_key(config), capability, facts))
            row["code_path"] = name
            rows.append(row)
    return rows


def compile_code_paths(arch: str = "sm_80") -> list[dict]:
    """Compile every kernel, in its first configuration, for the inputs of :data:`CODE_PATHS` (varlen with shared
    and with separate key offsets, ``seqused_k`` dense and varlen, fp16, a padded head dim, no prefix, no mask, GQA, the 64-slot
    prefix, raw gate), so that a kernel change only the
    interpreter accepts is caught without a GPU. Rows as :func:`compile_matrix` with ``code_path``."""
    capability = parse_arch(arch)
    check_capability(capability)
    if not interpreting():
        return _code_paths_in_process(capability)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "paths.json")
        result = subprocess.run([sys.executable, "-m", "fastadapter.kernels.report", "--code-paths", "--cubins",
                                 "--json", path, "--archs", arch], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"the code-path compile child process failed:\n{result.stderr[-4000:]}")
        with open(path) as handle:
            rows = json.load(handle)
    for row in rows:
        row["cubin"] = base64.b64decode(row["cubin"])
    return rows


def write_json(rows: list[dict], path: str, cubins: bool = False) -> None:
    """Save ``rows`` as JSON (cubins base64-encoded when ``cubins``, else left out)."""
    with open(path, "w") as handle:
        json.dump(_jsonable(rows, cubins), handle, indent=1)
        handle.write("\n")


def dtype_of(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``."""
    if name not in _DTYPES_BY_NAME:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES_BY_NAME)}, got {name!r}")
    return _DTYPES_BY_NAME[name]
