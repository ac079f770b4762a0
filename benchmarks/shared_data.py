"""Where the benchmarks find the real artifacts (Alpaca rows, LLaMA's tokenizer): one definition for every suite.

The folder is ``$FASTADAPTER_SHARED_DATA`` when set, else ``../shared/data`` beside the checkout (see that folder's
README for the public source of each file). It is read when a suite asks, not when a module is imported, so a run
started with the variable set finds it. A suite whose files are missing is skipped, with a one-line reason:
:func:`require` raises :class:`~benchmarks.runner.SuiteSkipped`, and the rest of the run goes on.
"""
from __future__ import annotations

import os
import pathlib

#: The environment variable naming the folder of real artifacts.
SHARED_DATA_ENV = "FASTADAPTER_SHARED_DATA"


def shared_data_dir() -> pathlib.Path:
    """``$FASTADAPTER_SHARED_DATA``, or ``../shared/data`` beside the checkout holding this package."""
    named = os.environ.get(SHARED_DATA_ENV)
    if named:
        return pathlib.Path(named)
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def missing_files(*names: str) -> list[str]:
    """Those of ``names`` that are not files of :func:`shared_data_dir`."""
    folder = shared_data_dir()
    return [name for name in names if not (folder / name).is_file()]


def require(*names: str) -> pathlib.Path:
    """The shared data folder, after checking that it holds every file of ``names``.

    Raises:
        benchmarks.runner.SuiteSkipped: some are missing (a suite that needs them cannot run here; one line:
            which files, which folder, how to name another).
    """
    missing = missing_files(*names)
    if missing:
        from .runner import SuiteSkipped
        raise SuiteSkipped(f"needs {', '.join(missing)} from the shared data folder {shared_data_dir()}, which "
                           f"{'does not exist' if not shared_data_dir().is_dir() else 'lacks them'} (set "
                           f"{SHARED_DATA_ENV} to the folder holding them)")
    return shared_data_dir()
