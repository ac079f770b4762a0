"""Every install route gives the C++ CPU kernels, each in a fresh virtual environment (Python's own pip).

Slow (minutes: each route compiles csrc/ once), so marked ``slow``: ``python -m pytest -m slow tests/test_install.py``
runs them; the default run of the suite deselects nothing, so CI runs them with everything else unless told
``-m 'not slow'``. Cheap where the route allows: torch comes from pip's cache or a local wheel (``pip install
torch==2.13.0`` as the README says), the routes install without dependencies where pip lets them (``--no-deps``
plus the four small runtime packages), ``pip install .`` and ``pip wheel`` share one source copy, so the wheel's
build reuses the objects of the install before it, and the wheel is installed, not built, in its own venv.

Each route must end with ``python -m fastadapter.info`` (run outside the checkout) reporting the ``cpu`` backend
available: the failure of issue 15 was an editable install with the ``wheel`` package present that silently had
no kernels.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TORCH = f"torch=={torch.__version__.split('+')[0]}"
RUNTIME_DEPS = ["numpy", "safetensors", "sentencepiece", "tqdm"]
# The README installs `wheel` beside torch: with --no-build-isolation, pip builds with the venv's own setuptools,
# and Python 3.11's (65.5) makes wheels, editable ones included, only through the `wheel` package.
BUILD_DEPS = ["wheel"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.pop("FASTADAPTER_SKIP_BUILD", None)
    env.update({"PIP_NO_INPUT": "1", "MAX_JOBS": env.get("MAX_JOBS", "2"), **extra})
    return env


def _run(args: list[str], cwd: Path, **extra_env: str) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(**extra_env), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n{output[-4000:]}"
    return output


def _copy_of_repo(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (no built library, no build/), as a user's
    fresh clone has them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True)
    if listed.returncode != 0:
        pytest.skip("needs a git checkout to copy the sources from")
    for name in listed.stdout.splitlines():
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _fresh_venv(path: Path, *packages: str) -> Path:
    """A new venv with torch (as the README installs it) and ``packages``; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    _run([python, "-m", "pip", "install", TORCH, *packages], cwd=path)
    return python


def _assert_cpu_backend_available(python: Path, cwd: Path, **extra_env: str) -> str:
    output = _run([python, "-m", "fastadapter.info"], cwd=cwd, TRITON_INTERPRET="0", **extra_env)
    cpu = [line for line in output.splitlines() if line.split()[:1] == ["cpu"]]
    assert cpu and " available " in cpu[0] + " " and "unavailable" not in cpu[0], output
    return output


@pytest.fixture(scope="module")
def shared_source(tmp_path_factory) -> Path:
    return _copy_of_repo(tmp_path_factory.mktemp("source"))


def test_readme_editable_install_with_wheel_present_builds_the_kernels(tmp_path):
    """Issue 15's route: ``wheel`` installed, then the README's editable install (its extras left out). Before
    pyproject.toml, pip took the legacy ``setup.py develop`` route here and the kernels silently went missing."""
    source = _copy_of_repo(tmp_path / "source")
    python = _fresh_venv(tmp_path / "venv", *BUILD_DEPS, *RUNTIME_DEPS)
    _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", source], cwd=tmp_path)
    assert glob.glob(str(source / "fastadapter" / "_C*.so")), "the editable install built no fastadapter._C"
    _assert_cpu_backend_available(python, tmp_path, FASTADAPTER_SKIP_BUILD="1")


def test_non_editable_install_then_wheel_install(shared_source, tmp_path):
    """``pip install .`` works; then ``pip wheel`` from the same source gives a wheel that a fresh venv installs
    (no compiler needed: CXX names none) and runs."""
    python = _fresh_venv(tmp_path / "venv", *BUILD_DEPS, *RUNTIME_DEPS)
    _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", shared_source], cwd=tmp_path)
    _assert_cpu_backend_available(python, tmp_path, FASTADAPTER_SKIP_BUILD="1")

    wheels = tmp_path / "wheels"
    _run([python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", wheels, shared_source],
         cwd=tmp_path)
    (wheel,) = glob.glob(str(wheels / "fastadapter-*.whl"))
    listing = subprocess.run([python, "-m", "zipfile", "-l", wheel], capture_output=True, text=True).stdout
    assert "fastadapter/_C" in listing, listing
    other = _fresh_venv(tmp_path / "venv-wheel", *RUNTIME_DEPS)
    _run([other, "-m", "pip", "install", "--no-deps", wheel], cwd=tmp_path)
    _assert_cpu_backend_available(other, tmp_path, FASTADAPTER_SKIP_BUILD="1", CXX="no-such-compiler")


def test_install_without_kernels_builds_them_on_first_use(tmp_path):
    """An install that skipped the kernels (FASTADAPTER_SKIP_BUILD=1 at install time) builds them on first use,
    with a message, into the torch extensions cache; the second use loads them from there."""
    source = _copy_of_repo(tmp_path / "source")
    python = _fresh_venv(tmp_path / "venv", *BUILD_DEPS, *RUNTIME_DEPS)
    _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", source], cwd=tmp_path,
         FASTADAPTER_SKIP_BUILD="1")
    assert not glob.glob(str(source / "fastadapter" / "_C*.so"))
    cache = tmp_path / "torch_extensions"
    first = _assert_cpu_backend_available(python, tmp_path, TORCH_EXTENSIONS_DIR=str(cache))
    assert "fastadapter: building the C++ CPU kernels" in first and "built the C++ CPU kernels in" in first, first
    second = _assert_cpu_backend_available(python, tmp_path, TORCH_EXTENSIONS_DIR=str(cache))
    assert "building the C++ CPU kernels" not in second, second
    skipped = _run([python, "-m", "fastadapter.info"], cwd=tmp_path, TRITON_INTERPRET="0",
                   TORCH_EXTENSIONS_DIR=str(tmp_path / "empty_cache"), FASTADAPTER_SKIP_BUILD="1")
    assert "FASTADAPTER_SKIP_BUILD=1" in skipped and "building the C++" not in skipped, skipped
