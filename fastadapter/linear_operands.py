"""What every compiled route of a linear (``decode_linear``, ``onednn_linear``) asks of its operands before it takes a
call that ``F.linear`` would otherwise run: the one definition of "plain operands a hand-written product can read"
(and of the plain tensor types every compiled kernel reads, :data:`PLAIN_TENSOR_TYPES`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

#: The tensor types a compiled kernel reads directly (quantized weights, FSDP's ``DTensor`` and other subclasses
#: take their own routes).
PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def rows_of(x: torch.Tensor) -> int:
    """Rows of ``x [..., K]`` seen as ``[M, K]`` (0 for a 0-d or empty-feature tensor)."""
    features = x.shape[-1] if x.dim() else 0
    return x.numel() // features if features else 0


def plain_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether ``x [..., K]``, ``weight [N, K]`` and ``bias [N]`` can go to a compiled product: outside
    ``torch.compile`` (inductor picks its own), plain tensors (no quantized or sharded subclasses), one dtype, and a
    contiguous 2-D weight of matching width on ``x``'s device."""
    if torch.compiler.is_compiling():
        return False
    if type(weight) not in PLAIN_TENSOR_TYPES or type(x) not in PLAIN_TENSOR_TYPES or (bias is not None and type(bias) not in PLAIN_TENSOR_TYPES):
        return False
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    return (weight.dim() == 2 and x.dim() > 0 and weight.shape[1] == x.shape[-1] and weight.is_contiguous()
            and weight.device == x.device)
