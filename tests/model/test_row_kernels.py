"""The compiled row kernels of a training step (csrc/training_rows.h, fastadapter/model/row_kernels.py) against their
eager references, on every kernel variant this CPU runs: RMSNorm and Gemma's plus-one RMSNorm, the residual addition
fused before a norm (values and the gradients of both inputs), the gated activation (SiLU, tanh-GELU), the token
cross-entropy of a chunk of logits; which calls take them, and what the ops refuse."""
from __future__ import annotations

import pytest
import torch

from fastadapter import _cpu_extension
from fastadapter.model import row_kernels
from fastadapter.model.gated_activation import gated_activation, gated_activation_reference
from fastadapter.model.norms import PlusOneRMSNorm, RMSNorm, add_and_normalize, rms_normalize
from fastadapter.training.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

pytestmark = pytest.mark.skipif(_cpu_extension.unavailable_reason() is not None,
                                reason="fastadapter._C is not built")

#: Odd widths: tails under one vector (7, 33), SmolLM2's 576, a width over a vector multiple (1025).
SHAPES = [(97, 80), (2, 33, 7), (5, 1025), (3, 576)]


def _norm(kind: str, width: int) -> torch.nn.Module:
    norm = (RMSNorm if kind == "llama" else PlusOneRMSNorm)(width, 1e-5)
    norm.weight.data.normal_()
    norm.weight.requires_grad_(False)
    return norm


def _norm_reference(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eager composition in float64 (the kernels round differently from eager fp32, never worse)."""
    scale = norm.weight.double() if isinstance(norm, RMSNorm) else 1.0 + norm.weight.double()
    return rms_normalize(x.double(), norm.eps) * scale


def _close(got: torch.Tensor, want64: torch.Tensor, eager32: torch.Tensor) -> None:
    """``got`` is as close to the float64 ``want64`` as the eager fp32 result ``eager32`` is, up to 4x and 1e-6."""
    got, want64, eager32 = got.detach(), want64.detach(), eager32.detach()
    eager_error = float((eager32.double() - want64).abs().max()) if want64.numel() else 0.0
    error = float((got.double() - want64).abs().max()) if want64.numel() else 0.0
    assert error <= 4 * eager_error + 1e-6 * max(1.0, float(want64.abs().max()) if want64.numel() else 1.0), \
        (error, eager_error)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_values_and_gradient(kind, shape, cpu_variant):
    norm = _norm(kind, shape[-1])
    x = torch.randn(shape, requires_grad=True)
    y = norm(x)
    assert type(y.grad_fn).__name__ == "_RMSNormBackward"
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_()
    want = _norm_reference(norm, x64)
    (want_grad,) = torch.autograd.grad(want, x64, grad.double())
    with row_kernels_off():
        eager = norm(x)
        (eager_grad,) = torch.autograd.grad(eager, x, grad)
    _close(y, want, eager)
    _close(got, want_grad, eager_grad)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("needs", ["both", "x", "residual"])
def test_add_and_normalize_values_and_the_gradients_of_both_inputs(kind, shape, needs, cpu_variant):
    """Both outputs used downstream (the residual stream goes on, the norm feeds the MLP): the sum's two gradients
    meet inside the kernel's backward."""
    norm = _norm(kind, shape[-1])
    x = torch.randn(shape, requires_grad=needs in ("both", "x"))
    residual = torch.randn(shape, requires_grad=needs in ("both", "residual"))
    total, y = add_and_normalize(x, residual, norm)
    assert type(y.grad_fn).__name__ == "_AddRMSNormBackward"
    grad_total, grad_y = torch.randn_like(total), torch.randn_like(y)
    inputs = [t for t in (x, residual) if t.requires_grad]
    got = torch.autograd.grad((total, y), inputs, (grad_total, grad_y))
    x64, r64 = x.detach().double().requires_grad_(), residual.detach().double().requires_grad_()
    want_total = x64 + r64
    want_y = _norm_reference(norm, want_total)
    want = torch.autograd.grad((want_total, want_y), (x64, r64), (grad_total.double(), grad_y.double()))
    want = [w for w, t in zip(want, (x, residual)) if t.requires_grad]
    with row_kernels_off():
        eager_total, eager_y = add_and_normalize(x, residual, norm)
        eager = torch.autograd.grad((eager_total, eager_y), inputs, (grad_total, grad_y))
    torch.testing.assert_close(total, x + residual, rtol=0, atol=0)
    _close(y, want_y, eager_y)
    for g, w, e in zip(got, want, eager):
        _close(g, w, e)


def test_add_and_normalize_with_only_one_output_used():
    """Only the norm feeds on (the sum's gradient is None), or only the sum (the norm's is None)."""
    norm = _norm("llama", 80)
    x, residual = torch.randn(9, 80, requires_grad=True), torch.randn(9, 80, requires_grad=True)
    for pick in (0, 1):
        out = add_and_normalize(x, residual, norm)[pick]
        got = torch.autograd.grad(out.square().sum(), (x, residual))
        with row_kernels_off():
            want = torch.autograd.grad(add_and_normalize(x, residual, norm)[pick].square().sum(), (x, residual))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_activation_values_and_both_gradients(activation, shape, cpu_variant):
    gate = (4 * torch.randn(shape)).requires_grad_()  # reaches both saturations of the activations
    up = torch.randn(shape, requires_grad=True)
    out = gated_activation(gate, up, activation)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate, up), grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    want_out = gated_activation_reference(g64, u64, activation)
    want = torch.autograd.grad(want_out, (g64, u64), grad.double())
    eager_out = gated_activation_reference(gate, up, activation)
    eager = torch.autograd.grad(eager_out, (gate, up), grad)
    _close(out, want_out, eager_out)
    for g, w, e in zip(got, want, eager):
        _close(g, w, e)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_activation_at_extreme_gates(activation):
    """±inf-bound gates saturate cleanly (no NaN from the exponential)."""
    gate = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4] * 2, requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    out = gated_activation(gate, up, activation)
    grad_gate, grad_up = torch.autograd.grad(out.sum(), (gate, up))
    want = gated_activation_reference(gate.detach().double(), up.detach().double(), activation)
    assert torch.isfinite(out).all() and torch.isfinite(grad_gate).all() and torch.isfinite(grad_up).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab", [1025, 97, 7])
