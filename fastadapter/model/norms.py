"""The norm layers of LLaMA and its relatives.

* :class:`RMSNorm` — LLaMA (Meta's code): ``x / rms(x) · weight``, normalised in fp32, cast back, then scaled;
* :class:`PlusOneRMSNorm` — Gemma2/3: ``x / rms(x) · (1 + weight)``, the weight stored as Hugging Face stores
  it (zero-initialised), multiplied in fp32 before the cast back (LLaMA casts first, then multiplies);
* :class:`ParameterFreeLayerNorm` — Olmo: ``(x − mean) / std`` with neither weight nor bias.

Each maps ``x [..., dim]`` to the same shape in ``x``'s dtype, computing in fp32 as the Hugging Face modules do.
The two RMSNorms run the compiled row kernels (:mod:`fastadapter.model.row_kernels`) for fp32 CPU tensors;
:func:`add_and_normalize` fuses the residual addition before a norm the same way. The eager compositions here are
the references.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import row_kernels


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

    def row_kernel_scale(self, x: torch.Tensor):
        """The scale the row kernels multiply by (``weight``), or None when they cannot take ``x``."""
        if not row_kernels.runs_row_kernels(x, self.weight):
            return None
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.row_kernel_scale(x)
        if scale is not None:
            return row_kernels.rms_norm(x, scale, self.eps)
        return rms_normalize(x, self.eps).type_as(x) * self.weight


class PlusOneRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) · (1 + weight)`` in fp32, returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def row_kernel_scale(self, x: torch.Tensor):
        """The scale the row kernels multiply by (``1 + weight``), or None when they cannot take ``x``."""
        if not row_kernels.runs_row_kernels(x, self.weight):
            return None
        return 1.0 + self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.row_kernel_scale(x)
        if scale is not None:
            return row_kernels.rms_norm(x, scale, self.eps)
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


def add_and_normalize(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, norm(h))`` with ``h = x + residual``: a block's residual addition and the norm after it.

    ``x, residual [..., dim]`` → two ``[..., dim]``. For the RMSNorms on the row kernels' terms (see the module) the
    addition, the norm and, in backward, the meeting of ``h``'s two gradients take one pass each way
    (:func:`fastadapter.model.row_kernels.add_rms_norm`); otherwise it is the plain composition.
    """
    scale_of = getattr(norm, "row_kernel_scale", None)
    if scale_of is not None and x.shape == residual.shape and row_kernels.runs_row_kernels(x, residual):
        scale = scale_of(x)
        if scale is not None:
            return row_kernels.add_rms_norm(x, residual, scale, norm.eps)
    h = x + residual
    return h, norm(h)
