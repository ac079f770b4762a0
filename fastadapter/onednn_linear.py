"""``onednn_linear``: ``F.linear`` against a frozen fp32 weight, its products run by oneDNN instead of MKL.

``F.linear`` in fp32 on a CPU calls MKL's sgemm. On AMD CPUs MKL takes a slow generic path: oneDNN's fp32 GEMM,
which torch ships beside it, runs the same products 1.3-1.6x faster on a model's layer shapes (2-core AMD EPYC
Zen 5). On Intel CPUs MKL runs its own kernels and is the faster of the two (0.85-0.99x for oneDNN on SmolLM2's
layer shapes, 0.63x on the head's input gradient, 2-core Xeon with AMX), so the route is on by default only where
the CPU is not Intel's (:func:`mkl_is_native`; ``python -m benchmarks.bench_onednn_linear`` measures both).
bf16 and fp16 products already go to oneDNN inside ``F.linear``, so only fp32 takes this route.

The forward is ``torch.ops.mkldnn._linear_pointwise(x, weight, bias)`` (the op inductor emits for a linear on
CPU), the backward of ``x`` the same op against ``weightᵀ``; the weight records no gradient (frozen, or grad mode
off): no weight gradient is ever formed, and a weight that needs one stays on ``F.linear`` (see :func:`runs_onednn`).
The reference is ``F.linear`` itself: the results agree to fp32 rounding (the summation order differs).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .linear_operands import PLAIN_TENSOR_TYPES, plain_operands, rows_of



def mkl_is_native() -> bool:
    """Whether this CPU is Intel's (``vendor_id`` of ``/proc/cpuinfo``), where MKL's sgemm runs its own kernels and
    beats oneDNN's; False where that cannot be read (no ``/proc``: the route stays on, as on AMD)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip() == "GenuineIntel"
    except OSError:
        pass
    return False


def _enabled(setting: str) -> bool:
    """``FASTADAPTER_ONEDNN_LINEAR``: ``1`` on, ``0`` off, unset or ``auto``: on unless :func:`mkl_is_native`."""
    if setting in ("", "auto"):
        return not mkl_is_native()
    if setting not in ("0", "1"):
        raise ValueError(f"FASTADAPTER_ONEDNN_LINEAR={setting!r}: set it to 1 (oneDNN), 0 (F.linear) or auto "
                         f"(oneDNN unless the CPU is Intel's), or unset it")
    return setting == "1"


#: Whether fp32 products take oneDNN (``FASTADAPTER_ONEDNN_LINEAR`` at import, see :func:`_enabled`; benchmarks and
#: tests flip it).
ENABLED = _enabled(os.environ.get("FASTADAPTER_ONEDNN_LINEAR", ""))
#: Calls with fewer rows stay on ``F.linear`` (or the decode kernel): oneDNN's setup costs more than it saves.
MIN_ROWS = 64

@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch has oneDNN and its ``mkldnn::_linear_pointwise`` op (CPU builds with oneDNN do)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def runs_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`onednn_linear` sends this call to oneDNN (else ``F.linear``): fp32 on the CPU, at least
    :data:`MIN_ROWS` rows, a plain contiguous 2-D weight that records no gradient (frozen, or grad mode off:
    a prefill under ``torch.no_grad``), outside ``torch.compile``."""
    if not (ENABLED and x.dtype == torch.float32 and x.device.type == "cpu" and rows_of(x) >= MIN_ROWS):
        return False
    if not plain_operands(x, weight, bias):
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False  # the weight's own gradient is F.linear's to form
    return onednn_available()


def _product(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x2d [M, K] · weight [N, K]ᵀ (+ bias [N])`` by oneDNN → ``[M, N]``."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


class _FrozenWeightLinear(torch.autograd.Function):
    """``x [M, K] → x · weightᵀ + bias``, gradient for ``x`` only (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _product(x2d, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(grad, weight)
        return grad_x, None, None


def input_gradient(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad [M, N] · weight [N, K] → [M, K]``: the gradient that reaches the input of ``x · weightᵀ``, by oneDNN
    (a linear against ``weightᵀ [K, N]``, a view, no copy) for fp32 CPU calls of at least :data:`MIN_ROWS` rows,
    else ``grad @ weight``. Records no gradient of its own."""
    if (ENABLED and grad.dim() == 2 and weight.dim() == 2 and grad.shape[0] >= MIN_ROWS
            and grad.shape[1] == weight.shape[0] and grad.dtype == weight.dtype == torch.float32
            and grad.device.type == weight.device.type == "cpu" and type(grad) in PLAIN_TENSOR_TYPES
            and type(weight) in PLAIN_TENSOR_TYPES
            and weight.is_contiguous() and not torch.compiler.is_compiling() and onednn_available()):
        return _product(grad.contiguous(), weight.t(), None)
    return grad @ weight


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` → ``[..., N]``.

    Calls that :func:`runs_onednn` accepts run oneDNN's fp32 GEMM (with a gradient for ``x``); every other call is
    ``F.linear`` itself.
    """
    if not runs_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    features = x.shape[-1]
    out = _FrozenWeightLinear.apply(x.reshape(-1, features), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
