"""The benchmark suite's machinery: FLOP counting, timing and memory measurement, provider correctness, the
runner's files (JSON, CSV, PNG with metadata), compare mode and the pytest-benchmark integration.

Nothing here asserts on speed: the figures come from ``fastadapter bench``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import re
import select
import subprocess
import sys
import textwrap

import pytest
import torch

# The checkout's benchmarks/ folder is installed as fastadapter.benchmarks: the tests import it from there.
REPO = pathlib.Path(__file__).resolve().parents[2]

from fastadapter.benchmarks import baselines
from fastadapter.benchmarks.bench_ops import MODES, Plan, Sweep, benchmark_provider, plan_for, run_plan
from fastadapter.benchmarks.compare import compare_rows, format_comparison, geometric_mean
from fastadapter.benchmarks.flops import attention_flops, tflops_per_second
from fastadapter.benchmarks.gemm_peak import context_line, peak_dtype
from fastadapter.benchmarks.memory import peak_from_allocation_events, peak_memory_bytes, saved_tensor_bytes
from fastadapter.benchmarks.op_providers import OpConfig, OpProvider, check_provider, op_providers
from fastadapter.benchmarks.report import format_markdown, format_table, load_json
from fastadapter.benchmarks.runner import check_rows, run_benchmarks
from fastadapter.benchmarks.timing import measure, quantile

from fastadapter import zero_init_attention_reference
from fastadapter.decode_linear import has_native_products

TINY = OpConfig(batch=1, seqlen=33, heads_q=4, heads_kv=2, head_dim=16, prefix_len=3)
TINY_PLAN = Plan((Sweep("seqlen", "seqlen", (TINY, OpConfig(1, 47, 4, 2, 16, 3))),), warmup=0, repeats=2,
                 max_seconds=1.0)


def _finite(record: dict, *fields: str) -> bool:
    """Every timed ``field`` of ``record`` is there and a finite number: what a test may check of a time (its
    value depends on the machine and its load, so no test asserts on it)."""
    return all(isinstance(record.get(f), (int, float)) and math.isfinite(record[f]) for f in fields)


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
    assert _finite(result, "median_ms", "p20_ms", "p80_ms", "min_ms")
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        measure(lambda: None, repeats=0)


def test_measure_stops_at_its_time_budget(monkeypatch):
    """A clock that advances 20 ms per reading: a 50 ms budget stops the runs after the third (60 ms measured)."""
    import fastadapter.benchmarks.timing as timing
    clock = iter(range(0, 10**6, 20))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) / 1e3)
    result = measure(lambda: None, warmup=0, repeats=1000, max_seconds=0.05)
    assert result["runs"] == 3


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
    # A provider without a backward on CPU (flex_attention) is checked, and timed, forward only.
    assert check_provider(provider, "cpu", torch.float32, check_grads=provider.no_backward("cpu") is None) is None
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
        assert row["runs"] == 2 and _finite(row, "median_ms", "tflops")
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


def test_a_provider_that_raises_is_skipped_with_its_error(monkeypatch):
    import fastadapter.benchmarks.bench_ops as bench_ops
    sdpa = next(p for p in op_providers() if p.name == "two-sdpa")

    def broken_install(*inputs):
        raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10")

    def fails_at_47(*inputs):  # passes the check (S = 37) and the first shape (S = 33), raises on the second
        if inputs[0].shape[1] == 47:
            raise RuntimeError("out of memory")
        return sdpa.fn(*inputs)

    def skip_raises(config, device):
        raise OSError("libcudart.so.12: cannot open shared object file")

    fakes = [sdpa, OpProvider("broken", broken_install, "raises", lambda c, d: None),
             OpProvider("fails-at-47", fails_at_47, "raises on one shape", lambda c, d: None),
             OpProvider("skip-raises", sdpa.fn, "its availability check raises", skip_raises)]
    monkeypatch.setattr(bench_ops, "op_providers", lambda: fakes)
    logged = []
    rows = run_plan(TINY_PLAN, "cpu", log=logged.append)
    by_provider = {}
    for row in rows:
        by_provider.setdefault(row["provider"], []).append(row)
    assert all(_finite(r, "median_ms") for r in by_provider["two-sdpa"]) and len(by_provider["two-sdpa"]) == 6
    broken = by_provider["broken"]
    assert len(broken) == 6 and all(r["median_ms"] is None for r in broken)
    assert "checked against the reference" in broken[0]["skipped"]
    assert "ImportError: flash_attn_2_cuda.so: undefined symbol" in broken[0]["skipped"]
    at_33, at_47 = by_provider["fails-at-47"][:3], by_provider["fails-at-47"][3:]
    assert all(r["seqlen"] == 33 and _finite(r, "median_ms") for r in at_33)
    assert all(r["seqlen"] == 47 and "RuntimeError: out of memory" in r["skipped"] for r in at_47)
    assert all("OSError: libcudart.so.12" in r["skipped"] for r in by_provider["skip-raises"])
    assert any("broken" in line and "ImportError" in line for line in logged)


def test_a_module_found_but_failing_to_import_is_skipped_with_its_error(tmp_path, monkeypatch):
    from fastadapter.benchmarks.op_providers import _needs_cuda_module
    package = tmp_path / "fastadapter_test_broken_ext"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN2at4_ops')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    skip = _needs_cuda_module("fastadapter_test_broken_ext", "broken-ext")
    assert skip(TINY, "cpu") == "broken-ext runs on CUDA only"  # the device is decided first, nothing imported
    reason = skip(TINY, "cuda")  # availability only: no CUDA device is needed to ask
    assert "installed but fails to import" in reason and "ImportError: undefined symbol: _ZN2at4_ops" in reason
    assert _needs_cuda_module("fastadapter_test_absent.ops", "absent")(TINY, "cuda") == (
        "fastadapter_test_absent is not installed")
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text("import torch\n")
    assert _needs_cuda_module("fastadapter_test_broken_ext.ops", "fixed")(TINY, "cuda") is None


def test_generation_models_agree_before_timing():
    from fastadapter.benchmarks.bench_generation import GenerationConfig, run_config
    tiny = GenerationConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=256, batch=2,
                            prompt_tokens=9, new_tokens=4, prompt_len=3)
    rows = run_config(tiny, "cpu", warmup=0, repeats=1, log=lambda line: None)
    providers = [r["provider"] for r in rows]
    assert providers[0] == "hf-peft" and "fastadapter-sdpa" in providers
    assert {r["mode"] for r in rows} == {"prefill", "generate"}
    assert all(r["agree"] == 1.0 and _finite(r, "tokens_per_s") for r in rows)


TINY_TRAINING = dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128, examples=4, batch_size=2, batch_tokens=1024,
                     prompt_len=3)


def test_training_losses_agree_before_timing(shared_data):
    from fastadapter.benchmarks.bench_training import TrainingConfig, run_config
    config = TrainingConfig(**TINY_TRAINING)
    logged = []
    rows = run_config(config, "cpu", warmup=0, repeats=1, log=logged.append)
    assert [r["provider"] for r in rows] == ["peft-pad-longest", "peft-pad-512", "fastadapter-packed"]
    assert "summed token loss" in logged[0]
    check_rows("training", rows)
    for row in rows:
        assert row["suite"] == "training" and row["mode"] == "train_step" and row["config"] == config.label
        assert row["runs"] == 1 and _finite(row, "median_ms", "tokens_per_s") and row["peak_mem_mb"] > 0
        assert row["loss_rel_err"] < 1e-5 and not row.get("skipped")
    padding = {r["provider"]: r["padding_fraction"] for r in rows}
    assert padding["fastadapter-packed"] == 0 < padding["peft-pad-longest"] < padding["peft-pad-512"] < 1
    assert len({round(r["tokens_per_s"] * r["median_ms"]) for r in rows}) == 1  # the same real tokens for all


def test_training_does_not_time_a_provider_whose_loss_differs(shared_data, monkeypatch):
    import fastadapter.benchmarks.bench_training as bench_training
    losses = bench_training._losses
    monkeypatch.setattr(bench_training, "_losses", lambda *a: {**losses(*a), "peft-pad-512": 1.0})
    timed = []
    monkeypatch.setattr(bench_training, "interleaved_times",
                        lambda steps, *a: timed.extend(steps) or {name: [1.0] for name in steps})
    rows = bench_training.run_config(bench_training.TrainingConfig(**TINY_TRAINING), "cpu", warmup=0, repeats=1,
                                     log=lambda line: None)
    skipped = {r["provider"]: r for r in rows if r.get("skipped")}
    assert list(skipped) == ["peft-pad-512"] and skipped["peft-pad-512"]["median_ms"] is None
    assert "wrong result, not timed" in skipped["peft-pad-512"]["skipped"]
    assert timed == ["peft-pad-longest", "fastadapter-packed"]
    check_rows("training", rows)


def test_peft_accelerate_agrees_before_timing():
    from fastadapter.benchmarks.bench_peft_accelerate import StepConfig, run_config
    config = StepConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, batch=2, seqlen=24,
                        vocab_size=256, prompt_len=3)
    rows = run_config(config, "cpu", warmup=0, repeats=1, log=lambda line: None)
    check_rows("peft_accelerate", rows)
    assert [(r["config"][len(config.label) + 1:], r["mode"], r["provider"]) for r in rows] == [
        (batch, mode, provider) for batch in ("dense", "padded") for mode in ("train_step", "forward")
        for provider in ("peft", "peft+fastadapter")]
    for row in rows:
        assert _finite(row, "median_ms", "cpu_median_ms", "tokens_per_s")
        assert row["max_grad_rel_err"] < 1e-4
        assert (row["peak_mem_mb"] > 0) if row["mode"] == "train_step" else "peak_mem_mb" not in row
    for first, second in zip(rows[::2], rows[1::2]):  # the two providers computed the same loss
        assert first["loss"] == pytest.approx(second["loss"], rel=1e-5)


def test_quick_presets_stay_small():
    """``--quick`` is a smoke run (under two minutes on a 2-core CPU): it must not grow unnoticed."""
    from fastadapter.benchmarks import bench_generation, bench_peft_accelerate, bench_training
    from fastadapter.benchmarks.runner import PRESET_BUDGET_SECONDS
    configs = [c for s in plan_for("quick", "cpu").sweeps for c in s.configs]
    assert len(configs) <= 2 and max(c.seqlen for c in configs) <= 512 and all(c.batch == 1 for c in configs)
    assert plan_for("quick", "cpu").repeats <= 3 and plan_for("quick", "cpu").max_seconds <= 0.5
    models = [bench_generation.config_for("quick"), bench_training.config_for("quick"),
              bench_peft_accelerate.config_for("quick")]
    assert all(m.dim <= 256 and m.n_layers <= 4 for m in models)
    assert bench_training.config_for("quick").examples <= 16
    assert bench_peft_accelerate.config_for("quick").batch * bench_peft_accelerate.config_for("quick").seqlen <= 256
    assert bench_generation.config_for("quick").new_tokens <= 8
    assert PRESET_BUDGET_SECONDS == {"smoke": 60.0, "quick": 120.0, "default": 300.0, "full": 1800.0}
    smoke = [bench_generation.config_for("smoke"), bench_training.config_for("smoke"),
             bench_peft_accelerate.config_for("smoke")]
    assert all(m.dim <= 64 and m.n_layers <= 2 for m in smoke)
    assert [c.seqlen for s in plan_for("smoke", "cpu").sweeps for c in s.configs] == [64]


def test_every_suite_takes_every_preset():
    """The runner passes ``full`` only to a ``run`` that has it: a suite without it would run its default shapes
    under ``--full`` without saying so."""
    import inspect
    from fastadapter.benchmarks.runner import _import_suite, discover_suites
    for name, path in discover_suites().items():
        module = _import_suite(path)
        assert {"full", "preset", "log"} <= set(inspect.signature(module.run).parameters), name
        if hasattr(module, "config_for"):
            for preset in ("smoke", "quick", "default", "full"):
                assert module.config_for(preset).label, (name, preset)



def test_the_benchmarks_and_the_plan_share_one_flop_model(make_config):
    """The attention part of a training step's FLOPs (``fastadapter plan``, the acceptance run's MFU) is the
    benchmarks' ``attention_flops``: causal words in every layer, the prefix in the adapted ones."""
    from fastadapter.benchmarks import flops as bench_flops
    from fastadapter.training import flops as model_flops
    assert bench_flops.attention_flops is model_flops.attention_flops
    config = make_config(dim=80, n_layers=3, n_heads=5, n_kv_heads=5, hidden_dim=176, max_seq_len=128)  # head dim 16
    with_attention = model_flops.sequence_flops(config, 97, adapter_layers=2, prompt_len=7)
    without = model_flops.sequence_flops(config, 97, adapter_layers=2, prompt_len=7, include_attention=False)
    words = attention_flops(1, 5, 97, 97, 16, 0, causal=True)
    prefix = attention_flops(1, 5, 97, 0, 16, 7, causal=False)
    assert with_attention.forward - without.forward == pytest.approx(3 * words + 2 * prefix)


