"""The two real GGUF files (SmolLM2-135M-Instruct Q4_1, Gemma-3-270M Q4_K_M) against transformers' own GGUF
load, in full (``-m slow``: minutes of loads and generation on a CPU): fp32 logits of a long Alpaca prompt, the
tokenizer's ids for LLaMA's golden strings and 100 Alpaca rows, the greedy text of 5 prompts, zero gates, and the
CLI's train and generate on a GGUF file. The default run's fast checks are in tests/test_gguf.py.
"""
import json

import pytest
import torch

from fastadapter import AdapterConfig, add_adapter, generate, load_model, load_tokenizer
from fastadapter.cli import main as cli_main

pytestmark = pytest.mark.slow

SEPARATOR = "\n__ggml_vocab_test__\n"
PROMPTS = ("Give three tips for staying healthy.", "What is the capital of France?",
           "Write a haiku about the sea.", "Explain photosynthesis in one sentence.", "List three prime numbers.")
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=["smollm2_gguf", "gemma3_gguf"])
def real(request):
    """``(path, fastadapter model, fastadapter tokenizer, transformers model, transformers tokenizer)`` of one
    real file, built once for the module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(request.param)
    folder, name = str(path.parent), path.name
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return (path, load_model(path), load_tokenizer(path), reference,
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def _alpaca_rows(shared_data, n):
    return json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:n]


def test_logits_match_transformers_in_fp32(real, shared_data):
    _, model, tokenizer, reference, _ = real
    row = _alpaca_rows(shared_data, 1)[0]
    tokens = torch.tensor([tokenizer.encode(row["instruction"] + "\n" + row["output"], bos=True)[:200]])
    with torch.no_grad():
        got, want = model(tokens), reference(tokens).logits.float()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_tokenizer_ids_match_transformers(real, shared_data):
    _, _, tokenizer, _, reference = real
    texts = (shared_data / "llama_spm_golden.inp").read_text(encoding="utf-8").split(SEPARATOR)
    texts += [row["instruction"] + "\n" + row["input"] + "\n" + row["output"]
              for row in _alpaca_rows(shared_data, 100)]
    for text in texts:
        assert tokenizer.encode(text, bos=True) == reference(text)["input_ids"], text


def test_greedy_text_matches_transformers(real):
    _, model, tokenizer, reference, reference_tokenizer = real
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, bos=True)
        got = generate(model, [ids], max_new_tokens=NEW_TOKENS, eos_id=tokenizer.eos_id)[0]
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
        want = [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_id]
        assert tokenizer.decode(got) == reference_tokenizer.decode(want, skip_special_tokens=True), prompt


def test_zero_gates_give_exactly_the_base_model(real):
    _, model, tokenizer, _, _ = real
    tokens = torch.tensor([tokenizer.encode(PROMPTS[0], bos=True)])
    with torch.no_grad():
        base = model(tokens)
        add_adapter(model, AdapterConfig(prompt_len=10, layers=model.config.n_layers // 2))
        try:
            adapted = model(tokens)
        finally:
            for block in model.layers:
                block.attention.adapter = None
            model.adapter_config = None
    assert torch.equal(adapted, base)


def test_cli_trains_and_generates_from_a_gguf_file(smollm2_gguf, shared_data, tmp_path, capsys):
    """``fastadapter train --model x.gguf`` (the tokenizer from the file) with the dequantized base quantized again
    by torchao (``--quantize int8``), then ``generate`` with the adapter."""
    out = tmp_path / "run"
    assert cli_main(["train", "--model", str(smollm2_gguf), "--data", str(shared_data / "alpaca_tiny.json"),
                     "--out", str(out), "--no-progress", "--device", "cpu", "--max-steps", "2",
                     "--batch-tokens", "512", "--adapter-layers", "4", "--quantize", "int8"]) == 0
    assert (out / "adapter.safetensors").is_file()
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(smollm2_gguf), "--adapter", str(out / "adapter.safetensors"),
                     "--template", "alpaca", "--prompt", PROMPTS[1], "--max-new-tokens", "8",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
