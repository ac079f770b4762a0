"""The norm layers of LLaMA and its relatives.

* :class:`RMSNorm` — LLaMA (Meta's code): ``x / rms(x) · weight``, normalised in fp32, cast back, then scaled;
* :class:`PlusOneRMSNorm` — Gemma2/3: ``x / rms(x) · (1 + weight)``, the weight stored as Hugging Face stores
  it (zero-initialised), multiplied in fp32 before the cast back (LLaMA casts first, then multiplies);
* :class:`ParameterFreeLayerNorm` — Olmo: ``(x − mean) / std`` with neither weight nor bias.

Each maps ``x [..., dim]`` to the same shape in ``x``'s dtype, computing in fp32 as the Hugging Face modules do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dimension, in fp32 (``x [..., dim]`` → fp32 ``[..., dim]``)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """``x / rms(x) · weight``, computed in fp32 (as Meta's code) and returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps).type_as(x) * self.weight


class PlusOneRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) · (1 + weight)`` in fp32, returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


class ParameterFreeLayerNorm(nn.Module):
    """Olmo's layer norm: ``(x − mean(x)) / sqrt(var(x) + eps)`` in fp32, no weight or bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), None, None, eps=self.eps).type_as(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"
