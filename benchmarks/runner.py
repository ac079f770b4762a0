"""The benchmark runner behind ``fastadapter bench``: find the suites, run them, save and draw the results.

A suite is a module ``benchmarks/bench_<name>.py`` with ``run(quick: bool, device: str) -> list[dict]``
returning flat rows (``suite, provider, mode, config, median_ms, p20_ms, p80_ms`` and optional ``tflops,
peak_mem_mb, saved_bytes, tokens_per_s``; a row with ``skipped`` set and ``median_ms`` None records a shape not
run and why). A suite whose ``run`` also accepts ``full`` (keyword) gets the long sweep with ``--full``, and one
accepting ``log`` prints its progress through the runner. A suite that raises does not stop the others: its
error is printed and saved with the results. The time of each suite and of the run is printed and saved, with a
warning when a preset overruns its budget (:data:`PRESET_BUDGET_SECONDS`).

A suite runs with a preset's name when its ``run`` accepts ``preset`` (keyword): ``smoke`` (one tiny shape per
suite, seconds: it checks that every suite runs, its figures mean nothing) and the three above. A run's preset
decides which suites run and at which of their shapes (:func:`suite_plan`): the default run is the README's main
job (about 5 minutes on 2 cores), ``--full`` runs every suite at its full shapes. Optional
dependencies: a suite lists the modules it needs in ``REQUIRES``; when one of them is missing or fails to
import (whatever the error), the suite is skipped with that reason instead of failing, as it is when it raises
:class:`SuiteSkipped` itself (e.g. for missing data). Only a suite that ran and raised makes the run fail.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import inspect
import pathlib
import platform
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from .metadata import collect_metadata
from .progress import Progress
from .report import format_table, write_csv, write_json

BENCH_DIR = pathlib.Path(__file__).resolve().parent
#: The committed reference results of this project's build machine: never written by a run unless asked to.
REFERENCE_RESULTS_DIR = BENCH_DIR / "results"
#: Fields every measured row must have.
REQUIRED_FIELDS = ("suite", "provider", "mode", "config", "median_ms", "p20_ms", "p80_ms")
PRESETS = ("smoke", "quick", "default", "full")
#: Wall time a whole run of each preset should stay under on a 2-core CPU (None: no budget). Overrunning it only
#: warns: the results are kept, but the preset's shapes want shrinking (or the machine was busy).
PRESET_BUDGET_SECONDS = {"smoke": 60.0, "quick": 120.0, "default": 300.0, "full": 1800.0}
#: The suites a preset leaves out unless ``suites`` names them (each says so in one line, :data:`LEFT_OUT_REASON`).
#: The default run is the README's main job, about 5 minutes on 2 cores: the op table, a training step against
#: PEFT, generation against Hugging Face + PEFT and the decode linears; the PEFT-integration and multimodal suites
#: are ``--full``'s (together they took 12.5 minutes of a 24.5-minute default run). ``--quick`` (under 2 minutes)
#: also leaves out the training suite (a PEFT step padded to 512 takes seconds even on the smallest model).
#: ``real_models`` (real pretrained weights: SmolLM2-135M, Gemma-3-270M) takes tens of minutes on a 2-core CPU:
#: only ``--full`` or ``--suites real_models`` run it. ``onednn_linear`` and ``row_kernels`` measure the routes
#: the training step takes (which product library, the compiled row kernels): ``--full``'s too.
PRESET_LEAVES_OUT = {"smoke": ("real_models",),
                     "quick": ("training", "multimodal", "real_models", "onednn_linear", "row_kernels"),
                     "default": ("peft_accelerate", "multimodal", "real_models", "onednn_linear", "row_kernels")}
#: Shapes a preset runs a suite at when they are not the preset's own (a suite's preset name, passed to its
#: ``run``): the main job's op table takes the quick sweep (S = 128, 512); the default sweep to S = 2048 alone
#: took ~4 minutes.
PRESET_SUITE_SHAPES = {"default": {"ops": "quick"}}
LEFT_OUT_REASON = "not part of --{preset} (--full runs every suite; --suites {suite} runs it alone)"


class SuiteSkipped(Exception):
    """Raised by a suite that cannot run here (missing data, an optional library); its message says why."""


def missing_requirement(module) -> Optional[str]:
    """Why the suite ``module`` cannot run here, or None: the first of its ``REQUIRES`` modules that fails to
    import, with the error (a missing package, an unsupported version, a package that is installed but broken)."""
    for name in getattr(module, "REQUIRES", ()):
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any import failure of an optional dependency skips the suite
            message = (str(error).strip().splitlines() or [""])[0][:300]
            return f"needs {name}, which does not import here: {type(error).__name__}: {message}"
    return None


def default_out_dir(now: Optional[datetime.datetime] = None) -> pathlib.Path:
    """``bench-results/<machine>-<UTC time>/`` in the working directory: a new folder for every run (a suffix
    ``-2``, ``-3``, ... when two runs start in the same second), so a run never overwrites another's files."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or "machine").strip("-.") or "machine"
    base = pathlib.Path("bench-results") / f"{machine}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


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


