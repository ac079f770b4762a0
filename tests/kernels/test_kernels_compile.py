"""Ahead-of-time compilation of every Triton kernel for the GPUs the backend accepts, without a GPU, checked
against facts read from the cubins: for sm_80 (A100), sm_86 (A10, RTX 3090), sm_89 (L4, L40S, RTX 4090) and
sm_90 (H100, H200), fp16/bf16/fp32 and head dims 64, 80, 128, 256, every configuration the backend may launch
compiles with zero spills within that architecture's shared memory, and every combination either has such a
configuration or is declined by the backend with a reason. Also: 64-bit row offsets in every kernel, tensor
cores at LLaMA-7B shapes, and the compile-time branches the matrix does not take.

The whole matrix compiles 206 binaries in parallel worker processes (a child process: the tests run the
interpreter); ~13 CPU-minutes cold, Triton's on-disk cache makes later runs a few minutes (reading every cubin
back). Its tests are marked ``slow``; under ``-m slow`` (CI) they run on a representative half of it (see
:func:`matrix_combos`), on all of it with ``FASTADAPTER_FULL_COMPILE_MATRIX=1``. The default run checks LLaMA-7B's
part of it (bf16, D = 128 on sm_80 and sm_90) with the same assertions."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fastadapter.backends import get_backend
from fastadapter.kernels import autotune as kernel_autotune
from fastadapter.kernels import configs as kernel_configs
from fastadapter.kernels.aot_compile import (CODE_PATHS, MATRIX_ARCHS, MATRIX_DTYPES, MATRIX_HEAD_DIMS,
                                             compile_code_paths, compile_matrix, llama7b_rows, parse_arch)
from fastadapter.kernels.report import format_table, summary

from attention_cases import Case, backend_inputs

#: Shared memory a block may opt in to (CUDA C Programming Guide, "Technical Specifications per Compute
#: Capability"): the facts the cubins are held to, written here independently of the backend's own table.
OPT_IN_SHARED_MEMORY = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


#: Compile the whole matrix under -m slow, not only its representative half.
FULL_MATRIX = os.environ.get("FASTADAPTER_FULL_COMPILE_MATRIX") == "1"


def matrix_combos(full: bool = FULL_MATRIX) -> list[tuple[str, torch.dtype, int]]:
    """``(arch, dtype, head dim)`` of the matrix the slow tests compile. The whole one, or its representative half:
    every arch with every head dim (the shared-memory and register limits differ by both), each pair in fp16 or
    bf16 alternately, so every arch and every head dim is compiled in both half dtypes; fp32 everywhere (declined
    without compiling)."""
    combos = []
    for i, arch in enumerate(MATRIX_ARCHS):
        for j, head_dim in enumerate(MATRIX_HEAD_DIMS):
            half = (torch.float16, torch.bfloat16)[(i + j) % 2]
            combos += [(arch, dtype, head_dim) for dtype in MATRIX_DTYPES
                       if full or dtype in (half, torch.float32)]
    return combos


@pytest.fixture(scope="module")
def matrix():
    """The matrix of :func:`matrix_combos` (slow), compiled in a few blocks of archs x dtype x head dims (each
    block is one child process)."""
    head_dims: dict[tuple[str, torch.dtype], tuple[int, ...]] = {}
    for arch, dtype, head_dim in matrix_combos():
        head_dims[(arch, dtype)] = head_dims.get((arch, dtype), ()) + (head_dim,)
    blocks: dict[tuple[torch.dtype, tuple[int, ...]], list[str]] = {}
    for (arch, dtype), dims in head_dims.items():
        blocks.setdefault((dtype, dims), []).append(arch)
    return [row for (dtype, dims), archs in blocks.items() for row in compile_matrix(archs, (dtype,), dims)]


@pytest.fixture(scope="module")
def llama_matrix():
    """LLaMA-7B's part of the matrix (bf16, D = 128) on A100 and H100: what the default test run compiles."""
    return compile_matrix(archs=("sm_80", "sm_90"), dtypes=(torch.bfloat16,), head_dims=(128,))


#: The tests that hold for any part of the matrix run on LLaMA-7B's part by default and on the whole under -m slow.
PARTS = [pytest.param("llama_matrix", id="llama-7b"), pytest.param("matrix", id="whole", marks=pytest.mark.slow)]


def _combos():
    return [(arch, DTYPES[dtype], d) for arch, dtype, d in matrix_combos()]


