"""Quantized frozen bases (torchao, weight-only): the bytes they take, that zero gates still give the quantized
base, that a quantized model computes what its dequantized weights do, that it trains on real Alpaca rows, and
that the Hugging Face integration casts the prompt to the compute dtype (never to a weight's storage dtype)."""
import json

import pytest
import torch
from torch import nn

from fastadapter.cli import flag_of
from fastadapter.cli import main as cli_main
from fastadapter.adapters.adapter import AdapterConfig, adapted_layers, add_adapter
from fastadapter.loaders.checkpoints import load_model
from fastadapter.model.llama import LlamaModel
from fastadapter.model.quantize import (base_projections, base_weight_bytes, dequantized_copy, is_quantized,
                                        quantize_base, tensor_bytes)
from fastadapter.setting_error import SettingError
from training_runs import read_metrics, stories_train_args

pytest.importorskip("torchao")


def _stories(shared_data, dtype=torch.float32, scheme=None, gate=None):
    """stories260K with an fp32 adapter on its top 3 layers (seeded), quantized by ``scheme``, gates at
    ``gate``."""
    model = load_model(shared_data / "stories260K.bin", dtype=dtype)
    torch.manual_seed(0)
    add_adapter(model, AdapterConfig(prompt_len=4, layers=3))
    if scheme:
        quantize_base(model, scheme)
    if gate is not None:
        with torch.no_grad():
            for adapter in adapted_layers(model).values():
                adapter.gate.fill_(gate)
    return model


def _tokens(n=19, seed=1):
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme, low, high", [("int8", 0.5, 0.56), ("int4", 0.25, 0.29)])
def test_base_weights_take_a_half_and_a_quarter_of_bf16(shared_data, scheme, low, high):
    """Measured from the quantized tensors' codes, scales and zero points. stories260K's rows are 64 or 172
    values long, so int8's fp32 scale + int8 zero point per row add 5 bytes to 64-172 (at LLaMA-7B's 4096 the
    ratio is 0.5006); NF4 adds an int8 scale per 64 values and the double quantization's factors."""
    model = _stories(shared_data, torch.bfloat16)
    bf16 = base_weight_bytes(model)
    assert bf16 == 2 * sum(m.weight.numel() for _, m in base_projections(model))
    quantize_base(model, scheme)
    assert all(is_quantized(m.weight) for _, m in base_projections(model))
    ratio = base_weight_bytes(model) / bf16
    assert low <= ratio <= high, ratio
    # Only the projections: the embedding and norms keep their bf16 bytes, the adapter its fp32.
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and not is_quantized(model.tok_embeddings.weight)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert tensor_bytes(model.norm.weight) == 2 * model.norm.weight.numel()


