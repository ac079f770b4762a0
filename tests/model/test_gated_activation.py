"""``gated_activation``: the gated MLP's ``act(gate) · up`` saving only its inputs, against autograd's composition
(values and both gradients, fp32 and bf16, odd sizes), what it saves, and the bad activation name. Its fp32 CPU
calls on the compiled row kernel are tests/model/test_row_kernels.py's; here the row kernels are off, so torch's own
derivatives must equal autograd's to the last bit."""
from __future__ import annotations

import pytest
import torch

from fastadapter.model import row_kernels
from fastadapter.model.gated_activation import gated_activation, gated_activation_reference


@pytest.fixture(autouse=True)
def _eager_rows(monkeypatch):
    monkeypatch.setattr(row_kernels, "ENABLED", False)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(97, 80), (2, 1025, 33), (1, 7)], ids=str)
def test_values_and_both_gradients_equal_autograd(shape, dtype, activation):
    gate = torch.randn(shape, dtype=dtype, requires_grad=True)
    up = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = gated_activation(gate, up, activation)
    expected = gated_activation_reference(gate, up, activation)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate, up), grad)
    want = torch.autograd.grad(expected, (gate, up), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_only_one_input_needs_a_gradient():
    gate, up = torch.randn(5, 9), torch.randn(5, 9, requires_grad=True)
    (grad_up,) = torch.autograd.grad(gated_activation(gate, up).sum(), up)
    torch.testing.assert_close(grad_up, torch.nn.functional.silu(gate))


def test_saves_its_two_inputs_only():
    gate = torch.randn(64, 48, requires_grad=True)
    up = torch.randn(64, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_activation(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_activation_reference(gate, up)
    assert len(saved) == 3  # autograd's composition keeps act(gate) as well


def test_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of .*'relu'"):
        gated_activation(torch.randn(2, 3), torch.randn(2, 3), "relu")
