"""The ``reference`` backend: :mod:`fastadapter.reference` as a backend (fp32 math, output in q's dtype)."""
from __future__ import annotations

import torch

from ..kernels.problem import AttentionProblem
from ..reference import reference_attention
from .registry import Backend, register_backend


class ReferenceBackend(Backend):
    """Full score matrices in fp32, gradients by autograd. Runs everything, everywhere; O(S²) memory."""

    name = "reference"
    fused = False

    def attention(self, inp: AttentionProblem) -> torch.Tensor:
        return reference_attention(inp, upcast=True).to(inp.dtype)


register_backend(ReferenceBackend())