def test_cross_entropy_rows_loss_and_gradient(vocab, cpu_variant):
    logits = 3 * torch.randn(41, vocab)
    target = torch.randint(0, vocab, (41,))
    target[::5] = -100
    grad = logits.clone()
    loss = row_kernels.cross_entropy_rows_(grad, target, -100)
    x = logits.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(x, target, ignore_index=-100, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert (loss[::5] == 0).all() and (grad[::5] == 0).all()


@pytest.mark.parametrize("position", [0, 16, 1024], ids=["first", "second vector", "last"])
def test_a_nan_logit_spoils_its_row_only(position, cpu_variant):
    """The row's max leaves a NaN to the exps on AVX-512 (csrc/attention_cpu.h, row_max): the row's loss and its
    whole gradient are still NaN, wherever in the row the NaN sits, and the other rows are untouched."""
    logits = 3 * torch.randn(4, 1025)
    logits[1, position] = float("nan")
    target = torch.tensor([3, 5, 7, 9])
    grad = logits.clone()
    loss = row_kernels.cross_entropy_rows_(grad, target, -100)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    clean = torch.tensor([0, 2, 3])
    want = torch.nn.functional.cross_entropy(logits[clean].double(), target[clean], reduction="none")
    torch.testing.assert_close(loss[clean].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad[clean]).all()


@pytest.mark.parametrize("tokens, chunk", [(97, 32), (300, 128), (5, 8)])
def test_linear_cross_entropy_on_the_row_kernel_equals_the_reference(tokens, chunk):
    hidden = torch.randn(tokens, 80, requires_grad=True)
    weight = (0.3 * torch.randn(1025, 80)).requires_grad_()
    labels = torch.randint(0, 1025, (tokens,))
    labels[1::3] = -100
    got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    want = linear_cross_entropy_reference(hidden, weight, labels)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_which_calls_take_the_row_kernels():
    x = torch.randn(4, 80, requires_grad=True)
    assert row_kernels.runs_row_kernels(x) and row_kernels.runs_row_kernels(x.detach())
    assert not row_kernels.runs_row_kernels(x.double())
    assert not row_kernels.runs_row_kernels(x.bfloat16())
    with row_kernels_off():
        assert not row_kernels.runs_row_kernels(x)
    assert type(_norm("llama", 80)(x).grad_fn).__name__ == "_RMSNormBackward"


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("fused", [False, True], ids=["norm", "add_and_normalize"])
def test_a_trained_norm_weight_gets_its_gradient(kind, fused):
    """LLaMA-Adapter V2 trains the norms: the scale's gradient, through the kernels, equals autograd's."""
    norm = _norm(kind, 33)
    norm.weight.requires_grad_(True)
    x, residual = torch.randn(2, 19, 33, requires_grad=True), torch.randn(2, 19, 33)
    grads = []
    for on in (True, False):
        row_kernels.ENABLED = on
        try:
            y = add_and_normalize(x, residual, norm)[1] if fused else norm(x)
            assert (type(y.grad_fn).__name__ in ("_RMSNormBackward", "_AddRMSNormBackward")) == on
            grads.append(torch.autograd.grad(y.sin().sum(), (x, norm.weight)))
        finally:
            row_kernels.ENABLED = True
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inference_computes_what_training_computes():
    """The same kernels with and without a gradient recorded: an adapter at zero gates reproduces its base
    to the last bit whether or not the call trains."""
    norm = _norm("gemma", 80)
    x, residual = torch.randn(7, 80, requires_grad=True), torch.randn(7, 80)
    gate, up = torch.randn(7, 80, requires_grad=True), torch.randn(7, 80)
    trained = (norm(x), *add_and_normalize(x, residual, norm), gated_activation(gate, up, "gelu_tanh"))
    with torch.no_grad():
        inferred = (norm(x), *add_and_normalize(x, residual, norm), gated_activation(gate, up, "gelu_tanh"))
    for a, b in zip(trained, inferred):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.fastadapter_cpu.rms_norm_forward(torch.randn(3, 4), torch.randn(5), 1e-5),
     r"needs x \[N, D\] and weight \[D\], got x \[3, 4\] and weight \[5\]"),
    (lambda: torch.ops.fastadapter_cpu.rms_norm_forward(torch.randn(3, 4).double(), torch.randn(4), 1e-5),
     "takes float32 x and weight, got Double"),
    (lambda: torch.ops.fastadapter_cpu.rms_norm_forward(torch.randn(3, 4), torch.randn(4), -1.0),
     "needs a finite eps >= 0, got -1"),
    (lambda: torch.ops.fastadapter_cpu.add_rms_norm_forward(torch.randn(3, 4), torch.randn(3, 5), torch.randn(4),
                                                            1e-5),
     r"needs residual as a contiguous float32 CPU tensor of shape \[3, 4\], got Float \[3, 5\]"),
    (lambda: torch.ops.fastadapter_cpu.gated_activation_forward(torch.randn(3, 4), torch.randn(4, 3), False),
     r"needs up as a contiguous float32 CPU tensor of shape \[3, 4\]"),
    (lambda: torch.ops.fastadapter_cpu.cross_entropy_rows_(torch.randn(3, 4), torch.tensor([0, 4, 1]), -100),
     r"target 4 of row 1 is outside \[0, 4\) and is not the ignore index -100"),
], ids=["norm-width", "norm-dtype", "norm-eps", "residual-shape", "gated-shape", "ce-target"])
def test_ops_say_what_was_expected(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_empty_inputs():
    y, rstd = torch.ops.fastadapter_cpu.rms_norm_forward(torch.randn(0, 8), torch.randn(8), 1e-5)
    assert y.shape == (0, 8) and rstd.shape == (0,)
    assert torch.ops.fastadapter_cpu.cross_entropy_rows_(torch.randn(0, 8), torch.zeros(0, dtype=torch.long),
                                                          -100).shape == (0,)


class row_kernels_off:
    """Within the block every call takes the eager composition (the reference)."""

    def __enter__(self):
        self.before, row_kernels.ENABLED = row_kernels.ENABLED, False

    def __exit__(self, *exc):
        row_kernels.ENABLED = self.before
