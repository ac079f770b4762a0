"""The benchmark suite's machinery: FLOP counting, timing and memory measurement, provider correctness, the
runner's files (JSON, CSV, PNG with metadata), compare mode and the pytest-benchmark integration.

Nothing here asserts on speed: the figures come from ``fastadapter bench``.
"""
from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

# benchmarks/ lives beside fastadapter/ in the checkout but is not part of the installed package.
REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import baselines  # noqa: E402
from benchmarks.bench_ops import MODES, Plan, Sweep, benchmark_provider, plan_for, run_plan  # noqa: E402
from benchmarks.compare import compare_rows, format_comparison, geometric_mean  # noqa: E402
from benchmarks.flops import attention_flops, tflops_per_second  # noqa: E402
from benchmarks.memory import peak_from_allocation_events, peak_memory_bytes, saved_tensor_bytes  # noqa: E402
from benchmarks.op_providers import OpConfig, OpProvider, check_provider, op_providers  # noqa: E402
from benchmarks.report import format_markdown, format_table, load_json  # noqa: E402
from benchmarks.runner import check_rows, run_benchmarks  # noqa: E402
from benchmarks.timing import measure, quantile  # noqa: E402

from fastadapter import zero_init_attention_reference  # noqa: E402

TINY = OpConfig(batch=1, seqlen=33, heads_q=4, heads_kv=2, head_dim=16, prefix_len=3)
TINY_PLAN = Plan((Sweep("seqlen", "seqlen", (TINY, OpConfig(1, 47, 4, 2, 16, 3))),), warmup=0, repeats=2,
                 max_seconds=1.0)


def _cpu_providers() -> list[OpProvider]:
    return [p for p in op_providers() if p.skip_reason(TINY, "cpu") is None]


# -- FLOP counting


