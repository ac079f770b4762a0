"""Shared test set-up: Triton's interpreter on CPU, the real artifacts in ../shared/data, seeds."""
import os
import pathlib

# Must be set before triton is imported anywhere: the Triton backend runs CPU tensors under the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
