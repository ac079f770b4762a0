"""``linear`` and ``Linear``: ``F.linear`` / ``nn.Linear`` that take, for each CPU call, the product measured fastest.

The thin model's linear layers are :class:`Linear`. A call goes to
- the compiled decode kernel (:mod:`fastadapter.decode_linear`) for 2 to 16 rows with no gradient recorded
  (a decoding step: the time to stream the weight);
- oneDNN's fp32 GEMM (:mod:`fastadapter.onednn_linear`) for many rows of fp32 against a frozen weight (prefill and
  training: MKL's sgemm is slow on AMD CPUs);
- ``F.linear`` otherwise (GPUs, bf16/fp16, trainable weights, tensor subclasses, ``torch.compile``).

Each route's own module says when it runs and measures it; every route equals ``F.linear`` to fp32 rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .decode_linear import run_kernel, runs_kernel
from .onednn_linear import onednn_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` → ``[..., N]`` in x's dtype,
    through the decode kernel, oneDNN or ``F.linear`` (see the module docstring)."""
    if runs_kernel(x, weight, bias):
        return run_kernel(x, weight, bias)
    return onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
