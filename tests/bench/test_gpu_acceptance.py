"""The GPU acceptance run (benchmarks/gpu_acceptance/): its ``--smoke`` mode runs every stage on CPU and writes
the files and fields a GPU run writes; a stage that fails or overruns is recorded and the others still run; the
JUnit files of the op test grid are read case by case."""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

from benchmarks import gpu_acceptance as acceptance

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("acceptance") / "run"
    env = {**os.environ, "FASTADAPTER_SHARED_DATA": str(shared_data)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return out, done


def test_smoke_run_writes_few_shallow_files(smoke):
    out, done = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted([acceptance.JSON_NAME, acceptance.MARKDOWN_NAME,
                                                    acceptance.TEST_LOG_NAME])
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 2 for p in files)
    for stage in ("environment", "op_tests", "op_bench", "decode_bench", "trainer"):
        assert f"stage {stage}: ok" in done.stdout  # progress, as it happens


def test_smoke_run_records_every_stage(smoke):
    out, _ = smoke
    results = json.loads((out / acceptance.JSON_NAME).read_text())
    assert results["smoke"] is True and results["metadata"]["versions"]["torch"]
    assert set(results["stages"]) == {s.name for s in acceptance.STAGES}
    for name, record in results["stages"].items():
        assert record["status"] == "ok", f"{name}: {record}"
        assert math.isfinite(record["seconds"]) and math.isfinite(record["budget_s"])
        assert record["expected_s"] > 0

    assert "matches the fp32 reference" in results["environment"]["triton_check"]
    tests = results["op_tests"]
    assert tests["passed"] >= 1 and tests["failed"] == tests["error"] == 0
    assert all(c["outcome"] == "passed" and "triton" in c["id"] for c in tests["cases"])

    rows = results["op_bench"]["rows"]
    shapes = {r["shape"] for r in rows}
    assert any(s.startswith("packed") for s in shapes) and any(s.startswith("B") for s in shapes)
    measured = {(r["provider"], r["mode"]) for r in rows if "median_ms" in r}
    for provider in ("fastadapter-triton", "two-sdpa", "eager-v1"):
        assert {(provider, "forward"), (provider, "forward+backward")} <= measured
    assert ("flex-attention", "forward") in measured
    for row in rows:
        assert "median_ms" in row or row.get("error") or row.get("skipped"), row  # never silently left out
        if "median_ms" in row:
            assert all(math.isfinite(row[f]) for f in ("median_ms", "tflops", "peak_memory_mb"))
    compared = [r for r in rows if "max_abs_diff_vs_triton" in r and r["mode"] == "forward"]
    assert compared and all(r["max_abs_diff_vs_triton"] < 1e-4 for r in compared)  # fp32: same function

    decode = results["decode_bench"]["rows"]
    assert {r["provider"] for r in decode if "gb_per_s" in r} >= {"fastadapter-triton", "triton-forward-kernel"}
    # A ragged batch, three ways: one call over the padded cache (seqused_k), one varlen call, one call per row.
    ragged = [r for r in decode if r["shape"].startswith("ragged-")]
    assert {r["provider"] for r in ragged if "gb_per_s" in r} == {
        "fastadapter-triton-seqused", "fastadapter-triton-varlen", "fastadapter-triton-per-row"}
    for row in ragged:
        assert row["cache_lengths"] == acceptance.ragged_cache_lengths(2, 64) == [32, 64]
        if row["provider"] != "fastadapter-triton-per-row":
            assert row["max_abs_diff_vs_per_row"] < 1e-5  # fp32: the same function

    trainer = results["trainer"]
    assert math.isfinite(trainer["tokens_per_s"]) and trainer["steps_timed"] >= 2
    run = trainer["paper_run"]
    assert run["rows"] == 52_002 and run["epochs"] == 5 and run["paper_hours_8_a100"] == 1.0
    assert run["hours_1_gpu"] == pytest.approx(run["tokens"] / trainer["tokens_per_s"] / 3600)
    assert run["hours_8_gpus"] == pytest.approx(run["hours_1_gpu"] / 8)