@pytest.mark.parametrize("scheme, dtype", [("int8", torch.float32), ("int4", torch.bfloat16)])
def test_zero_gates_reproduce_the_quantized_base(shared_data, scheme, dtype):
    base = load_model(shared_data / "stories260K.bin", dtype=dtype).requires_grad_(False)
    quantize_base(base, scheme)
    expected = base(_tokens())
    model = _stories(shared_data, dtype, scheme)
    torch.testing.assert_close(model(_tokens()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", pytest.param("int4", marks=pytest.mark.slow)])  # NF4 is slow on CPU
def test_quantized_model_computes_its_dequantized_weights(shared_data, scheme):
    """With open gates: logits and the adapter's gradients equal those of the plain model holding the
    dequantized weights (the reference), so only the base's weights changed, not the attention or adapter math."""
    model = _stories(shared_data, scheme=scheme, gate=0.5)
    reference = dequantized_copy(model)
    assert not any(is_quantized(m.weight) for _, m in base_projections(reference))
    results = []
    for m in (model, reference):
        logits = m(_tokens())
        logits.square().mean().backward()
        results.append((logits, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-5)
    # ... and the quantization did change the weights (the test would not notice a no-op otherwise).
    plain = load_model(shared_data / "stories260K.bin")
    assert not torch.equal(plain.layers[0].attention.wq.weight, reference.layers[0].attention.wq.weight)


@pytest.mark.slow  # 8 steps of stories260K through torchao's Python dispatch: minutes on a busy 2-core machine
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_base_trains_on_alpaca_rows(tmp_path, shared_data, scheme):
    """``fastadapter train --quantize``: the eval loss on held-out real Alpaca rows falls."""
    out = tmp_path / scheme
    args = stories_train_args(shared_data, shared_data / "alpaca_tiny.json", out, "--quantize", scheme,
                              "--max-steps", "8", "--max-seq-len", "256", "--batch-tokens", "512",
                              "--eval-every", "0", "--lr", "2e-2", "--warmup", "1", "--save-every", "0")
    assert cli_main(args) == 0
    evals = [m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.05, evals
    with open(out / "metrics.jsonl") as f:
        assert all(json.loads(line)["step"] >= 0 for line in f)


def test_quantize_refuses_bad_input(shared_data, make_config):
    with pytest.raises(ValueError, match="unknown quantization 'int3'; expected one of int8, int4"):
        quantize_base(_stories(shared_data), "int3")
    trainable = load_model(shared_data / "stories260K.bin")
    with pytest.raises(ValueError, match=r"layers.0.attention.wq.weight requires a gradient"):
        quantize_base(trainable, "int8")
    odd = add_adapter(LlamaModel(make_config(dim=80, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=97,
                                                  max_seq_len=32)), AdapterConfig(prompt_len=2, layers=1))
    with pytest.raises(SettingError, match=r"layers.0.feed_forward.w1.weight \[97, 80\] has 7760 values, not a "
                                           r"multiple of 64; use quantize int8") as caught:
        quantize_base(odd, "int4")
    assert caught.value.render(flag_of).endswith("use --quantize int8 for this model")  # the CLI's words
    quantize_base(odd, "int8")  # per-row int8 takes any shape
    with pytest.raises(ValueError, match="already quantized"):
        quantize_base(odd, "int8")


# -- the Hugging Face integration ------------------------------------------------------------------------------

class UInt8StorageLinear(nn.Linear):
    """A stand-in for bitsandbytes' ``Linear8bitLt``/``Linear4bit`` (CUDA only): an ``nn.Linear`` whose ``weight``
    is stored as ``uint8`` codes with a per-row scale, dequantized to the input's dtype in forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach()
        self.scale = w.abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter((torch.round(w / self.scale) + 128).to(torch.uint8), requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype):
        return ((self.weight.to(torch.float32) - 128) * self.scale).to(dtype)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _hf_pair(convert):
    """A tiny HF Llama whose attention projections went through ``convert``, and the same model with plain
    linears holding the values ``convert`` computes with (the reference)."""
    from hf_models import tiny_model

    model, reference = tiny_model("llama"), tiny_model("llama")
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            converted = convert(getattr(layer.self_attn, name))
            setattr(layer.self_attn, name, converted)
            plain = getattr(ref_layer.self_attn, name)
            with torch.no_grad():
                plain.weight.copy_(converted.dequantized(torch.float32))
    return model, reference


def test_hf_prompt_is_cast_to_the_compute_dtype_not_the_weight_storage_dtype():
    """k_proj.weight.dtype is uint8 here, as for bitsandbytes weights: casting the prompt to it (the old code)
    truncates the prompt to integers 0..255 and the prefix is wrong."""
    from fastadapter.integrations.transformers import adapted_layers as hf_adapted, apply_adapter
    from hf_models import random_tokens

    model, reference = _hf_pair(UInt8StorageLinear)
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.uint8
    outputs = []
    for m in (model, reference):
        torch.manual_seed(3)
        apply_adapter(m, prompt_len=5, layers=2)
        with torch.no_grad():
            for attn in hf_adapted(m).values():
                attn.adapter.gate.fill_(0.7)
        logits = m(random_tokens()).logits
        logits.square().mean().backward()
        outputs.append((logits, [attn.adapter.prompt.grad for attn in hf_adapted(m).values()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-4)
    for got, expected in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_hf_model_quantized_by_torchao_keeps_working():
    """A Hugging Face model whose decoder linears torchao quantized (int8 weight-only): zero gates give the
    quantized model's logits, and the adapter trains through the quantized projections."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from fastadapter.integrations.transformers import adapted_layers as hf_adapted, apply_adapter
    from hf_models import random_tokens, tiny_model

    model = tiny_model("llama")
    quantize_(model.model.layers, Int8WeightOnlyConfig(set_inductor_config=False))
    assert is_quantized(model.model.layers[0].self_attn.k_proj.weight)
    expected = model(random_tokens()).logits
    apply_adapter(model, prompt_len=5, layers=2)
    # The fused op in place of SDPA: the same attention, summed in another order.
    torch.testing.assert_close(model(random_tokens()).logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for attn in hf_adapted(model).values():
            attn.adapter.gate.fill_(0.7)
    model(random_tokens()).logits.square().mean().backward()
    grads = [attn.adapter.prompt.grad for attn in hf_adapted(model).values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
