"""Stage 1, ``op_tests``: the triton cases of the op test grid, compiled on CUDA, in concurrent pytest shards;
pass/fail per case from their JUnit files."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from .common import OP_TEST_FILE, REPO, SMOKE_TEST_SELECTION, TEST_LOG_NAME, Deadline, Settings, StageTimeout, log


def _junit_cases(path: pathlib.Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else None
        cases.append(dict(id=f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                          outcome=outcome, seconds=round(float(case.get("time", 0.0)), 2), message=message))
    return cases


def stage_op_tests(cfg: Settings, deadline: Deadline, out: dict, folder: pathlib.Path) -> None:
    """Collect the op test grid, run it in ``test_shards`` concurrent pytest processes, parse their JUnit files."""
    env = dict(os.environ)
    if cfg.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:  # compiled kernels on CUDA tensors: tests/conftest.py chooses CUDA when it is there
        env.pop("TRITON_INTERPRET", None)
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    if cfg.test_shards == 1:  # --smoke: two cases of the grid, no separate collection (a second interpreter start)
        shards = [[OP_TEST_FILE, "-k", SMOKE_TEST_SELECTION]]
        ids = None
    else:
        collected = subprocess.run(base + ["--collect-only", OP_TEST_FILE], cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=max(10.0, deadline.left()))
        ids = [line for line in collected.stdout.splitlines() if "::" in line and "triton" in line]
        if not ids:
            raise RuntimeError(f"no triton test collected from {OP_TEST_FILE}:\n{collected.stdout[-2000:]}"
                               f"{collected.stderr[-2000:]}")
        shards = [ids[shard::cfg.test_shards] for shard in range(cfg.test_shards)]
    out["collected"] = len(ids) if ids is not None else None
    log(f"  op tests: {'the smoke selection' if ids is None else len(ids)} cases in {len(shards)} shard(s)")
    log_path = folder / TEST_LOG_NAME
    with tempfile.TemporaryDirectory() as scratch, open(log_path, "w") as test_log:
        processes = []
        for shard, chosen in enumerate(shards):
            if not chosen:
                continue
            junit = pathlib.Path(scratch) / f"shard{shard}.xml"
            shard_log = pathlib.Path(scratch) / f"shard{shard}.log"
            handle = open(shard_log, "w")
            processes.append((subprocess.Popen(base + [f"--junitxml={junit}", *chosen], cwd=REPO, env=env,
                                               stdout=handle, stderr=subprocess.STDOUT), junit, shard_log, handle))
        timed_out = False
        for process, _, _, _ in processes:
            try:
                process.wait(timeout=max(1.0, deadline.left()))
            except subprocess.TimeoutExpired:
                # SIGINT first: pytest stops at the current test and still writes the JUnit file of those done.
                timed_out = True
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        cases = []
        for process, junit, shard_log, handle in processes:
            handle.close()
            test_log.write(shard_log.read_text(errors="replace"))
            if junit.exists():
                cases += _junit_cases(junit)
    out["cases"] = cases
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    out.update(counts, not_run=None if ids is None else len(ids) - len(cases))
    log(f"  op tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped" + ("" if out["not_run"] is None else f", {out['not_run']} not run"))
    if timed_out:
        raise StageTimeout(f"the op tests overran the stage budget; {len(cases)} cases reported")