def test_one_table_of_gpu_peaks_names_the_device():
    from fastadapter.training.flops import GPU_PEAKS, gpu_peak, training_hours
    assert gpu_peak("NVIDIA H100 PCIe").bf16_flops == 756e12  # the most specific name, not H100 SXM's
    assert gpu_peak("NVIDIA H100 80GB HBM3") is GPU_PEAKS["h100"]
    assert gpu_peak("NVIDIA H200").hbm_bytes_per_s == 4.8e12 and gpu_peak("NVIDIA A100-SXM4-80GB").name == "A100"
    assert gpu_peak("NVIDIA GeForce RTX 4090") is None
    assert training_hours(989e12 * 3600, gpu="h200", gpus=1, mfu=1.0) == pytest.approx(1.0)


def test_flex_attention_two_calls_match_the_reference():
    """The acceptance run's flex_attention provider (eager flex, its math reference, on CPU) computes the op."""
    from fastadapter.benchmarks.op_providers import flex_two_calls, word_block_mask
    config = OpConfig(batch=2, seqlen=37, heads_q=4, heads_kv=2, head_dim=16, prefix_len=5)
    inputs = config.make_inputs("cpu", requires_grad=False)
    out = flex_two_calls(*inputs, word_block_mask(37, "cpu"), compiled=False)
    expected = zero_init_attention_reference(*inputs, causal=True, gate_activation="tanh")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- runner, files, compare


