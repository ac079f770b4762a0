"""The CLI on the models people use today: a tiny random Mistral folder with a tokenizer.json and a chat template,
trained from ``fastadapter train`` on chat rows (through --config run.yaml), resumed, sampled at every
evaluation, generated from, and exported to PEFT, where real PEFT computes the same logits."""
import json

import pytest
import torch

from fastadapter.cli import main

from hf_folders import CHAT_ROWS, save_tiny_model, write_chat_tokenizer


@pytest.fixture(scope="module")
def mistral_folder(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_mistral")
    write_chat_tokenizer(shared_data, folder)
    save_tiny_model(folder, "mistral")
    return folder


def _train_argv(folder, data, out, *extra):
    return ["train", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-tokens", "256",
            "--max-seq-len", "128", "--eval-fraction", "0.2", "--no-progress", "--prompt-len", "4",
            "--warmup", "1", "--lr", "0.05", *extra]


@pytest.mark.slow
def test_mistral_chat_train_resume_generate_export_to_peft(mistral_folder, tmp_path, capsys):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    from fastadapter.adapters.adapter import load_adapter
    from fastadapter.loaders.checkpoints import load_model

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(CHAT_ROWS[i % 3]) for i in range(30)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\n{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}]}\n")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("template: chat\ngate_shape: scalar\ngate_activation: none\nmax_steps: 2\n"
                        f"eval_every: 1\nsave_every: 1\neval_prompts: {prompts}\neval_max_new_tokens: 4\n")
    out = tmp_path / "run"
    assert main(_train_argv(mistral_folder, data, out, "--config", str(run_yaml))) == 0
    printed = capsys.readouterr().out
    assert "--template chat" in printed
    # Resume the finished run to 4 steps: the command line overrides the file's max_steps.
    assert main(_train_argv(mistral_folder, data, out, "--config", str(run_yaml), "--max-steps", "4",
                            "--resume")) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert all("eval_loss" in m for m in metrics)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(isinstance(s["output"], str) for s in samples)

    adapter = out / "adapter.safetensors"
    assert main(["generate", "--model", str(mistral_folder), "--adapter", str(adapter), "--template", "chat",
                 "--prompt", "Name a colour.", "--max-new-tokens", "3", "--device", "cpu", "--dtype", "fp32"]) == 0
    capsys.readouterr()

    exported = tmp_path / "peft"
    assert main(["export", "--to", "peft", str(adapter), str(exported)]) == 0
    model = load_model(mistral_folder)
    load_adapter(model, adapter)
    assert float(model.layers[-1].attention.adapter.gate.detach().abs()) > 0  # trained: the check below is not vacuous
    hf = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(mistral_folder), exported).eval()
    tokens = torch.randint(0, 32002, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_qwen2_folder_trains_from_the_cli_on_chat_rows(shared_data, tmp_path, capsys):
    folder = write_chat_tokenizer(shared_data, tmp_path / "qwen2")
    save_tiny_model(folder, "qwen2")
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(CHAT_ROWS * 4))
    assert main(_train_argv(folder, data, tmp_path / "run", "--template", "chat", "--max-steps", "1",
                            "--eval-every", "0")) == 0
    printed = capsys.readouterr().out
    assert "eval loss" in printed and (tmp_path / "run" / "adapter.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "olmo", "smollm3"])
def test_new_family_folder_trains_resumes_and_generates_from_the_cli(family, shared_data, tmp_path, capsys):
    """Each family the thin model gained trains from ``fastadapter train`` on chat rows, resumes to more steps
    (the adapter moved, the checkpoint's step continues), and generates from the trained adapter."""
    folder = write_chat_tokenizer(shared_data, tmp_path / family)
    save_tiny_model(folder, family)
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(CHAT_ROWS * 4))
    out = tmp_path / "run"
    argv = _train_argv(folder, data, out, "--template", "chat", "--eval-every", "0", "--save-every", "1")
    assert main([*argv, "--max-steps", "2"]) == 0
    assert main([*argv, "--max-steps", "3", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resum" in printed.lower()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-3:] == [1, 2, 3]

    from fastadapter.adapters.adapter import load_adapter
    from fastadapter.loaders.checkpoints import load_model
    model = load_adapter(load_model(folder), out / "adapter.safetensors")
    assert float(model.layers[-1].attention.adapter.gate.detach().abs().max()) > 0  # trained, not the zero init
    assert main(["generate", "--model", str(folder), "--adapter", str(out / "adapter.safetensors"), "--template",
                 "chat", "--prompt", "Name a colour.", "--max-new-tokens", "3", "--device", "cpu",
                 "--dtype", "fp32"]) == 0


def test_train_refuses_sequences_longer_than_the_sliding_window(shared_data, tmp_path, capsys):
    """The loader caps a windowed model's max_seq_len at its window (full attention is exact within it):
    ``--max-seq-len`` past it is refused, not trained with attention the model never computes."""
    folder = write_chat_tokenizer(shared_data, tmp_path / "gemma2")
    save_tiny_model(folder, "gemma2")  # window 128
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(CHAT_ROWS * 4))
    # The later --max-seq-len wins over _train_argv's 128.
    assert main(_train_argv(folder, data, tmp_path / "run", "--template", "chat", "--max-steps", "1",
                            "--max-seq-len", "200")) == 2
    assert "--max-seq-len (200) exceeds the model's max_seq_len (128: its context, or its sliding attention window)" \
        in capsys.readouterr().err
