"""The compiled row kernels of a training step (``csrc/training_rows.h``) as autograd functions: RMSNorm, RMSNorm
after a residual addition, the gated activation of a gated MLP, and the token cross-entropy of a chunk of logits.

In a LLaMA-Adapter step on a small model the frozen products run near the CPU's GEMM peak, and much of the rest is
elementwise work: eager RMSNorm is five passes over ``[tokens, dim]`` forward and about seven more in autograd's
backward, the residual addition before it one more, and the gradients that meet at the residual sum one more
again. These kernels do each in one pass forward and one backward, and save only what backward reads (the row's
input and one fp32 ``1/rms`` per row).

They run for fp32 CPU tensors, in training and inference alike (:func:`runs_row_kernels`); every other call, and
every call under ``torch.compile`` (inductor fuses the eager composition itself), takes the eager composition,
which is the reference: :func:`fastadapter.model.norms.rms_normalize`,
:func:`fastadapter.model.gated_activation.gated_activation_reference` and
:func:`fastadapter.training.linear_cross_entropy.linear_cross_entropy_reference`. Results equal the reference's up to the
rounding of the row sums and of the activation's exponential (``tests/model/test_row_kernels.py``).
"""
from __future__ import annotations

import os

import torch

from .. import _cpu_extension
from ..linear_operands import PLAIN_TENSOR_TYPES

#: ``False`` sends every call to the eager composition (``FASTADAPTER_ROW_KERNELS=0`` at import; benchmarks flip it).
ENABLED = os.environ.get("FASTADAPTER_ROW_KERNELS", "1") != "0"

def runs_row_kernels(*tensors: torch.Tensor) -> bool:
    """Whether the compiled row kernels take a call on ``tensors``: all plain fp32 CPU tensors, not under
    ``torch.compile``, ``fastadapter._C`` built, and :data:`ENABLED`. With or without a gradient recorded, so that
    a model computes the same values in training and in inference (a zero-gated adapter reproduces its base to
    the last bit either way)."""
    if not ENABLED or torch.compiler.is_compiling():
        return False
    if not all(type(t) in PLAIN_TENSOR_TYPES and t.dtype == torch.float32 and t.device.type == "cpu"
               for t in tensors):
        return False
    if _cpu_extension.unavailable_reason() is not None:
        return False
    _cpu_extension.check_isa_setting()
    return True


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` as contiguous ``[N, D]`` rows."""
    return x.reshape(-1, x.shape[-1]).contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        rows = _rows(x)
        y, rstd = torch.ops.fastadapter_cpu.rms_norm_forward(rows, scale, eps)
        ctx.save_for_backward(rows, scale, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        rows, scale, rstd = ctx.saved_tensors
        grad_rows = _rows(grad_y)
        grad_x = torch.ops.fastadapter_cpu.rms_norm_backward(grad_rows, rows, scale, rstd, None)
        return grad_x.view(grad_y.shape), _scale_gradient(ctx, grad_rows, rows, rstd), None


def _scale_gradient(ctx, grad_rows: torch.Tensor, rows: torch.Tensor, rstd: torch.Tensor):
    """``Σ_rows grad_y · x · rstd`` ``[D]`` when the scale is trained (LLaMA-Adapter V2's norms), else None."""
    if not ctx.needs_input_grad[-2]:
        return None
    return (grad_rows * rows * rstd[:, None]).sum(0)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, eps: float):
        ctx.set_materialize_grads(False)
        total, y, rstd = torch.ops.fastadapter_cpu.add_rms_norm_forward(_rows(x), _rows(residual), scale, eps)
        ctx.save_for_backward(total, scale, rstd)
        return total.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_total, grad_y):
        total, scale, rstd = ctx.saved_tensors
        if grad_y is None:
            return grad_total, grad_total, None, None
        extra = None if grad_total is None else _rows(grad_total)
        grad_rows = _rows(grad_y)
        grad = torch.ops.fastadapter_cpu.rms_norm_backward(grad_rows, total, scale, rstd, extra).view(grad_y.shape)
        return grad, grad, _scale_gradient(ctx, grad_rows, total, rstd), None


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) · scale`` over the last dimension on the compiled kernel (call it where
    :func:`runs_row_kernels` holds). ``x [..., D]`` fp32, ``scale [D]`` fp32 (a gradient for both) → fp32
    ``[..., D]``."""
    return _RMSNorm.apply(x, scale.contiguous(), eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, rms_norm(x + residual))`` in one pass forward and one backward (the sum's two gradients,
    through the norm and from the sum's other use, are added in the same pass). ``x, residual [..., D]`` fp32,
    ``scale [D]`` fp32 (a gradient for all three) → two fp32 ``[..., D]``."""
    return _AddRMSNorm.apply(x, residual, scale.contiguous(), eps)


def gated_activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) · up`` on the compiled kernel: fp32 contiguous ``gate, up`` of one shape; ``activation``
    ``"silu"`` or ``"gelu_tanh"``."""
    return torch.ops.fastadapter_cpu.gated_activation_forward(gate, up, activation == "gelu_tanh")


def gated_activation_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad · up · act'(gate), grad · act(gate))`` on the compiled kernel, one pass (shapes as the forward)."""
    return torch.ops.fastadapter_cpu.gated_activation_backward(grad.contiguous(), gate, up, activation == "gelu_tanh")


def cross_entropy_rows_(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row token losses ``logsumexp(logits[i]) − logits[i, target[i]]`` → fp32 ``[N]``, and ``logits``
    (fp32 contiguous ``[N, V]``, overwritten) becomes their gradient ``softmax − onehot``; rows whose target is
    ``ignore_index`` get loss 0 and a zero gradient. One pass over the logits through the cache (call it where
    :func:`runs_row_kernels` for the logits)."""
    return torch.ops.fastadapter_cpu.cross_entropy_rows_(logits, target, ignore_index)