_TINY_SUITE = textwrap.dedent('''
    """A tiny suite for the runner's test: the ops machinery on a toy shape, and one model-level row."""
    from fastadapter.benchmarks.bench_ops import Plan, Sweep, run_plan
    from fastadapter.benchmarks.op_providers import OpConfig

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
    for plot in ("ops-time", "ops-memory", "toymodel"):
        assert (out / f"t-{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown suite"):
        run_benchmarks(device="cpu", suites=["nope"], out_dir=out, bench_dir=bench_dir, log=lambda line: None)


def _recording_suite(name: str) -> str:
    """A suite file that returns one row saying which shapes (preset) the runner asked it for."""
    return textwrap.dedent(f'''
        def run(quick, device, *, full=False, preset=None, log=print):
            return [{{"suite": {name!r}, "provider": "p", "mode": preset, "config": "c", "median_ms": 1.0,
                     "p20_ms": 1.0, "p80_ms": 1.0}}]
    ''')


def test_the_default_run_is_the_main_job_and_leaves_the_long_suites_to_full(tmp_path):
    """The README's main job (default preset): the op table at its quick shapes, training and generation against
    PEFT; the PEFT-integration and multimodal suites are --full's, each left out in one line. A suite no preset
    names (a new one) runs in every preset."""
    for name in ("ops", "training", "generation", "multimodal", "peft_accelerate", "new_one"):
        (tmp_path / f"bench_{name}.py").write_text(_recording_suite(name))
    logged = []
    result = run_benchmarks(preset="default", device="cpu", out_dir=tmp_path / "out", bench_dir=tmp_path,
                            plots=False, log=logged.append)
    ran = {r["suite"]: r["mode"] for r in result.rows}
    assert ran == {"ops": "quick", "training": "default", "generation": "default", "new_one": "default"}
    left_out = {s["suite"]: s["reason"] for s in result.left_out}
    assert set(left_out) == {"multimodal", "peft_accelerate"} and not result.skipped
    assert all("not part of --default" in reason and "\n" not in reason for reason in left_out.values())
    # "left out" (by the preset's design) is not "skipped" (could not run here): the README test greps for the latter
    assert any(line.startswith("[multimodal] left out: not part of --default") for line in logged)
    assert not any("skipped" in line for line in logged)
    assert result.metadata["left_out_suites"] == result.left_out and result.metadata["skipped_suites"] == []
    assert result.metadata["suite_shapes"] == ran and result.metadata["budget_seconds"] == 300.0
    full = run_benchmarks(preset="full", device="cpu", out_dir=tmp_path / "full", bench_dir=tmp_path, plots=False,
                          log=logged.append)
    assert {r["suite"]: r["mode"] for r in full.rows} == dict.fromkeys(ran | left_out, "full")
    named = run_benchmarks(preset="default", device="cpu", suites=["multimodal"], out_dir=tmp_path / "one",
                           bench_dir=tmp_path, plots=False, log=logged.append)
    assert [(r["suite"], r["mode"]) for r in named.rows] == [("multimodal", "default")] and not named.skipped


def test_a_suite_whose_data_is_missing_says_so_in_one_line(tmp_path, monkeypatch):
    """Without ../shared/data the main job still runs whole: the training suite is skipped with one line naming
    the files and the folder, read when the suite runs (the variable set after import counts)."""
    monkeypatch.setenv("FASTADAPTER_SHARED_DATA", str(tmp_path / "no-data"))
    logged = []
    result = run_benchmarks(preset="smoke", device="cpu", suites=["training"], out_dir=tmp_path / "out",
                            plots=False, log=logged.append)
    assert not result.errors and not result.rows
    (skipped,) = result.skipped
    assert skipped["suite"] == "training" and "\n" not in skipped["reason"]
    assert "alpaca_tiny.json" in skipped["reason"] and str(tmp_path / "no-data") in skipped["reason"]
    assert any(line.startswith("[training] skipped: needs alpaca_tiny.json") for line in logged)


def test_each_model_level_suite_gets_its_own_figure_of_speedups(tmp_path):
    from fastadapter.benchmarks import plots
    rows = [{"suite": "training", "provider": p, "mode": "train_step", "config": "c", "median_ms": t, "p20_ms": t,
             "p80_ms": t} for p, t in (("peft", 6.0), ("packed", 2.0))]
    rows += [{"suite": "generation", "provider": p, "mode": m, "config": "g", "median_ms": t, "p20_ms": t,
              "p80_ms": t} for m in ("prefill", "generate") for p, t in (("hf-peft", 4.0), ("thin", 5.0))]
    assert plots.speedup_groups(rows, "training") == [("train_step", "c", [("peft", 1.0), ("packed", 3.0)])]
    assert [g[:2] for g in plots.speedup_groups(rows, "generation")] == [("prefill", "g"), ("generate", "g")]
    files = plots.draw_all(rows, {"device_name": "test machine"}, tmp_path, "t")
    assert sorted(f.name for f in files) == ["t-generation.png", "t-training.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_runner_times_each_suite_and_warns_over_the_budget(tmp_path, monkeypatch):
    import fastadapter.benchmarks.runner as runner
    (tmp_path / "bench_one.py").write_text(textwrap.dedent('''
        def run(quick, device):
            return [{"suite": "one", "provider": "p", "mode": "m", "config": "c", "median_ms": 1.0, "p20_ms": 1.0,
                     "p80_ms": 1.0}]
    '''))
    logged = []
    result = run_benchmarks(preset="quick", device="cpu", out_dir=tmp_path / "out", bench_dir=tmp_path, plots=False,
                            log=logged.append)
    assert _finite(result.metadata["suite_seconds"], "one") and result.metadata["budget_seconds"] == 120.0
    assert any(line.startswith("[one] 1 rows in") for line in logged)
    assert not any("WARNING" in line for line in logged)
    monkeypatch.setitem(runner.PRESET_BUDGET_SECONDS, "quick", -1.0)
    logged.clear()
    run_benchmarks(preset="quick", device="cpu", out_dir=tmp_path / "out", bench_dir=tmp_path, plots=False,
                   log=logged.append)
    assert any("WARNING: this quick run took" in line and "over its -1 s budget" in line for line in logged)


def _git(repo: pathlib.Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


def test_git_metadata_counts_untracked_source_files_as_dirty(tmp_path):
    from fastadapter.benchmarks.metadata import UNTRACKED_LISTED, git_commit
    repo = tmp_path / "repo"
    for folder in ("fastadapter", "csrc", "benchmarks/results", "docs"):
        (repo / folder).mkdir(parents=True)
    (repo / "fastadapter" / "op.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.so\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    state = git_commit(repo)
    assert len(state["commit"]) == 40 and state["dirty"] is False and state["untracked"] == []
    # Not source: results, an ignored build product, a file outside the source folders.
    (repo / "benchmarks" / "results" / "cpu-default.json").write_text("{}")
    (repo / "fastadapter" / "_C.so").write_bytes(b"")
    (repo / "docs" / "notes.md").write_text("")
    assert git_commit(repo)["dirty"] is False
    (repo / "csrc" / "new_kernel.h").write_text("")
    state = git_commit(repo / "fastadapter")  # any folder of the checkout: paths are the repository's
    assert state["dirty"] is True and state["untracked"] == ["csrc/new_kernel.h"] and state["untracked_count"] == 1
    for i in range(UNTRACKED_LISTED + 2):
        (repo / "benchmarks" / f"bench_{i:02d}.py").write_text("")
    state = git_commit(repo)
    assert len(state["untracked"]) == UNTRACKED_LISTED and state["untracked_count"] == UNTRACKED_LISTED + 3
    for path in [repo / "csrc" / "new_kernel.h", *(repo / "benchmarks").glob("bench_*.py")]:
        path.unlink()
    (repo / "fastadapter" / "op.py").write_text("x = 2\n")  # a modified tracked file is dirty, as before
    state = git_commit(repo)
    assert state["dirty"] is True and state["untracked"] == [] and state["untracked_count"] == 0
    (tmp_path / "plain").mkdir()
    assert git_commit(tmp_path / "plain") == {"commit": None, "dirty": None, "untracked": [], "untracked_count": 0}


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
                           "-p", "no:cacheprovider", "--bench-seqlens=64", "-k", "two-sdpa or (eager and not compiled)"],
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


def test_cpu_kernel_targets_prints_and_saves_its_tables(tmp_path, capsys):
    """The issue-3 target benchmark on tiny shapes: every table, the saved-bytes check, and the saved copy; a
    progress line on stderr per measured row, none in the saved tables."""
    from fastadapter.benchmarks import cpu_kernel_targets
    out = tmp_path / "targets.txt"
    assert cpu_kernel_targets.main(["--repeats", "1", "--seqlens", "64", "--heads-kv", "32", "8", "--dtypes", "fp32",
                                    "bf16", "--decode-seqlens", "32", "--decode-batches", "2", "--decode-repeats",
                                    "2", "--no-compile", "--compare-products", "--out", str(out)]) == 0
    progress = [line.strip() for line in capsys.readouterr().err.splitlines() if re.match(r"\s+\w+ \d+/\d+: ", line)]
    assert [line.split(":")[0] for line in progress] == (
        [f"prefill {i}/4" for i in range(1, 5)] + ["decode 1/2", "decode 2/2", "products 1/2", "products 2/2"])
    assert progress[0].startswith("prefill 1/4: fp32 Hkv=32 S=64 (")
    text = out.read_text()
    assert "prefill 1/4" not in text
    assert "# prefill" in text and "# decode" in text and "# bytes saved for backward" in text
    # the product table: one row per dtype, a time for every choice this CPU runs, MKL's always
    names = cpu_kernel_targets.available_products()
    assert names[-1] == "mkl" and "# products of the same variant (FASTADAPTER_CPU_GEMM=" + "|".join(names) in text
    product_table = text.split("# products of the same variant")[1].split("\n\n")[0].splitlines()
    product_rows = [line for line in product_table if line.startswith(("fp32 ", "bf16 "))]
    assert len(product_rows) == 2
    for row in product_rows:
        times = [float(x) for part in row.split("|")[1:3] for x in part.split()]
        assert len(times) == 2 * len(names) and all(math.isfinite(x) and x > 0 for x in times)
    # every prefill row: GFLOP/s, the same-run GEMM's and the percentage, finite; the context line first
    assert text.startswith("CPU ") and "load average" in text.splitlines()[0]
    rows = [line for line in text.splitlines() if line.startswith(("fp32 ", "bf16 ")) and line.count("|") == 2]
    assert len(rows) == 2 * 2 * 2  # (forward, forward + backward) x dtypes x kv heads
    for row in rows:
        ms, gflops, peak, percent = (float(x) for x in row.split("|")[1].split())
        assert all(math.isfinite(x) and x > 0 for x in (ms, gflops, peak, percent))
    assert text.count("(expected") == 2 and "DIFFERENT" not in text
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert metadata["preset"] == "cpu-kernel-targets" and metadata["versions"]["torch"] == torch.__version__


def test_bf16_peak_is_the_fp32_gemm_where_onednn_has_no_bf16_gemm():
    """On an AVX2-only CPU oneDNN refuses a bf16 GEMM ("bf16 path needs the cpu support avx_ne_convert or
    avx512bw..."), which crashed every bf16 row of the targets there; such rows are judged against the fp32 GEMM.
    ONEDNN_MAX_CPU_ISA=AVX2 gives oneDNN that CPU's view on any x86 machine."""
    script = ("import torch; from fastadapter.benchmarks.gemm_peak import peak_for; peak = peak_for(torch.bfloat16); "
              "peak.call(); print(peak.dtype, peak.gflops(1.0) > 0)")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.float32", "True"]
    # where oneDNN has bf16 products, the bf16 GEMM judges bf16 (this process: the machine's own ISA)
    native = has_native_products(torch.bfloat16)
    assert peak_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert peak_dtype(torch.float16) == torch.float32 and peak_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpu_kernel_targets_on_an_emulated_cpu_holds_every_library_to_its_isa(tmp_path, isa):
    """--emulate avx2 runs the targets in a child process whose torch, oneDNN, MKL and fastadapter all run AVX2:
    not fastadapter's AVX2 variant against torch's AVX-512 and AMX kernels (what FASTADAPTER_CPU_ISA=avx2 alone
    measures); --emulate generic holds them to SSE4 and torch's baseline kernels."""
    from fastadapter.benchmarks import cpu_kernel_targets
    from fastadapter.benchmarks.emulated_cpu import EMULATIONS
    out = tmp_path / "emulated.txt"
    assert cpu_kernel_targets.main(["--emulate", isa, "--repeats", "1", "--seqlens", "64", "--heads-kv", "8",
                                    "--dtypes", "fp32", "bf16", "--decode-seqlens", "32", "--decode-batches", "1",
                                    "--decode-repeats", "2", "--no-compile", "--no-eager", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    switches = EMULATIONS[isa]
    assert lines[0].endswith(f"torch kernels {switches['ATEN_CPU_CAPABILITY'].upper()}; emulated CPU: "
                             f"ATEN_CPU_CAPABILITY={switches['ATEN_CPU_CAPABILITY']}, "
                             f"MKL_ENABLE_INSTRUCTIONS={switches['MKL_ENABLE_INSTRUCTIONS']}, "
                             f"ONEDNN_MAX_CPU_ISA={switches['ONEDNN_MAX_CPU_ISA']}")
    assert lines[1].startswith(f"cpu kernels: {isa} variant")
    assert "bf16 rows are judged against the fp32 GEMM: oneDNN has no bf16 GEMM on this CPU" in lines
    rows = [line for line in lines if line.startswith(("fp32 ", "bf16 ")) and line.count("|") == 2]
    assert len(rows) == 2 * 2
    for row in rows:
        assert all(math.isfinite(float(x)) and float(x) > 0 for x in row.split("|")[1].split())
    # the parent ran nothing itself: its process keeps the machine's own kernels
    assert "emulated CPU" not in context_line()


# -- optional dependencies, output, progress


_ONE_ROW_SUITE = textwrap.dedent('''
    REQUIRES = {requires!r}

    def run(quick, device):
        return [{{"suite": {name!r}, "provider": "p", "mode": "m", "config": "c", "median_ms": 1.0, "p20_ms": 1.0,
                  "p80_ms": 1.0}}]
''')


def test_a_suite_whose_optional_dependency_is_missing_or_broken_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """A missing package, and one that is installed but raises on import (as transformers did when our kernels/
    shadowed HF's), skip their suites with the error; the run still succeeds with the suites that could run."""
    (tmp_path / "broken_dependency.py").write_text("raise RuntimeError('half-installed: libfoo.so missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    suites = tmp_path / "suites"
    suites.mkdir()
    for name, requires in (("fine", ("json",)), ("missing", ("fastadapter_no_such_module",)),
                           ("broken", ("broken_dependency",))):
        (suites / f"bench_{name}.py").write_text(_ONE_ROW_SUITE.format(requires=requires, name=name))
    logged = []
    result = run_benchmarks(preset="smoke", device="cpu", out_dir=tmp_path / "out", bench_dir=suites, plots=False,
                            log=logged.append)
    assert not result.errors and [row["suite"] for row in result.rows] == ["fine"]
    reasons = {skip["suite"]: skip["reason"] for skip in result.skipped}
    assert "ModuleNotFoundError" in reasons["missing"] and "fastadapter_no_such_module" in reasons["missing"]
    assert "RuntimeError: half-installed: libfoo.so missing" in reasons["broken"]
    assert load_json(tmp_path / "out" / "cpu-smoke.json")["metadata"]["skipped_suites"] == result.skipped
    assert any(line.startswith("[broken] skipped: needs broken_dependency") for line in logged)


def test_bench_without_peft_runs_the_op_suite_and_exits_0(tmp_path, monkeypatch, capsys):
    """The real suites: with peft not importable the model-level suites are skipped (saying so) and the op suite
    runs; ``fastadapter bench`` exits 0. Every suite skipped (nothing measured) exits 1."""
    from fastadapter.cli import main
    monkeypatch.setitem(sys.modules, "peft", None)  # "import peft" now raises ImportError
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--smoke", "--device", "cpu", "--suites", "ops", "generation", "--no-plots",
                 "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "suite generation skipped: needs peft" in printed and "== ops ==" in printed
    assert main(["bench", "--smoke", "--device", "cpu", "--suites", "generation", "--no-plots",
                 "--out", str(tmp_path / "out2")]) == 1


def test_bench_writes_each_run_to_a_new_folder_and_leaves_the_committed_results_alone(tmp_path, monkeypatch):
    from fastadapter.benchmarks import runner
    results = runner.REFERENCE_RESULTS_DIR
    committed = {p.relative_to(results): p.read_bytes() for p in results.rglob('*') if p.is_file()}
    (tmp_path / "bench_one.py").write_text(_ONE_ROW_SUITE.format(requires=(), name="one"))
    monkeypatch.chdir(tmp_path)
    first = run_benchmarks(preset="smoke", device="cpu", bench_dir=tmp_path, plots=False, log=lambda line: None)
    second = run_benchmarks(preset="smoke", device="cpu", bench_dir=tmp_path, plots=False, log=lambda line: None)
    folders = {path.resolve().parent for path in first.files} | {path.resolve().parent for path in second.files}
    assert len(folders) == 2 and all(f.parent == tmp_path.resolve() / "bench-results" for f in folders)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+-\d{8}T\d{6}Z(-\d+)?", f.name) for f in folders), folders
    assert {p.relative_to(results): p.read_bytes() for p in results.rglob('*') if p.is_file()} == committed


def test_plot_titles_name_the_machine_and_the_commit(tmp_path):
    from fastadapter.benchmarks import plots
    metadata = {"device_name": "AMD EPYC 7B13 (2 cores, 24 GiB)", "created_utc": "2026-12-01T20:00:00Z",
                "git": {"commit": "0123456789abcdef", "dirty": True}, "versions": {"fastadapter": "0.1.0"}}
    title = plots._title(metadata, "zero-init attention")
    assert "AMD EPYC 7B13" in title and "commit 0123456789 (dirty)" in title and "2026-12-01" in title
    assert "fastadapter 0.1.0 (no git checkout)" in plots._title({**metadata, "git": {"commit": None}}, "x")
    rows = [{"suite": "ops", "provider": p, "mode": "forward", "config": f"S{s}", "median_ms": t, "p20_ms": t,
             "p80_ms": t, "sweep": "seqlen", "x_axis": "seqlen", "x": s, "batch": 1, "heads_q": 4, "heads_kv": 4,
             "head_dim": 16, "prefix_len": 2, "seqlen": s, "dtype": "float32"}
            for p, t in (("a", 1.0), ("b", 2.0)) for s in (16, 32)]
    import matplotlib.pyplot as plt
    titles = []
    monkeypatch_savefig = plt.Figure.savefig
    try:
        plt.Figure.savefig = lambda fig, *args, **kwargs: titles.append(fig._suptitle.get_text())
        plots.plot_op_times(rows, metadata, tmp_path / "t.png")
    finally:
        plt.Figure.savefig = monkeypatch_savefig
    assert titles and "commit 0123456789 (dirty)" in titles[0] and "AMD EPYC 7B13" in titles[0]


_BLOCKING_SUITE = textwrap.dedent('''
    import pathlib, time

    def run(quick, device, log):
        log("[inside] waiting for the test to read this line")
        sentinel = pathlib.Path(__file__).with_name("go")
        deadline = time.monotonic() + 60
        while not sentinel.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return []
''')


def test_progress_lines_reach_a_pipe_while_the_run_goes_on(tmp_path):
    """stdout redirected (CI, nohup, tee): each progress line arrives as it is printed, not at the end."""
    (tmp_path / "bench_block.py").write_text(_BLOCKING_SUITE)
    script = (f"from fastadapter.benchmarks.runner import run_benchmarks\n"
              f"run_benchmarks(preset='smoke', device='cpu', bench_dir={str(tmp_path)!r}, plots=False, "
              f"out_dir={str(tmp_path / 'out')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, cwd=tmp_path)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "no progress line within 60 s while the suite was running"
        first = process.stdout.readline().decode()
        assert first.startswith("[block] running (smoke shapes, cpu)"), first
        # Read through the same buffered reader: communicate() reads the pipe's file descriptor directly, so a
        # line this reader had already buffered would be lost to it.
        second = process.stdout.readline().decode()
        assert second.startswith("[inside] waiting"), second
    finally:
        (tmp_path / "go").write_text("")
        rest = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, rest
    assert "[block] 0 rows in" in rest


def test_progress_shows_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    import io
    from fastadapter.benchmarks.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = Progress(2, stream=terminal)
    progress.describe("ops")
    progress.log("[ops] running")
    progress.advance()
    progress.close()
    assert "[ops] running" in terminal.getvalue() and "1/2" in terminal.getvalue()
    piped = io.StringIO()
    plain = Progress(2, stream=piped)
    plain.log("[ops] running")
    plain.advance()
    plain.close()
    assert piped.getvalue() == "[ops] running\n"


def test_multimodal_suite_runs_its_smoke_preset():
    """The eager baseline stands in for the thin model's attention call: it must take every keyword the model passes
    (a model option that added one made the suite fail, caught only by the slow fresh-venv README test)."""
    from fastadapter.benchmarks import bench_multimodal
    rows = bench_multimodal.run(False, "cpu", preset="smoke", log=lambda line: None)
    check_rows("multimodal", rows)
    assert len(rows) == 4 and all(_finite(r, "median_ms") for r in rows)
