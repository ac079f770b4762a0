"""The run: each stage under its budget (a hard stop past it), its failure recorded without losing the others;
``python -m benchmarks.gpu_acceptance``."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time
import traceback
from typing import Callable

import torch

from ..metadata import collect_metadata
from . import common
from .common import (JSON_NAME, MARKDOWN_NAME, SMOKE_TOTAL_BUDGET_S, STAGES, TOTAL_BUDGET_S, Deadline, Settings,
                     Stage, StageTimeout, log)
from .decode_bench import stage_decode_bench
from .environment import stage_environment
from .op_bench import stage_op_bench
from .op_tests import stage_op_tests
from .summary import markdown_summary
from .trainer import stage_trainer


def _alarm(signum, frame):
    raise StageTimeout("interrupted: the stage overran its budget")


def run_stage(stage: Stage, cfg: Settings, fn: Callable[[Deadline, dict], None], results: dict,
              total: Deadline) -> None:
    budget = stage.smoke_budget_s if cfg.smoke else stage.budget_s
    budget = max(0.0, min(budget, total.left()))
    record = results["stages"][stage.name] = dict(expected_s=stage.expected_s, budget_s=round(budget, 1))
    data = results.setdefault(stage.name, {})
    if budget <= 0:
        record.update(status="skipped", reason="the run's total time budget was spent", seconds=0.0)
        log(f"stage {stage.name}: skipped ({record['reason']})")
        return
    log(f"stage {stage.name}: budget {budget:.0f} s (expected {stage.expected_s:g} s on an H200)")
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget + common.HARD_STOP_GRACE_S)
    try:
        fn(Deadline(budget), data)
        record["status"] = "ok"
    except StageTimeout as error:
        record.update(status="skipped", reason=str(error))
    except Exception as error:  # noqa: BLE001 - one stage's failure must not lose the others
        record.update(status="error", reason=f"{type(error).__name__}: {error}"[:1000],
                      traceback=traceback.format_exc()[-3000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - started, 1)
    log(f"stage {stage.name}: {record['status']} in {record['seconds']:.1f} s"
        + (f" ({record['reason'][:300]})" if "reason" in record else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_acceptance",
                                     description=sys.modules[__package__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu-acceptance.json, gpu-acceptance.md, op-tests.log")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton under its interpreter")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], default=[s.name for s in STAGES],
                        help="run only these stages (default: all)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU tensors
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke for the CPU smoke run")
    cfg = common.settings(args.smoke)
    folder = pathlib.Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = Deadline(TOTAL_BUDGET_S if not args.smoke else SMOKE_TOTAL_BUDGET_S)
    results = dict(smoke=args.smoke, metadata=collect_metadata(cfg.device, "smoke" if args.smoke else "gpu",
                                                               argv if argv is not None else sys.argv),
                   stages={})
    torch.manual_seed(0)
    functions = {"environment": lambda d, o: stage_environment(cfg, d, o),
                 "op_tests": lambda d, o: stage_op_tests(cfg, d, o, folder),
                 "op_bench": lambda d, o: stage_op_bench(cfg, d, o),
                 "decode_bench": lambda d, o: stage_decode_bench(cfg, d, o),
                 "trainer": lambda d, o: stage_trainer(cfg, d, o)}
    for stage in STAGES:
        if stage.name in args.stages:
            run_stage(stage, cfg, functions[stage.name], results, total)
            results["total_seconds"] = time.perf_counter() - started
            (folder / JSON_NAME).write_text(json.dumps(results, indent=1, default=str))  # partial results survive
    results["total_seconds"] = time.perf_counter() - started
    (folder / JSON_NAME).write_text(json.dumps(results, indent=1, default=str))
    (folder / MARKDOWN_NAME).write_text(markdown_summary(results))
    log(f"done in {results['total_seconds']:.0f} s: {folder / JSON_NAME}, {folder / MARKDOWN_NAME}")
    return 0 if all(r["status"] == "ok" for r in results["stages"].values()) else 1

