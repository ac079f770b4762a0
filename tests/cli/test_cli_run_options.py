"""CLI run options on stories260K: --config run.yaml (flags override it), --eval-prompts, --tensorboard,
--gate-shape, --adapter v2 from the CLI, fastadapter export --to peft|litgpt|v1 (read back by load_adapter)."""
import json

import pytest
import torch

from fastadapter.cli import build_parser, main
from fastadapter.adapters.adapter import AdapterConfig, add_adapter, load_adapter, save_adapter
from fastadapter.loaders.checkpoints import load_model
from fastadapter.commands._config_file import config_words, with_config

ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(24)]


def _args(shared_data, data, out, *extra):
    return ["train", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--data", str(data), "--out", str(out), "--no-progress", "--device", "cpu", "--batch-tokens", "800",
            "--max-seq-len", "200", "--eval-fraction", "0.2", *extra]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    return path


def test_config_file_words_and_overrides(tmp_path):
    parser = build_parser("train")._subparsers._group_actions[0].choices["train"]
    run = tmp_path / "run.yaml"
    run.write_text("model: m.bin\nmax_steps: 3\nlr: 0.01\noverwrite: true\nno-progress: false\n")
    assert config_words(parser, str(run)) == ["--model", "m.bin", "--max-steps", "3", "--lr", "0.01", "--overwrite"]
    argv = with_config(parser, ["--config", str(run), "--data", "d.json", "--out", "o", "--lr", "0.5"])
    args = parser.parse_args(argv)
    assert (args.model, args.max_steps, args.lr, args.overwrite) == ("m.bin", 3, 0.5, True)  # the flag wins
    run.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown setting 'max_step'; expected one of: .*max-steps"):
        config_words(parser, str(run))
    run.write_text("overwrite: 1\n")
    with pytest.raises(ValueError, match="overwrite is a switch: expected true or false, got 1"):
        config_words(parser, str(run))
    run.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping of flags"):
        config_words(parser, str(run))


def test_config_file_errors_from_the_cli(shared_data, data, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("gate_shape: diagonal\n")
    with pytest.raises(SystemExit):  # argparse checks the file's values as it checks flags
        main(_args(shared_data, data, tmp_path / "out", "--config", str(run)))
    assert "argument --gate-shape: invalid choice: 'diagonal'" in capsys.readouterr().err
    assert main(_args(shared_data, data, tmp_path / "out", "--config", str(tmp_path / "none.yaml"))) == 2
    assert "--config file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_prompts_tensorboard_and_scalar_gates(shared_data, data, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say the number 3.\n{\"instruction\": \"Say the number 5.\"}\n")
    out = tmp_path / "run"
    assert main(_args(shared_data, data, out, "--max-steps", "2", "--eval-every", "1", "--eval-prompts", str(prompts),
                      "--eval-max-new-tokens", "3", "--tensorboard", "--gate-shape", "scalar")) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples][:2] == [(0, "Say the number 3."),
                                                            (0, {"instruction": "Say the number 5."})]
    assert [s["step"] for s in samples] == [0, 0, 1, 1, 2, 2]
    assert all(s["eval_loss"] is not None for s in samples)
    assert list((out / "tensorboard").iterdir())  # an events file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    model = load_model(shared_data / "stories260K.bin")
    load_adapter(model, out / "adapter.safetensors")
    assert model.layers[-1].attention.adapter.gate.shape == (1,)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(_args(shared_data, data, tmp_path / "run2", "--eval-prompts", str(bad))) == 2
    assert "line 1 has none of 'prompt', 'instruction', 'messages'" in capsys.readouterr().err


@pytest.mark.slow
def test_adapter_v2_from_the_cli(shared_data, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(shared_data, data, out, "--max-steps", "1", "--adapter", "v2")) == 0
    printed = capsys.readouterr().out
    # stories260K: dim 64, hidden 172, 5 layers, 8 heads; P = 10 on all 5 layers.
    v1 = 10 * 5 * 64 + 5 * 8
    bias_scale = 2 * (64 + 32 + 32 + 64 + 2 * 172 + 64) * 5  # wq wk wv wo (4 kv heads of 8), w1 w3, w2
    norms = (2 * 5 + 1) * 64
    assert f"adapter v2: top 5 layers, prompt 10, {v1 + bias_scale + norms:,} trainable parameters" in printed
    adapter = out / "adapter.safetensors"
    assert main(["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer",
                 str(shared_data / "tok512.bin"), "--adapter", str(adapter), "--prompt", "Once", "--max-new-tokens",
                 "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["export", "--to", "peft", str(adapter), str(tmp_path / "peft")]) == 2
    assert "a LLaMA-Adapter V2 adapter" in capsys.readouterr().err


@pytest.mark.parametrize("to, per_head, activation", [
    ("peft", False, "tanh"),  # tanh(g) becomes PEFT's raw gate
    ("litgpt", True, "tanh"),
    ("v1", False, "none"),  # a raw scalar gate becomes v1's per-head tanh gate atanh(g)
])
def test_export_reads_back_with_equal_logits(shared_data, tmp_path, capsys, to, per_head, activation):
    model = load_model(shared_data / "stories260K.bin")
    add_adapter(model, AdapterConfig(prompt_len=6, layers=3, gate_per_head=per_head, gate_activation=activation))
    with torch.no_grad():
        for block in model.layers[2:]:
            block.attention.adapter.gate.uniform_(-0.8, 0.8)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(model, adapter)
    target = tmp_path / ("peft" if to == "peft" else f"{to}.pth")
    assert main(["export", "--to", to, str(adapter), str(target)]) == 0
    capsys.readouterr()
    loaded = load_model(shared_data / "stories260K.bin")
    load_adapter(loaded, target, format={"v1": "llama_adapter_v1"}.get(to, to))
    tokens = torch.randint(0, 512, (1, 29))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_export_refusals(shared_data, tmp_path, capsys):
    model = load_model(shared_data / "stories260K.bin")
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2))  # per-head gates
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(model, adapter)
    assert main(["export", "--to", "peft", str(adapter), str(tmp_path / "peft")]) == 2
    assert "train with --gate-shape scalar" in capsys.readouterr().err
    add_adapter(model, AdapterConfig(prompt_len=4, layers=[0, 4], gate_per_head=False))
    save_adapter(model, adapter)
    assert main(["export", "--to", "v1", str(adapter), str(tmp_path / "v1.pth")]) == 2
    assert "adapts the top layers only" in capsys.readouterr().err


def test_return_memory_to_os_reaches_the_trainer(shared_data, data, tmp_path, monkeypatch):
    """--return-memory-to-os: the trainer pins the C library's thresholds (off without the flag)."""
    from fastadapter.training import trainer as trainer_module
    calls = []
    monkeypatch.setattr(trainer_module, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    assert main(_args(shared_data, data, tmp_path / "a", "--max-steps", "1")) == 0
    assert calls == []
    assert main(_args(shared_data, data, tmp_path / "b", "--max-steps", "1", "--return-memory-to-os")) == 0
    assert calls == [1]
