"""The ragged generation benchmark: every provider generates the same greedy tokens before it is timed, the
previous per-length path kept as its reference is the one it replaced (eight op calls per layer per step for eight
lengths), and a forced backend that cannot run ragged inputs is reported as skipped with the reason."""
import json
import math

import torch

from fastadapter.benchmarks import bench_generation
from fastadapter.benchmarks.bench_generation import GenerationConfig, ragged_lengths

TINY = GenerationConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=256, batch=2, prompt_tokens=17,
                        new_tokens=3, prompt_len=3)


def test_ragged_lengths_are_eight_distinct_lengths():
    assert ragged_lengths(128) == [128, 29, 78, 47, 114, 16, 95, 64]
    assert len(set(ragged_lengths(8))) == 8


def test_the_per_length_reference_makes_one_call_per_length_group(monkeypatch, make_config):
    from fastadapter import generate
    from fastadapter.model import LlamaModel

    import fastadapter
    calls = []
    dense, varlen = fastadapter.zero_init_attention, fastadapter.zero_init_attention_varlen
    monkeypatch.setattr(fastadapter, "zero_init_attention", lambda *a, **k: calls.append(1) or dense(*a, **k))
    monkeypatch.setattr(fastadapter, "zero_init_attention_varlen",
                        lambda *a, **k: calls.append(1) or varlen(*a, **k))
    config = make_config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=40, max_seq_len=64)
    torch.manual_seed(0)
    model = LlamaModel(config)
    prompts = [[1] * n for n in (3, 5, 2)]
    ragged = generate(model, prompts, max_new_tokens=3)
    with bench_generation._per_length_path():
        assert generate(model, prompts, max_new_tokens=3) == ragged
    # Prefill: one call per layer; each of the two decoding steps: one call per layer per distinct length.
    assert len(calls) == config.n_layers * (1 + 2 * 3)
    from fastadapter.model.llama import Attention
    assert Attention.forward is not bench_generation.per_length_attention  # restored


def test_main_prints_and_saves_ragged_rows_that_agree_before_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_generation, "config_for", lambda preset: TINY)
    out = tmp_path / "ragged.json"
    assert bench_generation.main(["--ragged-only", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "fastadapter-auto" in printed and "x the per-length path" in printed and f"wrote {out}" in printed
    payload = json.loads(out.read_text())
    assert payload["metadata"]["preset"] == "quick"
    rows = payload["rows"]
    measured = [r for r in rows if not r.get("skipped")]
    providers = list(dict.fromkeys(r["provider"] for r in measured))
    assert providers[:3] == ["hf-peft-left-padded", "fastadapter-auto-per-length", "fastadapter-auto"]
    assert "fastadapter-sdpa" in providers
    for row in measured:
        # Timed fields are only checked to be measured (a per-token time is a difference of two timings: at this
        # tiny shape the noise may exceed it); p20 <= p80 holds for any samples (quantiles of one sorted list).
        assert row["agree"] == 1.0 and math.isfinite(row["median_ms"]) and row["p20_ms"] <= row["p80_ms"]
        assert row["config"].endswith("-ragged8") and row["mode"] in ("prefill", "per_token")
        assert row["prompt_lengths"] == ragged_lengths(17)
        ragged = row["provider"].startswith("fastadapter") and not row["provider"].endswith(("-per-length",
                                                                                               "-F.linear"))
        assert ("speedup_vs_per_length" in row) == ragged
        # The user's path beside itself with its linears on F.linear (the decode_linear kernel's share).
        assert ("speedup_vs_torch_linears" in row) == (row["provider"] == "fastadapter-auto")
    assert "fastadapter-auto-F.linear" in providers and "path with its linears on F.linear" in printed
    for row in rows:
        if row.get("skipped"):  # today: the cpu kernels, until they read seqused_k
            assert row["median_ms"] is None and "cannot run these inputs" in row["skipped"]