def test_the_matrix_is_the_one_asked_for():
    assert set(MATRIX_ARCHS) == set(OPT_IN_SHARED_MEMORY)
    assert set(MATRIX_DTYPES) == set(DTYPES) and set(MATRIX_HEAD_DIMS) == {64, 80, 128, 256}
    whole, half = matrix_combos(full=True), matrix_combos(full=False)
    assert len(whole) == len(MATRIX_ARCHS) * len(MATRIX_DTYPES) * len(MATRIX_HEAD_DIMS) and set(half) < set(whole)
    # The representative half: every (arch, head dim) pair once in a half dtype, both half dtypes on every arch
    # and every head dim, fp32 everywhere.
    halves = [(a, t, d) for a, t, d in half if t != torch.float32]
    assert sorted((a, d) for a, _, d in halves) == sorted((a, d) for a in MATRIX_ARCHS for d in MATRIX_HEAD_DIMS)
    for arch in MATRIX_ARCHS:
        assert {t for a, t, _ in halves if a == arch} == {torch.float16, torch.bfloat16}, arch
    for head_dim in MATRIX_HEAD_DIMS:
        assert {t for _, t, d in halves if d == head_dim} == {torch.float16, torch.bfloat16}, head_dim
    assert {(a, d) for a, t, d in half if t == torch.float32} == {(a, d) for a in MATRIX_ARCHS for d in MATRIX_HEAD_DIMS}


@pytest.mark.parametrize("part", PARTS)
def test_every_configuration_that_may_launch_has_no_spills_and_fits_shared_memory(part, request):
    matrix = request.getfixturevalue(part)
    launched = [r for r in matrix if r.get("launches")]
    assert launched
    for row in launched:
        what = f"{row['kernel']} [{row['config']}] {row['dtype']} D={row['head_dim']} on {row['arch']}"
        assert row["cubin"][:4] == b"\x7fELF", f"{what}: not a cubin"
        assert row["spill_bytes"] == 0, f"{what} spills {row['spill_bytes']} bytes"
        assert row["local_memory_instructions"] == 0, f"{what} reads or writes local memory"
        assert 0 < row["registers"] <= 255, f"{what} uses {row['registers']} registers"
        assert 0 < row["shared_bytes"] <= OPT_IN_SHARED_MEMORY[row["arch"]], (
            f"{what} needs {row['shared_bytes']} B of shared memory")


@pytest.mark.slow
def test_every_combination_runs_or_is_declined_with_a_reason(matrix):
    for arch, dtype, head_dim in _combos():
        for kernel in kernel_configs.KERNELS:
            rows = [r for r in matrix if (r["arch"], r["dtype"], r["head_dim"], r["kernel"]) ==
                    (arch, dtype, head_dim, kernel)]
            what = f"{kernel} {dtype} D={head_dim} on {arch}"
            launches = [r for r in rows if r.get("launches")]
            declined = [r for r in rows if r.get("config") is None]
            assert bool(launches) != bool(declined), f"{what}: {len(launches)} configurations and {declined}"
            if declined:
                assert declined[0]["declined"], what
                # Declined only when the cubins say so: every compiled candidate spills or does not fit.
                for r in rows:
                    if r.get("config") is not None:
                        assert r["spill_bytes"] or r["shared_bytes"] > OPT_IN_SHARED_MEMORY[arch], r
            compiled = {r["config"] for r in rows if r.get("config") is not None}
            block_d = max(16, 1 << (head_dim - 1).bit_length())
            if dtype != "fp32":  # every candidate the backend may try was compiled
                assert compiled == {kernel_configs.config_name(c)
                                    for c in kernel_configs.candidates(kernel, block_d, interpreter=False,
                                                                       capability=parse_arch(arch))}
    # fp32 is declined on every GPU (left to sdpa), without compiling.
    fp32 = [r for r in matrix if r["dtype"] == "fp32"]
    assert fp32 and all(r.get("config") is None and "sdpa" in r["declined"] for r in fp32)


