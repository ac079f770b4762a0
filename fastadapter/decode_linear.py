"""``decode_linear``: ``F.linear`` whose few-row calls run a compiled CPU kernel (the model's layers reach it through
:class:`fastadapter.linear.Linear`).

A decoding step of generation feeds one new token per sequence through every weight of the model: a handful of
rows (``x [M, K]``, M = the batch) against each ``[N, K]`` weight, so the step's time is the time to stream the
weights. MKL's GEMM packs such a weight before multiplying; ``torch.ops.fastadapter_cpu.decode_linear``
(``csrc/decode_linear.h``) streams each weight row once through AVX2/AVX-512 register tiles instead, and widens
bf16/fp16 weights in registers. Measured side by side (``python -m benchmarks.bench_decode_linear``), it is faster
than ``F.linear`` for 2 to 16 rows; for one row MKL's matrix-vector product is as fast, and for more rows MKL's
packing pays off, so those calls stay on ``F.linear``. A dtype whose products torch runs on the CPU's own
reduced-precision dot products (bf16 through oneDNN on AVX512-BF16 or AMX CPUs, fp16 on AVX512-FP16 or AMX-FP16)
stays on ``F.linear`` too, on every kernel variant: there ``F.linear`` streams the weight faster than the kernel
(bf16 on an AVX-512 Zen 5: the kernel ran at 0.5-0.7x of ``F.linear``, see :func:`kernel_is_faster`).

The kernel has no backward: a call that records a gradient (grad mode on and any input requiring grad) uses
``F.linear``, as do calls under ``torch.compile``, off the CPU, on tensor subclasses (quantized weights, FSDP's
``DTensor``), on mixed or unsupported dtypes, on non-contiguous weights, and when ``fastadapter._C`` is not built.
Results equal ``F.linear``'s up to the summation order (fp32 accumulation in both).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _cpu_extension
from .linear_operands import plain_operands, rows_of

#: Calls with this many rows (the elements of ``x`` over its last dimension) run the kernel.
MIN_ROWS, MAX_ROWS = 2, 16
#: ``False`` sends every call to ``F.linear`` (``FASTADAPTER_DECODE_LINEAR=0`` at import; benchmarks flip it).
ENABLED = os.environ.get("FASTADAPTER_DECODE_LINEAR", "1") != "0"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_NATIVE_PRODUCTS: dict[torch.dtype, bool] = {}


def has_native_products(dtype: torch.dtype) -> bool:
    """Whether torch multiplies ``dtype`` (bf16 or fp16) on this CPU's own reduced-precision instructions through
    oneDNN (bf16: AVX512-BF16, AMX or AVX-512 with conversions; fp16: AVX512-FP16 or AMX-FP16), as oneDNN reports
    it (it follows ``ONEDNN_MAX_CPU_ISA``); else its products of ``dtype`` are emulated. Asked once per dtype."""
    if dtype not in _NATIVE_PRODUCTS:
        check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
        try:
            native = bool(getattr(torch.ops.mkldnn, check)()) and torch.backends.mkldnn.is_available()
        except (AttributeError, RuntimeError):  # a torch without oneDNN: its products are the emulated ones
            native = False
        _NATIVE_PRODUCTS[dtype] = native
    return _NATIVE_PRODUCTS[dtype]


def kernel_is_faster(dtype: torch.dtype) -> bool:
    """Whether the kernel beats ``F.linear`` for weights of ``dtype`` on this CPU, as measured by
    ``benchmarks.bench_decode_linear`` (both kernel variants beside ``F.linear``): fp32 always (2-2.8x on AVX-512,
    1.3-1.7x on AVX2: MKL packs the weight); bf16 and fp16 only where torch has no native products of that dtype
    on this CPU (:func:`has_native_products`; bf16 on an AVX2 CPU: 3-6x, as torch's bf16 GEMM is emulated there)."""
    return dtype == torch.float32 or not has_native_products(dtype)


def runs_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`decode_linear` runs the compiled kernel for these arguments (else ``F.linear``)."""
    # The cheapest refusals first: a call that stays on F.linear pays for these checks (about a microsecond each).
    if not ENABLED or x.dtype not in _DTYPES or (x.dtype != torch.float32 and not kernel_is_faster(x.dtype)):
        return False
    if not (MIN_ROWS <= rows_of(x) <= MAX_ROWS and x.device.type == "cpu"):
        return False
    if not plain_operands(x, weight, bias):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if _cpu_extension.unavailable_reason() is not None:
        return False
    _cpu_extension.check_isa_setting()
    return True


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` → ``[..., N]`` in x's dtype.

    Decode-shaped CPU calls (2 to 16 rows, no gradient recorded, see :func:`runs_kernel`) run
    ``torch.ops.fastadapter_cpu.decode_linear``; every other call is ``F.linear`` itself.
    """
    if not runs_kernel(x, weight, bias):
        return F.linear(x, weight, bias)
    return run_kernel(x, weight, bias)


def run_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel on a call :func:`runs_kernel` took (``x [..., K]``, ``weight [N, K]``, ``bias [N]`` →
    ``[..., N]``), without asking again: for a caller that routes on :func:`runs_kernel` itself
    (:func:`fastadapter.linear.linear`), each check costing about a microsecond of a call of tens."""
    if x.dim() == 2:
        return torch.ops.fastadapter_cpu.decode_linear(x.contiguous(), weight, bias)
    out = torch.ops.fastadapter_cpu.decode_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return out.view(x.shape[:-1] + (weight.shape[0],))
