"""Ahead-of-time compilation of every Triton kernel and configuration for A100 (sm_80) and H100 (sm_90) at
LLaMA-7B shapes, without a GPU: it builds, never spills, fits shared memory and uses the tensor cores. And the
compile-time branches those shapes do not take (varlen, fp16, padded head dim, no prefix...) build too."""
import pytest

from fastadapter.kernels import compile_report
from fastadapter.kernels import configs as kernel_configs
from fastadapter.kernels.aot_compile import CODE_PATHS, LLAMA_7B, SEQLENS, compile_code_paths, parse_arch
from fastadapter.kernels.report import format_table

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def report():
    return compile_report(ARCHS)


def test_every_kernel_compiles_for_every_arch(report):
    built = {(row["kernel"], row["arch"]) for row in report}
    assert built == {(kernel, arch) for kernel in kernel_configs.KERNELS for arch in ARCHS}
    for row in report:
        assert row["cubin"][:4] == b"\x7fELF", f"{row['kernel']} {row['config']} {row['arch']}: not a cubin"
        assert set(row["seqlens"]) <= set(SEQLENS)


def test_report_covers_exactly_the_configurations_the_autotuner_may_pick(report):
    for arch in ARCHS:
        cc = parse_arch(arch)
        for kernel in kernel_configs.KERNELS:
            expected = set()
            for seqlen in SEQLENS:
                kept = kernel_configs.prune(kernel, kernel_configs.configs(kernel, interpreter=False),
                                            block_d=LLAMA_7B["head_dim"], block_p=16, element_bytes=2,
                                            shared_memory_limit=kernel_configs.SHARED_MEMORY_PER_BLOCK[cc],
                                            seqlen_bucket=seqlen)
                expected |= {str(c.kwargs) + str((c.num_warps, c.num_stages)) for c in kept}
            rows = [r for r in report if r["kernel"] == kernel and r["arch"] == arch]
            assert len(rows) == len(expected), f"{kernel} on {arch}: {len(rows)} binaries for {expected}"


def test_no_spills_and_within_hardware_limits(report):
    for row in report:
        what = f"{row['kernel']} [{row['config']}] on {row['arch']}"
        assert row["spill_bytes"] == 0, f"{what} spills {row['spill_bytes']} bytes"
        assert row["local_memory_instructions"] == 0, f"{what} reads or writes local memory"
        assert 0 < row["registers"] <= 255, f"{what} uses {row['registers']} registers"
        limit = kernel_configs.SHARED_MEMORY_PER_BLOCK[parse_arch(row["arch"])]
        assert 0 < row["shared_bytes"] <= limit, f"{what} needs {row['shared_bytes']} B of shared memory"


def test_tensor_cores_in_every_kernel(report):
    for row in report:
        assert row["tensor_cores"], f"{row['kernel']} [{row['config']}] on {row['arch']}: no HMMA/HGMMA"
    # Hopper's warpgroup MMA is used by the tile-multiplying main loops.
    for kernel in ("forward", "backward_dkdv", "backward_dq"):
        assert all("HGMMA" in r["tensor_cores"] for r in report if r["kernel"] == kernel and r["arch"] == "sm_90")


def test_table_lists_every_binary(report):
    table = format_table(report).splitlines()
    assert len(table) == 2 + len(report)
    assert all(kernel in "\n".join(table) for kernel in kernel_configs.KERNELS)


def test_every_code_path_compiles():
    rows = compile_code_paths(("sm_80",))
    assert {(r["kernel"], r["code_path"]) for r in rows} == {(k, c) for k in kernel_configs.KERNELS for c in CODE_PATHS}
    for row in rows:
        assert row["cubin"][:4] == b"\x7fELF"
        multiplies_tiles = not (row["kernel"] == "backward_preprocess" and "-P0-" in row["code_path"])
        assert bool(row["tensor_cores"]) == multiplies_tiles, f"{row['kernel']} on {row['code_path']}"


def test_bad_arch_is_explained():
    with pytest.raises(ValueError, match="sm_80"):
        parse_arch("ampere")
    with pytest.raises(ValueError, match="no shared-memory budget known for sm_75"):
        compile_report(("sm_75",))