@pytest.mark.slow
def test_the_backend_gives_the_same_answer_from_these_figures(matrix, monkeypatch):
    """The backend's own decision (not_supported_reasons on a GPU), fed the cubins' figures: it runs what the
    matrix says runs and declines, with the kernel named, what the matrix declines."""
    figures = {(r["kernel"], r["config"], r["arch"], r["dtype"], r["head_dim"]): r for r in matrix
               if r.get("config") is not None}

    def measure(kernel, fn, config, facts, capability, device_index):
        r = figures[(kernel, kernel_configs.config_name(config), f"sm_{capability}", DTYPES[facts.dtype],
                     facts.head_dim)]
        return kernel_configs.Resources(r["registers"], r["spill_bytes"], r["shared_bytes"],
                                        OPT_IN_SHARED_MEMORY[f"sm_{capability}"])
    monkeypatch.setattr(kernel_autotune, "_measure", measure)
    kernel_autotune._plan.cache_clear()
    backend = get_backend("triton")
    try:
        for arch, dtype, head_dim in _combos():
            case = Case(batch=1, seqlen_q=4, seqlen_k=4, heads_q=2, heads_kv=2, head_dim=head_dim,
                        dtype={v: k for k, v in DTYPES.items()}[dtype])
            inp = backend_inputs(case)
            inp = dataclasses.replace(inp, q=inp.q.requires_grad_(True))  # judged on the backward kernels too
            reasons = backend.target_reasons(inp, parse_arch(arch), None)
            declined = {r["kernel"] for r in matrix if r.get("config") is None
                        and (r["arch"], r["dtype"], r["head_dim"]) == (arch, dtype, head_dim)}
            if dtype == "fp32":
                assert len(reasons) == 1 and "sdpa" in reasons[0]
            else:
                assert len(reasons) == len(declined), (arch, dtype, head_dim, reasons)
                for kernel in declined:
                    assert any(f"no {kernel} configuration fits {arch}" in r for r in reasons)
    finally:
        kernel_autotune._plan.cache_clear()


@pytest.mark.parametrize("part", PARTS)
def test_row_offsets_are_64_bit_in_every_kernel(part, request):
    """No 32-bit tensor products in the Triton IR: ``row · stride`` cannot wrap (it did: int32 in tiles.py)."""
    matrix = request.getfixturevalue(part)
    for row in matrix:
        if row.get("config") is not None:
            assert row["i32_tensor_products"] == 0, f"{row['kernel']} {row['dtype']} D={row['head_dim']}"


def test_tensor_cores_at_llama_7b_shapes(llama_matrix):
    """What compile_report (``fastadapter bench --compile-report``) lists: the launchable LLaMA-7B binaries."""
    rows = [r for r in llama7b_rows(llama_matrix) if r["arch"] in ("sm_80", "sm_90")]
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in kernel_configs.KERNELS
                                                         for a in ("sm_80", "sm_90")}
    for row in rows:
        assert row["tensor_cores"], f"{row['kernel']} [{row['config']}] on {row['arch']}: no HMMA/HGMMA"
    # Hopper's warpgroup MMA is used by the tile-multiplying main loops.
    for kernel in ("forward", "backward_dkdv", "backward_dq"):
        assert all("HGMMA" in r["tensor_cores"] for r in rows if r["kernel"] == kernel and r["arch"] == "sm_90")
    assert len(format_table(rows).splitlines()) == 2 + len(rows)


def test_every_code_path_compiles():
    rows = compile_code_paths("sm_80")
    assert {(r["kernel"], r["code_path"]) for r in rows} == {(k, c) for k in kernel_configs.KERNELS for c in CODE_PATHS}
    for row in rows:
        assert row["cubin"][:4] == b"\x7fELF"
        assert row["i32_tensor_products"] == 0
        multiplies_tiles = not (row["kernel"] == "backward_preprocess" and "-P0-" in row["code_path"])
        assert bool(row["tensor_cores"]) == multiplies_tiles, f"{row['kernel']} on {row['code_path']}"


@pytest.mark.slow
def test_report_command_writes_the_rows(tmp_path, matrix):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastadapter.kernels.report", "--json", str(out), "--archs",
                           "sm_86", "--dtypes", "bf16", "fp32", "--head-dims", "64"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    for row in rows:
        assert {"kernel", "config", "arch", "dtype", "head_dim"} <= set(row) and "cubin" not in row
        if row["config"] is None:
            assert row["declined"]
        else:
            assert {"registers", "spill_bytes", "shared_bytes", "launches"} <= set(row)
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    assert "sm_86 bf16 D=64: runs" in done.stderr and "sm_86 fp32 D=64: declined" in done.stderr
    assert "sm_86 bf16 D=128" in summary(matrix)


def test_bad_arch_is_explained():
    with pytest.raises(ValueError, match="sm_80"):
        parse_arch("ampere")
    with pytest.raises(ValueError, match="no shared-memory budget known for sm_61"):
        compile_matrix(("sm_61",))
