"""The FLOP model of ``fastadapter plan`` (checked against PyTorch's FLOP counter on a real backward) and the
command's output."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastadapter.cli import main
from fastadapter.training.flops import (NAMED_CONFIGS, epoch_flops, padded_lengths, sequence_flops,
                                        training_hours)
from training_runs import tiny_adapted_model


@pytest.mark.parametrize("adapter_layers", [1, 2, 4])
def test_weight_matmuls_match_the_flop_counter(adapter_layers):
    """Forward and backward of the real adapted model, counted by PyTorch: frozen weights get no dW, and
    nothing below the lowest adapted layer (nor that layer's q/k/v input) is differentiated."""
    model = tiny_adapted_model(layers=adapter_layers)
    with torch.no_grad():
        for block in model.layers:
            if block.attention.adapter is not None:
                block.attention.adapter.gate.fill_(0.5)
    tokens = torch.randint(0, model.config.vocab_size, (1, 37))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(tokens)
        forward = counter.get_total_flops()
        logits.float().square().sum().backward()
    expected = sequence_flops(model.config, 37, adapter_layers=adapter_layers, prompt_len=3, include_attention=False)
    assert forward == expected.forward
    assert counter.get_total_flops() - forward == expected.backward


def test_weight_matmuls_match_the_flop_counter_with_heads_wider_than_the_model(toy_config):
    """Qwen3 and Gemma heads: n_heads · head_dim (4 · 16 = 64) differs from dim (32), in q, o and the prefix."""
    import dataclasses

    from fastadapter.adapters import AdapterConfig, add_adapter
    from fastadapter.model import LlamaModel
    config = dataclasses.replace(toy_config, explicit_head_dim=16)
    torch.manual_seed(0)
    model = add_adapter(LlamaModel(config), AdapterConfig(prompt_len=3, layers=2))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(torch.randint(0, config.vocab_size, (1, 37)))
        forward = counter.get_total_flops()
        logits.float().square().sum().backward()
    expected = sequence_flops(config, 37, adapter_layers=2, prompt_len=3, include_attention=False)
    assert forward == expected.forward
    assert counter.get_total_flops() - forward == expected.backward


def test_paper_setting_on_llama_7b():
    config = NAMED_CONFIGS["llama-7b"]
    flops = sequence_flops(config, 512, adapter_layers=30, prompt_len=10)
    weights = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 32000 * 4096  # 6.74e9 parameters in matmuls
    assert flops.forward == pytest.approx(2 * weights * 512, rel=0.08)  # + attention, ~6% at 512 tokens
    # Backward: activation gradients of 30 layers + head, attention at 2.5x: about as much as the forward.
    assert 0.85 < flops.backward / flops.forward < 1.0
    fewer = sequence_flops(config, 512, adapter_layers=8, prompt_len=10)
    assert fewer.forward == pytest.approx(flops.forward, rel=1e-2) and fewer.backward < 0.3 * flops.backward


def test_attention_is_quadratic_and_padding_costs():
    config = NAMED_CONFIGS["llama-7b"]
    def total(length, attention=True):
        return sequence_flops(config, length, adapter_layers=30, prompt_len=10, include_attention=attention).total

    # Weight matmuls grow linearly with the length (plus the per-sequence prompt projection, a constant) ...
    assert total(400, False) - total(100, False) == pytest.approx(3 * (total(200, False) - total(100, False)))
    # ... the attention core quadratically (the prefix part, L x P, linearly).
    attention = {n: total(n) - total(n, False) for n in (100, 400)}
    assert 12 < attention[400] / attention[100] < 16
    lengths = [100, 300, 50, 512]
    assert padded_lengths(lengths, pad_to=512) == [512] * 4
    assert padded_lengths(lengths, batch_size=3) == [300, 300, 300, 512]
    packed = epoch_flops(config, lengths, adapter_layers=30, prompt_len=10).total
    padded = epoch_flops(config, [512] * 4, adapter_layers=30, prompt_len=10).total
    assert padded / packed > 2048 / 962  # padding wastes tokens, and quadratic attention on long pads
    assert training_hours(312e12 * 3600, gpu="a100", gpus=1, mfu=1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown gpu 'v100'"):
        training_hours(1.0, gpu="v100", gpus=1, mfu=0.5)


def test_plan_command(capsys, shared_data):
    assert main(["plan", "--model", "llama-7b", "--data", str(shared_data / "alpaca_tiny.json"), "--gpu", "a100",
                 "--tokenizer", str(shared_data / "llama_tokenizer.model")]) == 0
    out = capsys.readouterr().out
    assert "1,229,760 trainable parameters" in out and "52,002 rows" in out
    assert "padded to 512 (paper)" in out and "packed (fastadapter)" in out
    assert main(["plan", "--model", str(shared_data / "stories260K.bin"), "--data",
                 str(shared_data / "alpaca_tiny.json"), "--gpu", "h100", "--gpus", "1"]) == 0
    assert "top 5 layers" in capsys.readouterr().out  # --adapter-layers 30 clamped to the model
    # A user error: exit status 2 and an error line (it was SystemExit with status 1).
    assert main(["plan", "--model", "llama-9b", "--data", str(shared_data / "alpaca_tiny.json"), "--gpu", "a100"]) == 2
    assert "fastadapter plan: error: --model 'llama-9b' is neither a named config" in capsys.readouterr().err


# -- memory per GPU (fastadapter plan --fsdp/--gpus/--quantize) ------------------------------------------------

def test_memory_plan_base_bytes_match_the_real_tensors(shared_data):
    """The plan's base bytes are the measured bytes of a real model: bf16 exactly, quantized within 2%."""
    pytest.importorskip("torchao")
    from fastadapter.loaders.checkpoints import load_model
    from fastadapter.model.quantize import base_weight_bytes, quantize_base, tensor_bytes
    from fastadapter.training.memory_plan import estimate_memory

    for scheme in (None, "int8", "int4"):
        model = load_model(str(shared_data / "stories260K.bin"), dtype=torch.bfloat16).requires_grad_(False)
        if scheme:
            quantize_base(model, scheme)
        measured = sum(tensor_bytes(p) for p in model.parameters())
        plan = estimate_memory(model.config, batch_tokens=64, adapter_layers=5, prompt_len=10, quantize=scheme)
        if scheme is None:
            assert plan.base == measured
        else:  # stories' small weights take fewer NF4 scales per double-quantization block than the plan's 256
            assert plan.base == pytest.approx(measured, rel=0.02), (scheme, base_weight_bytes(model))
    split = estimate_memory(NAMED_CONFIGS["llama-7b"], batch_tokens=4096, adapter_layers=30, prompt_len=10, gpus=8,
                            fsdp=True)
    whole = estimate_memory(NAMED_CONFIGS["llama-7b"], batch_tokens=4096, adapter_layers=30, prompt_len=10, gpus=8)
    assert split.base == pytest.approx(whole.base / 8) and whole.gathered == 0 and split.gathered > 0
    assert whole.base / 2**30 == pytest.approx(6.74e9 * 2 / 2**30, rel=0.01)  # 6.74B parameters in bf16
    assert split.adapter == whole.adapter == 16 * 1_229_760  # replicated: weight, grad, two AdamW moments
    with pytest.raises(ValueError, match="FSDP with a quantized base is not supported"):
        estimate_memory(NAMED_CONFIGS["llama-7b"], batch_tokens=1, adapter_layers=1, prompt_len=1, fsdp=True,
                        quantize="int4")


def test_memory_plan_activations_match_the_saved_tensors(make_config):
    """The activations the plan counts per token and adapted layer against the bytes autograd really saves for
    backward in a bf16 model (measured with saved_tensors_hooks, storages counted once), within 25%."""
    from fastadapter.adapters.adapter import AdapterConfig, add_adapter
    from fastadapter.model.llama import LlamaModel
    from fastadapter.model.rope import rope_angles, rope_inverse_frequencies
    from fastadapter.training.memory_plan import estimate_memory

    config = make_config(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=352,
                         max_seq_len=512)
    torch.manual_seed(0)
    model = add_adapter(LlamaModel(config).to(torch.bfloat16), AdapterConfig(prompt_len=4, layers=2))
    tokens = torch.randint(0, 64, (1, 256))
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = model.tok_embeddings(tokens)
        h.requires_grad_(False)
        freqs = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        cos, sin = rope_angles(torch.arange(256)[None], freqs)
        for block in model.layers:
            h = block(h, cos, sin)
    measured = sum(storages.values())
    plan = estimate_memory(config, batch_tokens=256, adapter_layers=2, prompt_len=4)
    assert plan.activations == pytest.approx(measured, rel=0.25), (plan.activations, measured)


def test_plan_prints_memory_per_gpu_and_the_cards_that_fit(capsys, shared_data):
    args = ["plan", "--model", "llama-7b", "--data", str(shared_data / "alpaca_tiny.json"), "--gpu", "a100",
            "--tokenizer", str(shared_data / "llama_tokenizer.model")]
    assert main(args + ["--gpus", "1", "--batch-tokens", "1024"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("llama-7b", "llama-13b", "llama-65b", "llama2-70b")}
    assert sorted(rows) == ["llama-13b", "llama-65b", "llama-7b", "llama2-70b"]
    assert rows["llama-7b"].endswith("24 GB, 40 GB, 80 GB") and rows["llama-65b"].endswith("none of 24, 40, 80 GB")
    assert main(args + ["--gpus", "8", "--fsdp", "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "sharded by FSDP over 8 GPUs" in out
    line = next(l for l in out.splitlines() if l.startswith("llama-65b"))
    assert line.endswith("40 GB, 80 GB")  # 65B fits on 40 GB cards once sharded 8 ways
    assert main(args + ["--fsdp", "--quantize", "int4"]) == 2
    assert "--fsdp and --quantize int4 cannot be combined" in capsys.readouterr().err
