"""The ``triton`` backend: the fused flash-style Triton kernels of :mod:`fastadapter.kernels`.

On CUDA tensors the kernels are compiled; on CPU tensors they run under Triton's interpreter when
``TRITON_INTERPRET=1`` is set (how they are tested here), which is exact but slow, so the automatic choice
takes this backend only for CUDA tensors.

On CUDA the backend declines, with the reason, what its kernels cannot run well on the inputs' GPU, so that the
automatic choice moves on (to ``sdpa``) instead of failing at launch: float32 (see
:func:`fastadapter.kernels.configs.target_reason`), bfloat16 before sm_80, and any kernel of the call (the
forward, and the three backward kernels when a gradient is needed) of which no configuration compiles for this
GPU without spills and within its shared memory (:func:`fastadapter.kernels.autotune.launch_plan`, cached).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from ..kernels.problem import AttentionProblem
from .registry import register_backend
from .fused import FusedBackend


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    """Why ``import triton`` fails here, or None. Tried only when the kernels could run (CUDA, or the interpreter),
    so that ``import fastadapter`` does not import Triton."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install it with `pip install triton`"
    return None


def _interpreting() -> bool:
    # Not imported from fastadapter.kernels at module import: the kernels import triton.
    from fastadapter.kernels._interpreter import interpreting
    return interpreting()


def _target(inp: AttentionProblem) -> Optional[tuple[int, Optional[int]]]:
    """``(compute capability, CUDA device index)`` the kernels would be compiled for; None off CUDA."""
    if inp.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(inp.device)
    return 10 * major + minor, inp.device.index if inp.device.index is not None else torch.cuda.current_device()


def _needs_backward(inp: AttentionProblem) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inp.tensors)


class TritonBackend(FusedBackend):
    """Fused forward and memory-efficient backward kernels (online softmax over words + one prefix tile)."""

    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        if not torch.cuda.is_available() and not _interpreting():
            if importlib.util.find_spec("triton") is None:
                return _triton_import_error()
            return "no CUDA device, and TRITON_INTERPRET=1 is not set to run the kernels on CPU"
        return _triton_import_error()

    def not_supported_reasons(self, inp: AttentionProblem) -> list[str]:
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
        if inp.attn_mask is not None:
            reasons.append("an explicit attn_mask (the kernels apply the causal rule only)")
        target = _target(inp)
        if not reasons and target is not None:
            reasons += self.target_reasons(inp, *target)
        return reasons

    def target_reasons(self, inp: AttentionProblem, capability: int, device_index: Optional[int]) -> list[str]:
        """Why the kernels cannot run ``inp`` on sm_<capability> (``device_index`` None: judged ahead of time,
        by compiling without a GPU). Empty when every kernel the call needs has a configuration that fits."""
        from fastadapter.kernels import configs
        from fastadapter.kernels.autotune import decline_reason
        from fastadapter.kernels.jit_functions import jit_function
        reason = configs.target_reason(inp.dtype, capability)
        if reason:
            return [reason]
        facts = configs.KernelFacts.of(inp)
        kernels = configs.FORWARD_KERNELS + (configs.BACKWARD_KERNELS if _needs_backward(inp) else ())
        reasons = [decline_reason(kernel, jit_function(kernel), facts, capability, device_index)
                   for kernel in kernels]
        return [r for r in reasons if r]

    def automatic_choice_reasons(self, inp: AttentionProblem) -> list[str]:
        reasons = self.not_supported_reasons(inp)
        if not reasons and inp.device.type != "cuda":
            reasons.append("CPU tensors run under Triton's interpreter only when asked for by name")
        return reasons

    def forward(self, inp: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from fastadapter.kernels.decode import attention_decode, decode_applies
        from fastadapter.kernels.forward import attention_forward
        # A few query rows per sequence over a KV cache (dense, a padded cache with seqused_k, or an unpadded
        # varlen step): the split-KV kernels (flash-decoding); everything else: the forward kernel.
        if decode_applies(inp):
            return attention_decode(inp)
        return attention_forward(inp)

    def backward(self, inp: AttentionProblem, out: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from fastadapter.kernels.backward import attention_backward
        return attention_backward(inp, out, lse_w, lse_p, grad_out)


register_backend(TritonBackend())