def test_flops_formula_by_hand():
    # B=2, Hq=3, S=5, D=8: words 4·2·3·5·5·8 = 4800, prefix (P=4) 4·2·3·5·4·8 = 3840.
    assert attention_flops(2, 3, 5, 5, 8, 0, causal=False) == 4800
    assert attention_flops(2, 3, 5, 5, 8, 0, causal=True) == 2400
    assert attention_flops(2, 3, 5, 5, 8, 4, causal=True) == 2400 + 3840
    assert attention_flops(2, 3, 5, 5, 8, 4, causal=True, mode="backward") == 2.5 * 6240
    assert attention_flops(2, 3, 5, 5, 8, 4, causal=True, mode="forward+backward") == 3.5 * 6240
    assert tflops_per_second(2e12, 1000.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown mode"):
        attention_flops(1, 1, 1, 1, 1, 0, mode="fwd")
    with pytest.raises(ValueError, match="seqlen_q must be non-negative"):
        attention_flops(1, 1, -1, 1, 1, 0)


def test_flops_match_the_reference_matmuls():
    """PyTorch's own FLOP counter over the non-causal reference (which computes every score) agrees."""
    from torch.utils.flop_counter import FlopCounterMode
    config = OpConfig(batch=2, seqlen=24, heads_q=4, heads_kv=2, head_dim=16, prefix_len=5)
    inputs = config.make_inputs("cpu", requires_grad=False)
    with FlopCounterMode(display=False) as counter:
        zero_init_attention_reference(*inputs, causal=False)
    assert counter.get_total_flops() == attention_flops(2, 4, 24, 24, 16, 5, causal=False)


# -- timing and memory


def test_quantiles_and_measure():
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert quantile([7.0], 0.8) == 7.0
    calls = []
    result = measure(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and result["runs"] == 5
    assert 0 <= result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        measure(lambda: None, repeats=0)


def test_measure_stops_at_its_time_budget():
    import time
    result = measure(lambda: time.sleep(0.02), warmup=0, repeats=1000, max_seconds=0.05)
    assert 1 <= result["runs"] < 1000


def test_saved_tensor_bytes_counts_each_storage_once():
    a = torch.randn(100, requires_grad=True)

    def exp_squared():
        b = a.exp()  # exp saves its output b; b * b saves b twice: one storage of 400 bytes
        return (b * b).sum()

    assert saved_tensor_bytes(exp_squared) == 400
    assert saved_tensor_bytes(lambda: a.sin().sum()) == 400  # sin saves its input
    assert saved_tensor_bytes(lambda: a.sin().sum(), exclude=[a]) == 0
    assert saved_tensor_bytes(lambda: (a.view(10, 10).sin() * 2).sum(), exclude=[a]) == 0  # a view of a
    assert saved_tensor_bytes(lambda: (a * 3.0).sum()) == 0  # a product by a constant saves nothing


def test_saved_tensor_bytes_of_eager_attention_hold_the_score_matrix():
    config = OpConfig(batch=1, seqlen=64, heads_q=4, heads_kv=4, head_dim=16, prefix_len=4)
    inputs = config.make_inputs("cpu")
    eager = saved_tensor_bytes(lambda: baselines.eager_v1(*inputs), exclude=inputs)
    fused_like = saved_tensor_bytes(lambda: baselines.two_sdpa(*inputs), exclude=inputs)
    assert eager >= config.eager_score_bytes()  # at least the fp32 [B, H, S, P + S] probabilities
    assert fused_like < config.eager_score_bytes()


def test_peak_memory_replays_allocations():
    assert peak_from_allocation_events([100, 50, -100, 30, -80]) == 150
    assert peak_from_allocation_events([-500, 100]) == 0  # freeing older memory is never a peak

    def two_mib_at_most():
        a = torch.ones(1 << 18)  # 1 MiB
        b = torch.ones(1 << 18)
        del a
        c = torch.ones(1 << 18)
        return b, c

    peak = peak_memory_bytes(two_mib_at_most, "cpu")
    assert 2 << 20 <= peak < (2 << 20) + (64 << 10)
    with pytest.raises(ValueError, match="measures 'cpu' or CUDA"):
        peak_memory_bytes(lambda: None, "meta")


# -- providers compute the right thing before anything is timed


@pytest.mark.parametrize("provider", _cpu_providers(), ids=lambda p: p.name)
def test_providers_agree_with_the_reference(provider):
    assert check_provider(provider, "cpu", torch.float32) is None
    assert check_provider(provider, "cpu", torch.bfloat16, check_grads=False) is None


def test_check_provider_catches_a_wrong_gate():
    # PEFT's raw gate where the reference applies tanh: a different function, which must be refused.
    raw_gate = OpProvider("raw-gate", lambda *a: baselines.peft_style(*a, gate_tanh=False), "wrong", lambda c, d: None)
    problem = check_provider(raw_gate, "cpu")
    assert problem is not None and "raw-gate" in problem


def test_skip_reasons_say_why():
    providers = {p.name: p for p in op_providers()}
    assert "CUDA only" in providers["fastadapter-triton"].skip_reason(TINY, "cpu")
    assert "CUDA only" in providers["two-flash-attn"].skip_reason(TINY, "cpu")
    assert "GiB of fp32 scores" in providers["eager-v1"].skip_reason(OpConfig(batch=1, seqlen=4096), "cpu")
    assert providers["eager-v1"].skip_reason(OpConfig(batch=1, seqlen=2048), "cpu") is None
    assert providers["fastadapter-sdpa"].skip_reason(OpConfig(batch=1, seqlen=4096), "cpu") is None


def test_presets_use_llama_7b_heads():
    for preset in ("quick", "default", "full"):
        for sweep in plan_for(preset, "cpu").sweeps:
            assert all(c.heads_q == 32 and c.head_dim == 128 for c in sweep.configs)
    assert max(c.seqlen for s in plan_for("full", "cpu").sweeps for c in s.configs) == 4096
    with pytest.raises(ValueError, match="unknown preset"):
        plan_for("huge", "cpu")


def test_benchmark_provider_rows():
    provider = next(p for p in op_providers() if p.name == "eager-v1")
    rows = benchmark_provider(provider, TINY, "cpu", TINY_PLAN)
    assert [r["mode"] for r in rows] == list(MODES)
    for row in rows:
        assert row["runs"] == 2 and row["median_ms"] > 0 and row["tflops"] > 0
        assert row["peak_mem_mb"] > 0
        assert row["saved_bytes"] >= TINY.eager_score_bytes()


def test_run_plan_skips_what_cannot_run_and_refuses_unknown_providers():
    rows = run_plan(TINY_PLAN, "cpu", providers=["two-sdpa", "two-flash-attn"], log=lambda line: None)
    measured = [r for r in rows if r.get("median_ms") is not None]
    skipped = [r for r in rows if r.get("skipped")]
    assert {r["provider"] for r in measured} == {"two-sdpa"} and len(measured) == 2 * len(MODES)
    assert {r["provider"] for r in skipped} == {"two-flash-attn"}
    assert all(r["x"] == r["seqlen"] and r["sweep"] == "seqlen" for r in rows)
    with pytest.raises(ValueError, match="unknown provider"):
        run_plan(TINY_PLAN, "cpu", providers=["nope"])


def test_generation_models_agree_before_timing():
    from benchmarks.bench_generation import GenerationConfig, run_config
    tiny = GenerationConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=256, batch=2,
                            prompt_tokens=9, new_tokens=4, prompt_len=3)
    rows = run_config(tiny, "cpu", warmup=0, repeats=1, log=lambda line: None)
    providers = [r["provider"] for r in rows]
    assert providers[0] == "hf-peft" and "fastadapter-sdpa" in providers
    assert {r["mode"] for r in rows} == {"prefill", "generate"}
    assert all(r["agree"] == 1.0 and r["tokens_per_s"] > 0 for r in rows)


# -- runner, files, compare


_TINY_SUITE = textwrap.dedent('''
    """A tiny suite for the runner's test: the ops machinery on a toy shape, and one model-level row."""
    from benchmarks.bench_ops import Plan, Sweep, run_plan
    from benchmarks.op_providers import OpConfig

    def run(quick, device):
        configs = (OpConfig(1, 17, 2, 1, 16, 2), OpConfig(1, 33, 2, 1, 16, 2))
        plan = Plan((Sweep("seqlen", "seqlen", configs),), warmup=0, repeats=2, max_seconds=1.0)
        rows = run_plan(plan, device, providers=["eager-v1", "two-sdpa", "two-flash-attn"], log=lambda s: None)
        rows.append({"suite": "toymodel", "provider": "baseline", "mode": "generate", "config": "tiny",
                     "median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "tokens_per_s": 50.0})
        rows.append({"suite": "toymodel", "provider": "fast", "mode": "generate", "config": "tiny",
                     "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "tokens_per_s": 100.0})
        return rows
''')


def test_runner_writes_json_csv_and_plots_with_metadata(tmp_path, capsys):
    bench_dir = tmp_path / "suites"
    bench_dir.mkdir()
    (bench_dir / "bench_tiny.py").write_text(_TINY_SUITE)
    (bench_dir / "bench_broken.py").write_text("def run(quick, device):\n    raise RuntimeError('boom')\n")
    out = tmp_path / "out"
    result = run_benchmarks(preset="quick", device="cpu", out_dir=out, name="t", bench_dir=bench_dir,
                            log=lambda line: None)
    printed = capsys.readouterr().out
    assert "== ops ==" in printed and "two-sdpa" in printed and "skipped two-flash-attn" in printed
    assert "suite broken failed: RuntimeError: boom" in printed

    payload = load_json(out / "t.json")
    meta = payload["metadata"]
    assert meta["device_name"] and meta["preset"] == "quick" and meta["suites"] == ["broken", "tiny"]
    assert meta["versions"]["torch"] == torch.__version__
    assert "commit" in meta["git"] and "dirty" in meta["git"]
    assert payload["errors"][0]["suite"] == "broken"
    assert len(payload["rows"]) == len(result.rows) == 2 * 3 * len(MODES) + 2

    with (out / "t.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(payload["rows"])
    assert rows[0]["device_name"] == meta["device_name"] and "git_commit" in rows[0]
    assert {"median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_mb", "saved_bytes"} <= set(rows[0])

    markdown = format_markdown(payload)
    assert "| S | eager-v1 | two-sdpa |" in markdown and "| 17 |" in markdown and "**toymodel**" in markdown
    for plot in ("ops-time", "ops-memory", "models"):
        assert (out / f"t-{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown suite"):
        run_benchmarks(device="cpu", suites=["nope"], out_dir=out, bench_dir=bench_dir, log=lambda line: None)


def test_check_rows_names_the_broken_row():
    good = {"suite": "s", "provider": "p", "mode": "m", "config": "c", "median_ms": 1.0, "p20_ms": 1.0,
            "p80_ms": 1.0}
    assert check_rows("s", [good]) == [good]
    with pytest.raises(ValueError, match=r"row 1 lacks \['p20_ms'\]"):
        check_rows("s", [good, {k: v for k, v in good.items() if k != "p20_ms"}])
    with pytest.raises(ValueError, match="expected a list"):
        check_rows("s", {"rows": []})


def _result_file(path, medians: dict, device="cpu-box") -> pathlib.Path:
    rows = [{"suite": "ops", "provider": p, "mode": "forward", "config": c, "median_ms": ms, "p20_ms": ms,
             "p80_ms": ms} for (p, c), ms in medians.items()]
    path.write_text(json.dumps({"metadata": {"device_name": device, "git": {"commit": "abc"}}, "rows": rows}))
    return path


def test_compare_ratios_and_geometric_mean(tmp_path):
    a = _result_file(tmp_path / "a.json", {("x", "S1"): 4.0, ("x", "S2"): 9.0, ("y", "S1"): 1.0})
    b = _result_file(tmp_path / "b.json", {("x", "S1"): 1.0, ("x", "S2"): 1.0, ("z", "S1"): 1.0})
    ratios, only_a, only_b = compare_rows(load_json(a)["rows"], load_json(b)["rows"])
    assert sorted(r.speedup for r in ratios) == [4.0, 9.0] and (only_a, only_b) == (1, 1)
    assert geometric_mean([4.0, 9.0]) == pytest.approx(6.0)
    text = format_comparison(a, b)
    assert "4.00x" in text and "9.00x" in text and "6.00x over 2 rows" in text
    assert "1 rows only in A, 1 only in B" in text


def test_compare_through_the_cli(tmp_path, capsys):
    from fastadapter.cli import main
    a = _result_file(tmp_path / "a.json", {("x", "S1"): 3.0})
    b = _result_file(tmp_path / "b.json", {("x", "S1"): 1.5}, device="gpu-box")
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "2.00x" in out and "different devices" in out
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["bench", "--compare", str(a), str(tmp_path / "bad.json")]) == 2
    assert "not a benchmark result" in capsys.readouterr().err


def test_table_reports_speedups_over_the_first_provider():
    rows = [{"suite": "ops", "provider": "slow", "mode": "forward", "config": "c", "median_ms": 6.0, "p20_ms": 5.0,
             "p80_ms": 7.0},
            {"suite": "ops", "provider": "fast", "mode": "forward", "config": "c", "median_ms": 2.0, "p20_ms": 2.0,
             "p80_ms": 2.0},
            {"suite": "ops", "provider": "gpu-only", "mode": "forward", "config": "c", "median_ms": None,
             "skipped": "runs on CUDA only"}]
    table = format_table(rows)
    assert "3.00x" in table and "1.00x (base)" in table and "skipped gpu-only on c: runs on CUDA only" in table


def test_pytest_benchmark_integration_runs():
    done = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "benchmarks"), "-q", "--benchmark-disable",
                           "-p", "no:cacheprovider", "--bench-seqlens=64", "-k", "two-sdpa or eager"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "6 passed" in done.stdout


def test_cli_lists_suites_and_saves_the_compile_report(tmp_path, capsys, monkeypatch):
    from fastadapter.cli import main
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "ops" in listed and "generation" in listed

    import fastadapter.kernels
    row = {"kernel": "forward", "config": "BLOCK_M=64", "arch": "sm_80", "registers": 96, "spill_bytes": 0,
           "shared_bytes": 16384, "tensor_cores": ["HMMA"], "seqlens": [512], "cubin": b"\x00"}
    monkeypatch.setattr(fastadapter.kernels, "compile_report", lambda archs=("sm_80", "sm_90"): [row])
    assert main(["bench", "--compile-report", "--out", str(tmp_path)]) == 0
    assert "BLOCK_M=64" in capsys.readouterr().out
    assert "HMMA" in (tmp_path / "compile-report.txt").read_text()
    saved = json.loads((tmp_path / "compile-report.json").read_text())
    assert saved[0]["registers"] == 96 and "cubin" not in saved[0]
