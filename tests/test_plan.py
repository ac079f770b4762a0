"""The FLOP model of ``fastadapter plan`` (checked against PyTorch's FLOP counter on a real backward) and the
command's output."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastadapter.cli import main
from fastadapter.training.flops import (NAMED_CONFIGS, epoch_flops, padded_lengths, sequence_flops,
                                        training_hours)
from test_training_loop import TINY, tiny_adapted_model


@pytest.mark.parametrize("adapter_layers", [1, 2, 4])
def test_weight_matmuls_match_the_flop_counter(adapter_layers):
    """Forward and backward of the real adapted model, counted by PyTorch: frozen weights get no dW, and
    nothing below the lowest adapted layer (nor that layer's q/k/v input) is differentiated."""
    model = tiny_adapted_model(layers=adapter_layers)
    with torch.no_grad():
        for block in model.layers:
            if block.attention.adapter is not None:
                block.attention.adapter.gate.fill_(0.5)
    tokens = torch.randint(0, TINY.vocab_size, (1, 37))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(tokens)
        forward = counter.get_total_flops()
        logits.float().square().sum().backward()
    expected = sequence_flops(TINY, 37, adapter_layers=adapter_layers, prompt_len=3, include_attention=False)
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