def test_smoke_summary_names_every_section(smoke):
    out, _ = smoke
    summary = (out / acceptance.MARKDOWN_NAME).read_text()
    for heading in ("## Stages", "## Op test grid", "## Attention: forward and forward+backward", "## Decode steps",
                    "## Trainer"):
        assert heading in summary
    assert "| ragged-B2-Sk64-H2x1 | fastadapter-triton-varlen | forward |" in summary
    assert "max abs diff vs per row" in summary
    assert "1 h on 8 A100" in summary and "tokens/s" in summary


def _settings():
    return acceptance.settings(smoke=True)


def test_a_failing_stage_is_recorded_and_the_next_still_runs():
    results = {"stages": {}}
    total = acceptance.Deadline(60)

    def broken(deadline, out):
        out["partial"] = 1
        raise RuntimeError("the kernel did not launch")

    acceptance.run_stage(acceptance.Stage("broken", 1, 5, 5), _settings(), broken, results, total)
    acceptance.run_stage(acceptance.Stage("fine", 1, 5, 5), _settings(), lambda d, o: o.update(done=True), results,
                         total)
    assert results["stages"]["broken"]["status"] == "error"
    assert "RuntimeError: the kernel did not launch" in results["stages"]["broken"]["reason"]
    assert results["broken"] == {"partial": 1}  # what the stage had measured is kept
    assert results["stages"]["fine"]["status"] == "ok" and results["fine"] == {"done": True}


def test_a_stage_that_overruns_is_interrupted(monkeypatch):
    monkeypatch.setattr(acceptance.common, "HARD_STOP_GRACE_S", 0.2)
    results = {"stages": {}}

    def hangs(deadline, out):  # ignores its deadline, as a hung kernel would
        while True:
            time.sleep(0.05)

    acceptance.run_stage(acceptance.Stage("hangs", 1, 0.3, 0.3), _settings(), hangs, results,
                         acceptance.Deadline(60))
    assert results["stages"]["hangs"]["status"] == "skipped"
    assert "overran its budget" in results["stages"]["hangs"]["reason"]


def test_no_stage_starts_once_the_run_budget_is_spent():
    results = {"stages": {}}
    acceptance.run_stage(acceptance.Stage("late", 1, 5, 5), _settings(), lambda d, o: o.update(ran=True), results,
                         acceptance.Deadline(0))
    assert results["stages"]["late"]["status"] == "skipped" and "ran" not in results["late"]


def test_junit_cases_are_read_one_by_one(tmp_path):
    junit = tmp_path / "shard.xml"
    junit.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_fused_backends" name="test_matches_reference[triton-a]" time="1.5"/>
<testcase classname="tests.test_fused_backends" name="test_matches_reference[triton-b]" time="0.2">
<failure message="AssertionError: out error 1e-1 exceeds">trace</failure></testcase>
<testcase classname="tests.test_fused_backends" name="test_matches_reference[triton-c]" time="0">
<skipped message="needs CUDA"/></testcase>
<testcase classname="tests.test_fused_backends" name="test_matches_reference[triton-d]" time="0">
<error message="fixture failed"/></testcase>
</testsuite></testsuites>""")
    cases = acceptance._junit_cases(junit)
    assert [(c["id"], c["outcome"]) for c in cases] == [
        ("test_fused_backends::test_matches_reference[triton-a]", "passed"),
        ("test_fused_backends::test_matches_reference[triton-b]", "failed"),
        ("test_fused_backends::test_matches_reference[triton-c]", "skipped"),
        ("test_fused_backends::test_matches_reference[triton-d]", "error")]
    assert cases[1]["message"] == "AssertionError: out error 1e-1 exceeds" and cases[0]["seconds"] == 1.5


def test_without_shared_data_the_packed_rows_say_why_in_one_line(tmp_path, monkeypatch):
    from benchmarks.gpu_acceptance import op_bench
    from benchmarks.runner import SuiteSkipped
    monkeypatch.setenv("FASTADAPTER_SHARED_DATA", str(tmp_path / "no-data"))
    with pytest.raises(SuiteSkipped, match="needs alpaca_en_demo.json, llama_tokenizer.model from") as missing:
        op_bench._packed_lengths(_settings())
    assert "\n" not in str(missing.value) and str(tmp_path / "no-data") in str(missing.value)
