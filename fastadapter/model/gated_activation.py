"""``gated_activation``: ``act(gate) · up`` of a gated MLP (SwiGLU, GeGLU) that keeps only its two inputs for backward.

Autograd's own ``F.silu(gate) * up`` saves three ``[tokens, hidden]`` tensors for backward: ``gate`` (for the
activation's derivative), ``act(gate)`` and ``up`` (for the product's). The activation is one cheap elementwise
pass, so :class:`_GatedActivation` saves ``gate`` and ``up`` alone and recomputes ``act(gate)`` in backward: a
third less of the MLP's saved activations (SmolLM2-135M: 108 of 324 MB of a 659-token step), for one more pass over
``gate`` in backward. For fp32 CPU tensors forward and backward are each one pass of a compiled kernel
(:mod:`fastadapter.model.row_kernels`; equal to autograd's up to the rounding of the activation's exponential);
otherwise the derivatives are torch's own (``silu_backward``, ``gelu_backward``), equal to autograd's to the last
bit. :func:`gated_activation_reference` is the plain autograd composition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import row_kernels
from .config import MLP_ACTIVATIONS


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(x) if activation == "silu" else F.gelu(x, approximate="tanh")


def _activation_backward(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: str, compiled: bool) -> torch.Tensor:
        ctx.activation, ctx.compiled = activation, compiled
        ctx.save_for_backward(gate, up)
        if ctx.compiled:
            return row_kernels.gated_activation_forward(gate, up, activation)
        return _activate(gate, activation) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if ctx.compiled:
            grad_gate, grad_up = row_kernels.gated_activation_backward(grad, gate, up, ctx.activation)
            return grad_gate, grad_up, None, None
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = _activation_backward(grad * up, gate, ctx.activation)
        if ctx.needs_input_grad[1]:
            grad_up = grad * _activate(gate, ctx.activation)
        return grad_gate, grad_up, None, None


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) · up`` by plain autograd (the reference of :func:`gated_activation`)."""
    return _activate(gate, activation) * up


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) · up`` for ``gate``, ``up`` of one shape ``[..., hidden]`` (→ the same shape and dtype), saving
    only ``gate`` and ``up`` for backward. ``activation``: one of :data:`~fastadapter.model.config.MLP_ACTIVATIONS`.
    fp32 CPU tensors take the compiled row kernel, with or without a gradient recorded; under ``torch.compile`` it
    is the plain composition (inductor fuses it)."""
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}, got {activation!r}")
    # The compiled kernel (one pass each way) for fp32 CPU tensors of one layout; else torch's own ops.
    compiled = (row_kernels.runs_row_kernels(gate, up) and gate.shape == up.shape and gate.is_contiguous()
                and up.is_contiguous())
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return row_kernels.gated_activation_forward(gate, up, activation) if compiled else \
            gated_activation_reference(gate, up, activation)
    if torch.compiler.is_compiling():
        return gated_activation_reference(gate, up, activation)
    # Decided here: inside the Function's forward grad mode is off.
    return _GatedActivation.apply(gate, up, activation, compiled)
