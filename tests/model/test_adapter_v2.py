"""LLaMA-Adapter V2: zero-init (the adapted model starts as the base), bias and scale as the paper's formula,
trainable norms, the trainable-parameter count of LLaMA-7B against the paper's arithmetic, file round trip."""
import pytest
import torch

from fastadapter.adapters.adapter import AdapterConfig, add_adapter
from fastadapter.adapters.adapter_file import AdapterFileError
from fastadapter.adapters.adapter_v2 import (BiasScaleLinear, add_adapter_v2, is_v2_file, load_adapter_v2,
                                          save_adapter_v2)
from fastadapter.model.config import LLAMA_7B
from fastadapter.model.llama import LlamaModel


@pytest.fixture
def make_model(make_config):
    """``make_model(seed=0)``: the tiny LLaMA on 3 layers with random ``wq``/``wk``/``wv`` biases, in eval mode
    (the same weights for the same seed)."""
    config = make_config(n_layers=3, qkv_bias=True)

    def build(seed=0):
        torch.manual_seed(seed)
        model = LlamaModel(config).eval()
        with torch.no_grad():
            for block in model.layers:
                for linear in (block.attention.wq, block.attention.wk, block.attention.wv):
                    linear.bias.normal_()
        return model

    return build


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def test_v2_starts_as_the_base_model_and_trains_bias_scale_norms(make_model):
    base = make_model()
    tokens = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        expected = base(tokens)
    model = add_adapter_v2(make_model(), AdapterConfig(prompt_len=5, layers=2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.feed_forward.w2.v2_scale" in trainable and "layers.2.ffn_norm.weight" in trainable
    assert "norm.weight" in trainable and "layers.2.attention.adapter.gate" in trainable
    assert not any(name.endswith((".wq.weight", ".wq.bias", "tok_embeddings.weight")) for name in trainable)
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if p.requires_grad)
    # Gradients reach every V2 parameter, the lowest block's included (bias tuning is in every layer).
    _perturb(model)
    model(tokens).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_bias_scale_linear_is_the_papers_formula():
    linear = torch.nn.Linear(80, 40, bias=True)
    wrapped = BiasScaleLinear(linear)
    with torch.no_grad():
        wrapped.v2_bias.normal_()
        wrapped.v2_scale.normal_()
    x = torch.randn(3, 7, 80)
    expected = wrapped.v2_scale * (x @ linear.weight.t() + linear.bias + wrapped.v2_bias)
    torch.testing.assert_close(wrapped(x), expected)
    torch.testing.assert_close(wrapped.reference(x), expected)


def test_llama7b_trainable_parameters_match_the_papers_arithmetic():
    with torch.device("meta"):
        model = add_adapter_v2(LlamaModel(LLAMA_7B), AdapterConfig(prompt_len=10, layers=30))
    counts = {"v1": 0, "bias_scale": 0, "norms": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "v1" if ".adapter." in name else "bias_scale" if ".v2_" in name else "norms"
            counts[kind] += p.numel()
    d, h, layers = 4096, 11008, 32
    assert counts["v1"] == 10 * 30 * d + 30 * 32 == 1_229_760
    assert counts["bias_scale"] == 2 * (4 * d + 2 * h + d) * layers == 2_719_744
    assert counts["norms"] == (2 * layers + 1) * d == 266_240
    total_weights = sum(p.numel() for name, p in model.named_parameters() if not p.requires_grad)
    total_weights += counts["norms"]
    # The paper: bias and scale tuning adds about 0.04 % of LLaMA-7B's parameters.
    assert round(100 * counts["bias_scale"] / total_weights, 2) == 0.04
    assert sum(counts.values()) == 4_215_744


def test_v2_file_round_trip_and_errors(tmp_path, make_model):
    model = add_adapter_v2(make_model(), AdapterConfig(prompt_len=5, layers=[0, 2], gate_per_head=False))
    _perturb(model)
    path = tmp_path / "v2.safetensors"
    save_adapter_v2(model, path)
    assert is_v2_file(path)
    loaded = load_adapter_v2(make_model(), path)
    tokens = torch.randint(0, 97, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    with pytest.raises(AdapterFileError, match="made for another base model of the same shape"):
        load_adapter_v2(make_model(seed=1), path)
    v1 = tmp_path / "v1.safetensors"
    from fastadapter.adapters.adapter import save_adapter
    save_adapter(add_adapter(make_model(), AdapterConfig(prompt_len=5, layers=1)), v1)
    assert not is_v2_file(v1)
    with pytest.raises(AdapterFileError, match="not a LLaMA-Adapter V2 file"):
        load_adapter_v2(make_model(), v1)
