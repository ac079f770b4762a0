"""pytest set-up of the benchmark folder: pytest-benchmark options, and collection only when asked for.

``pytest benchmarks/ --benchmark-...`` runs :mod:`benchmarks.test_op_benchmarks`; a bare ``pytest`` at the root
of the checkout (or ``pytest tests/``) does not collect it, so that timing runs never slow the test suite.
"""
import pathlib

import pytest

_HERE = pathlib.Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("fastadapter benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-seqlens", default="128,512",
                    help="comma-separated sequence lengths of the op benchmarks (default: 128,512)")


def pytest_ignore_collect(collection_path, config):
    """Collect this folder only when a command-line path points inside it."""
    if _HERE not in (collection_path.resolve(), *collection_path.resolve().parents):
        return None
    asked = [pathlib.Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    inside = any(_HERE == path or _HERE in path.parents for path in asked)
    return None if inside else True


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    import torch
    return request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