def suite_plan(preset: str, available: list[str], suites: Optional[list[str]] = None
               ) -> tuple[dict[str, str], dict[str, str]]:
    """``({suite: shapes to run}, {suite left out: why})`` of a run of ``preset``.

    ``suites`` names the suites to run (every one runs); None runs every suite in ``available`` but those the
    preset leaves out (:data:`PRESET_LEAVES_OUT`). A suite runs its shapes named like the preset, unless
    :data:`PRESET_SUITE_SHAPES` names others."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    shapes = PRESET_SUITE_SHAPES.get(preset, {})
    leaves_out = PRESET_LEAVES_OUT.get(preset, ()) if suites is None else ()
    chosen = [s for s in (available if suites is None else suites) if s not in leaves_out]
    left_out = {s: LEFT_OUT_REASON.format(preset=preset, suite=s) for s in available if s in leaves_out}
    return {s: shapes.get(s, preset) for s in chosen}, left_out


def run_suite(path: pathlib.Path, preset: str, device: str, log: Callable[[str], None] = print) -> list[dict]:
    """Import one suite file and run it with the shapes of ``preset`` on ``device``; returns its checked rows.

    Raises :class:`SuiteSkipped` when one of the suite's ``REQUIRES`` does not import (see
    :func:`missing_requirement`)."""
    module = _import_suite(path)
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"{path} has no run(quick, device) function")
    reason = missing_requirement(module)
    if reason is not None:
        raise SuiteSkipped(reason)
    parameters = inspect.signature(module.run).parameters
    kwargs = {}
    if "preset" in parameters:
        kwargs["preset"] = preset
    if "full" in parameters:
        kwargs["full"] = preset == "full"
    if "log" in parameters:
        kwargs["log"] = log
    return check_rows(path.stem, module.run(preset in ("quick", "smoke"), device, **kwargs))


@dataclass
class BenchResult:
    """What one ``fastadapter bench`` run produced."""

    metadata: dict
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    #: suites that could not run here: ``{"suite", "reason"}``
    skipped: list[dict] = field(default_factory=list)
    #: suites the preset leaves out by design (not a failure to run): ``{"suite", "reason"}``
    left_out: list[dict] = field(default_factory=list)
    files: list[pathlib.Path] = field(default_factory=list)


def run_benchmarks(*, preset: str = "default", device: str = "cpu", suites: Optional[list[str]] = None,
                   out_dir: Optional[pathlib.Path] = None, name: Optional[str] = None, plots: bool = True,
                   bench_dir: pathlib.Path = BENCH_DIR, argv: Optional[list[str]] = None,
                   log: Optional[Callable[[str], None]] = None) -> BenchResult:
    """Run ``suites`` (default: all discovered), print the table, write ``<name>.json``/``.csv`` and the plots.

    Args:
        preset: ``"smoke"``, ``"quick"``, ``"default"`` or ``"full"``.
        device: ``"cpu"`` or a CUDA device.
        suites: suite names (``ops``, ``generation``, ...); unknown names raise ``ValueError`` listing the known.
        out_dir: where the files go (default: a new :func:`default_out_dir`); ``name`` their stem (default
            ``<device type>-<preset>``).
        plots: draw the PNG plots (matplotlib).
        log: where progress lines go (default: stdout, each line flushed at once; a progress bar over the
            suites below them when stdout is a terminal).
    """
    available = discover_suites(bench_dir)
    plan, left_out = suite_plan(preset, list(available), suites)
    unknown = [s for s in plan if s not in available]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; available here: {sorted(available)}")
    chosen = list(plan)
    import torch
    result = BenchResult(metadata=collect_metadata(device, preset, argv))
    result.metadata["suites"] = chosen
    result.metadata["suite_shapes"] = plan
    result.left_out = [{"suite": suite, "reason": reason} for suite, reason in left_out.items()]
    progress = Progress(len(chosen), enabled=log is None)
    log = log or progress.log
    for omitted in result.left_out:
        log(f"[{omitted['suite']}] left out: {omitted['reason']}")
    try:
        for suite in chosen:
            progress.describe(suite)
            log(f"[{suite}] running ({plan[suite]} shapes, {device})")
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                rows = run_suite(available[suite], plan[suite], device, log)
            except SuiteSkipped as skip:
                log(f"[{suite}] skipped: {skip}")
                result.skipped.append({"suite": suite, "reason": str(skip)})
                rows = []
            except Exception as error:  # one broken suite must not lose the others' results
                log(f"[{suite}] FAILED: {type(error).__name__}: {error}")
                result.errors.append({"suite": suite, "error": f"{type(error).__name__}: {error}",
                                      "traceback": traceback.format_exc()})
                rows = []
            result.rows += rows
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            result.metadata.setdefault("suite_seconds", {})[suite] = round(seconds, 1)
            # CPU time of this process (all threads): unlike wall time, it does not grow when others hold the cores
            result.metadata.setdefault("suite_cpu_seconds", {})[suite] = round(cpu_seconds, 1)
            log(f"[{suite}] {len(rows)} rows in {seconds:.0f} s (CPU time {cpu_seconds:.0f} s)")
            progress.advance()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    result.metadata["skipped_suites"] = result.skipped
    result.metadata["left_out_suites"] = result.left_out
    total = sum(result.metadata.get("suite_seconds", {}).values())
    budget = PRESET_BUDGET_SECONDS[preset]
    result.metadata.update(total_seconds=round(total, 1), budget_seconds=budget)
    log(f"all suites in {total:.0f} s" + (f" (budget of --{preset}: {budget:.0f} s)" if budget else ""))
    if budget is not None and total > budget:
        log(f"WARNING: this {preset} run took {total:.0f} s, over its {budget:.0f} s budget: "
            + ", ".join(f"{suite} {seconds:.0f} s" for suite, seconds in result.metadata["suite_seconds"].items()))

    print(format_table(result.rows) if result.rows else "no results", flush=True)
    for omitted in result.left_out:
        print(f"suite {omitted['suite']} left out: {omitted['reason']}", flush=True)
    for skipped in result.skipped:
        print(f"suite {skipped['suite']} skipped: {skipped['reason']}", flush=True)
    for error in result.errors:
        print(f"suite {error['suite']} failed: {error['error']}", flush=True)
    stem = name or f"{torch.device(device).type}-{preset}"
    out_dir = pathlib.Path(out_dir) if out_dir is not None else default_out_dir()
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    write_json(json_path, result.metadata, result.rows, result.errors)
    write_csv(csv_path, result.metadata, result.rows)
    result.files += [json_path, csv_path]
    if plots:
        from .plots import draw_all
        result.files += draw_all(result.rows, result.metadata, out_dir, stem)
    log("wrote " + ", ".join(str(p) for p in result.files))
    return result
