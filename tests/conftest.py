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
