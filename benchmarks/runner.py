"""The benchmark runner behind ``fastadapter bench``: find the suites, run them, save and draw the results.

A suite is a module ``benchmarks/bench_<name>.py`` with ``run(quick: bool, device: str) -> list[dict]``
returning flat rows (``suite, provider, mode, config, median_ms, p20_ms, p80_ms`` and optional ``tflops,
peak_mem_mb, saved_bytes, tokens_per_s``; a row with ``skipped`` set and ``median_ms`` None records a shape not
run and why). A suite whose ``run`` also accepts ``full`` (keyword) gets the long sweep with ``--full``, and one
accepting ``log`` prints its progress through the runner. A suite that raises does not stop the others: its
error is printed and saved with the results. The time of each suite and of the run is printed and saved, with a
warning when a preset overruns its budget (:data:`PRESET_BUDGET_SECONDS`).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import pathlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from .metadata import collect_metadata
from .report import format_table, write_csv, write_json

BENCH_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
#: Fields every measured row must have.
REQUIRED_FIELDS = ("suite", "provider", "mode", "config", "median_ms", "p20_ms", "p80_ms")
PRESETS = ("quick", "default", "full")
#: Wall time a whole run of each preset should stay under on a 2-core CPU (None: no budget). Overrunning it only
#: warns: the results are kept, but the preset's shapes want shrinking (or the machine was busy).
PRESET_BUDGET_SECONDS = {"quick": 120.0, "default": None, "full": 1800.0}


def discover_suites(bench_dir: pathlib.Path = BENCH_DIR) -> dict[str, pathlib.Path]:
    """``{suite name: file}`` of every ``bench_<name>.py`` in ``bench_dir``, sorted by name."""
    return {path.stem[len("bench_"):]: path for path in sorted(pathlib.Path(bench_dir).glob("bench_*.py"))}


def _import_suite(path: pathlib.Path):
    """The module of a suite file: imported as ``benchmarks.bench_<name>`` when it lives in this package (so its
    relative imports work), by file path otherwise (suites kept elsewhere, e.g. by tests)."""
    path = pathlib.Path(path).resolve()
    if path.parent == BENCH_DIR:
        return importlib.import_module(f"{__package__}.{path.stem}")
    spec = importlib.util.spec_from_file_location(f"_fastadapter_bench_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the benchmark suite {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_rows(suite: str, rows) -> list[dict]:
    """The rows of ``suite`` as a list, or ``ValueError`` naming the first row that breaks the contract."""
    if not isinstance(rows, list):
        raise ValueError(f"suite {suite!r}: run() returned {type(rows).__name__}, expected a list of dicts")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"suite {suite!r}: row {i} is {type(row).__name__}, expected a dict")
        required = ("suite", "provider", "mode", "config") if row.get("skipped") else REQUIRED_FIELDS
        missing = [name for name in required if name not in row]
        if missing:
            raise ValueError(f"suite {suite!r}: row {i} lacks {missing} (has {sorted(row)}); every row needs "
                             f"{list(REQUIRED_FIELDS)}")
    return rows


def run_suite(path: pathlib.Path, preset: str, device: str, log: Callable[[str], None] = print) -> list[dict]:
    """Import one suite file and run it with ``preset`` on ``device``; returns its checked rows."""
    module = _import_suite(path)
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"{path} has no run(quick, device) function")
    parameters = inspect.signature(module.run).parameters
    kwargs = {}
    if "full" in parameters:
        kwargs["full"] = preset == "full"
    if "log" in parameters:
        kwargs["log"] = log
    return check_rows(path.stem, module.run(preset == "quick", device, **kwargs))


@dataclass
class BenchResult:
    """What one ``fastadapter bench`` run produced."""

    metadata: dict
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    files: list[pathlib.Path] = field(default_factory=list)


def run_benchmarks(*, preset: str = "default", device: str = "cpu", suites: Optional[list[str]] = None,
                   out_dir: pathlib.Path = DEFAULT_RESULTS_DIR, name: Optional[str] = None, plots: bool = True,
                   bench_dir: pathlib.Path = BENCH_DIR, argv: Optional[list[str]] = None,
                   log: Callable[[str], None] = print) -> BenchResult:
    """Run ``suites`` (default: all discovered), print the table, write ``<name>.json``/``.csv`` and the plots.

    Args:
        preset: ``"quick"``, ``"default"`` or ``"full"``.
        device: ``"cpu"`` or a CUDA device.
        suites: suite names (``ops``, ``generation``, ...); unknown names raise ``ValueError`` listing the known.
        out_dir: where the files go; ``name`` their stem (default ``<device type>-<preset>``).
        plots: draw the PNG plots (matplotlib).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    available = discover_suites(bench_dir)
    chosen = list(available) if suites is None else list(suites)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; available here: {sorted(available)}")
    import torch
    result = BenchResult(metadata=collect_metadata(device, preset, argv))
    result.metadata["suites"] = chosen
    for suite in chosen:
        log(f"[{suite}] running ({preset}, {device})")
        start = time.perf_counter()
        try:
            rows = run_suite(available[suite], preset, device, log)
        except Exception as error:  # one broken suite must not lose the others' results
            log(f"[{suite}] FAILED: {type(error).__name__}: {error}")
            result.errors.append({"suite": suite, "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()})
            rows = []
        result.rows += rows
        seconds = time.perf_counter() - start
        result.metadata.setdefault("suite_seconds", {})[suite] = round(seconds, 1)
        log(f"[{suite}] {len(rows)} rows in {seconds:.0f} s")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    total = sum(result.metadata.get("suite_seconds", {}).values())
    budget = PRESET_BUDGET_SECONDS[preset]
    result.metadata.update(total_seconds=round(total, 1), budget_seconds=budget)
    log(f"all suites in {total:.0f} s" + (f" (budget of --{preset}: {budget:.0f} s)" if budget else ""))
    if budget is not None and total > budget:
        log(f"WARNING: this {preset} run took {total:.0f} s, over its {budget:.0f} s budget: "
            + ", ".join(f"{suite} {seconds:.0f} s" for suite, seconds in result.metadata["suite_seconds"].items()))

    print(format_table(result.rows) if result.rows else "no results")
    for error in result.errors:
        print(f"suite {error['suite']} failed: {error['error']}")
    stem = name or f"{torch.device(device).type}-{preset}"
    out_dir = pathlib.Path(out_dir)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    write_json(json_path, result.metadata, result.rows, result.errors)
    write_csv(csv_path, result.metadata, result.rows)
    result.files += [json_path, csv_path]
    if plots:
        from .plots import draw_all
        result.files += draw_all(result.rows, result.metadata, out_dir, stem)
    log("wrote " + ", ".join(str(p) for p in result.files))
    return result
