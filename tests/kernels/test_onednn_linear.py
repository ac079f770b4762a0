"""``onednn_linear``: fp32 products against frozen weights through oneDNN, against ``F.linear`` (values and the
gradient of the input), the calls it must leave to ``F.linear``, and the thin model's training step on both."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastadapter.onednn_linear as onednn_module
from fastadapter.linear import Linear, linear
from fastadapter.onednn_linear import onednn_available, onednn_linear, runs_onednn

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def _route_on(monkeypatch):
    """The route on, whatever this CPU's default (off on Intel CPUs: test_default_follows_the_cpu)."""
    monkeypatch.setattr(onednn_module, "ENABLED", True)


def test_default_follows_the_cpu(monkeypatch):
    """On by default unless MKL is native (Intel); 0 and 1 force it; anything else says what it accepts."""
    with open("/proc/cpuinfo") as cpuinfo:
        intel = "GenuineIntel" in cpuinfo.read()
    assert onednn_module.mkl_is_native() is intel
    for native in (True, False):
        monkeypatch.setattr(onednn_module, "mkl_is_native", lambda native=native: native)
        assert onednn_module._enabled("") is (not native) and onednn_module._enabled("auto") is (not native)
        assert onednn_module._enabled("1") and not onednn_module._enabled("0")
    with pytest.raises(ValueError, match=r"FASTADAPTER_ONEDNN_LINEAR='yes': set it to 1 \(oneDNN\), 0"):
        onednn_module._enabled("yes")

#: (rows, in features, out features): odd sizes, a head-dim-80 width, tails of every blocking.
SHAPES = [(97, 80, 33), (1025, 97, 7), (64, 1025, 80), (130, 576, 192)]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}")
def test_values_and_input_gradient_equal_f_linear(shape, bias):
    rows, k, n = shape
    weight = torch.randn(n, k) / k ** 0.5
    b = torch.randn(n) if bias else None
    x = torch.randn(1, rows, k, requires_grad=True)
    assert runs_onednn(x, weight, b)
    out = onednn_linear(x, weight, b)
    expected = F.linear(x, weight, b)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calls_it_leaves_to_f_linear(monkeypatch):
    weight = torch.randn(16, 24)
    x = torch.randn(80, 24)
    assert runs_onednn(x, weight)
    assert not runs_onednn(torch.randn(8, 24), weight)  # a few rows: the decode kernel's or F.linear's
    assert not runs_onednn(x.bfloat16(), weight.bfloat16())  # F.linear already takes bf16 to oneDNN
    assert not runs_onednn(x.double(), weight.double())
    assert not runs_onednn(x, torch.nn.Parameter(weight))  # a trainable weight needs its own gradient
    assert not runs_onednn(x, weight, torch.nn.Parameter(torch.zeros(16)))  # a trainable bias
    with torch.no_grad():  # ... unless no gradient is recorded (a prefill of a model that was never frozen)
        assert runs_onednn(x, torch.nn.Parameter(weight), torch.nn.Parameter(torch.zeros(16)))
    assert not runs_onednn(x, weight.t().contiguous().t())  # a transposed view
    assert not runs_onednn(x.to("meta"), weight.to("meta"))
    monkeypatch.setattr(onednn_module, "ENABLED", False)
    assert not runs_onednn(x, weight)
    torch.testing.assert_close(onednn_linear(x, weight), F.linear(x, weight))


def test_a_trainable_weight_still_gets_its_gradient():
    layer = Linear(24, 16)
    x = torch.randn(2, 50, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None and x.grad is not None


def test_module_compiles_with_fullgraph():
    layer = Linear(24, 10).requires_grad_(False)
    x = torch.randn(70, 24)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias),
                               rtol=1e-5, atol=1e-5)


def test_thin_model_training_step_is_the_same_through_onednn_and_f_linear(monkeypatch, make_config):
    """A packed training step of an adapted thin model (frozen base): the loss and every adapter gradient agree
    with the F.linear route, and the oneDNN route really ran (its op was called)."""
    from fastadapter import AdapterConfig, add_adapter
    from fastadapter.model.llama import LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(make_config(dim=80, n_heads=2, n_kv_heads=1, hidden_dim=208, vocab_size=97))
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2))
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.adapter is not None:
                layer.attention.adapter.gate.fill_(0.3)
    tokens = torch.randint(0, 97, (1, 97))
    cu = torch.tensor([0, 40, 97], dtype=torch.int32)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens, cu_seqlens=cu, max_seqlen=57)
        loss = F.cross_entropy(logits[0].float(), tokens[0].roll(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    real = onednn_module._product
    monkeypatch.setattr(onednn_module, "_product", lambda *a: calls.append(a[0].shape) or real(*a))
    loss, grads = step()
    assert calls, "the oneDNN route did not run"
    monkeypatch.setattr(onednn_module, "ENABLED", False)
    calls.clear()
    plain_loss, plain_grads = step()
    assert not calls
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
