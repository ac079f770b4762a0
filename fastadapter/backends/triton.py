"""The ``triton`` backend: the fused flash-style Triton kernels of :mod:`fastadapter.kernels`.

On CUDA tensors the kernels are compiled; on CPU tensors they run under Triton's interpreter when
``TRITON_INTERPRET=1`` is set (how they are tested here), which is exact but slow, so the automatic choice
takes this backend only for CUDA tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._inputs import AttentionInputs
from . import Backend, register_backend

try:
    import triton  # noqa: F401
    _TRITON_IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # pragma: no cover - triton is a test dependency
    _TRITON_IMPORT_ERROR = f"triton is not importable ({error}); install it with `pip install triton`"


def _interpreting() -> bool:
    # Not imported from fastadapter.kernels at module import: the kernels import triton.
    from fastadapter.kernels._interpreter import interpreting
    return interpreting()


class TritonBackend(Backend):
    """Fused forward and memory-efficient backward kernels (online softmax over words + one prefix tile)."""

    name = "triton"
    fused = True

    def unavailable_reason(self) -> Optional[str]:
        if _TRITON_IMPORT_ERROR:
            return _TRITON_IMPORT_ERROR
        if not torch.cuda.is_available() and not _interpreting():
            return "no CUDA device, and TRITON_INTERPRET=1 is not set to run the kernels on CPU"
        return None

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        reason = self.unavailable_reason()
        if reason:
            return [reason]
        from fastadapter.kernels.layout import MAX_HEAD_DIM, MAX_PREFIX_LEN
        reasons = []
        if inp.device.type != "cuda" and not (inp.device.type == "cpu" and _interpreting()):
            reasons.append(f"tensors on {inp.device} (the kernels need CUDA tensors, or CPU tensors with "
                           f"TRITON_INTERPRET=1)")
        if inp.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {inp.dtype} (supported: float16, bfloat16, float32)")
        if inp.head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim {inp.head_dim} > {MAX_HEAD_DIM}")
        if inp.prefix_len > MAX_PREFIX_LEN:
            reasons.append(f"prefix length {inp.prefix_len} > {MAX_PREFIX_LEN} (the prefix is one tile)")
        return reasons

    def automatic_choice_reasons(self, inp: AttentionInputs) -> list[str]:
        reasons = self.not_supported_reasons(inp)
        if not reasons and inp.device.type != "cuda":
            reasons.append("CPU tensors run under Triton's interpreter only when asked for by name")
        return reasons

    def forward(self, inp: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from fastadapter.kernels.decode import attention_decode, decode_applies
        from fastadapter.kernels.forward import attention_forward
        if decode_applies(inp):  # a few query rows over a KV cache: the split-KV kernels (flash-decoding)
            return attention_decode(inp)
        return attention_forward(inp)

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from fastadapter.kernels.backward import attention_backward
        return attention_backward(inp, out, lse_w, lse_p, grad_out)


register_backend(TritonBackend())
