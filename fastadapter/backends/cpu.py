"""The ``cpu`` backend: the compiled C++ kernels of ``csrc/`` (``torch.ops.fastadapter_cpu``).

Fused flash-style forward and memory-efficient backward for CPU tensors: multithreaded over sequences, kv heads
and query tiles (split over the KV cache for decode), fp32 accumulation. The library holds three kernel variants
and picks one per call from the CPU's features (csrc/dispatch.h; ``python -m fastadapter.info`` says which):
AVX-512 (bf16 on AMX tiles where the CPU has AMX, else on AVX512-BF16 ``vdpbf16ps`` register tiles; fp32 on FMA
register tiles, or MKL on Intel CPUs; fp16 on MKL), AVX2 register tiles (fp32 FMA; bf16 and fp16 computed in fp32),
or a generic one on MKL. ``FASTADAPTER_CPU_ISA=avx512|avx2|generic`` forces a variant,
``FASTADAPTER_CPU_GEMM=amx|tiles|mkl`` the products within it (docs/cpu-kernels.md). Supports every option of the contract (GQA/MQA,
shared or per-sample prefix, P = 0, gate rows, tanh/none, causal or not, inputs without elements) and the ragged
forms: packed sequences with separate query and key offsets (``cu_seqlens_q``/``cu_seqlens_k``, bottom-right
causal per sequence), ``seqused_k`` over a padded KV cache or packed keys, in fp32, bf16 and fp16. The automatic choice takes it for every CPU input when the library is built.
Each calling thread keeps the kernels' scratch memory for its next call (``workspace_bytes``,
``release_workspace``, ``FASTADAPTER_CPU_WORKSPACE_MB``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _cpu_extension
from ..kernels.problem import AttentionProblem
from .registry import register_backend
from .fused import FusedBackend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuBackend(FusedBackend):
    """Fused C++ kernels for CPU tensors; unavailable when ``fastadapter._C`` was not built."""

    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        return _cpu_extension.unavailable_reason()

    def not_supported_reasons(self, inp: AttentionProblem) -> list[str]:
        reason = self.unavailable_reason()
        if reason:
            return [reason]
        reasons = []
        if inp.device.type != "cpu":
            reasons.append(f"tensors on {inp.device} (the cpu backend runs CPU tensors only)")
        if inp.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {inp.dtype} (supported: float32, bfloat16, float16)")
        if inp.attn_mask is not None:
            reasons.append("an explicit attn_mask (the kernels apply the causal rule only)")
        return reasons

    def forward(self, inp: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out, lse_w, lse_p)``: out has q's shape, the log-sum-exps are fp32 ``inp.lse_shape()``."""
        if not torch.compiler.is_compiling():
            _cpu_extension.check_isa_setting()
        return torch.ops.fastadapter_cpu.forward(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate,
                                                 *_ragged_args(inp), inp.causal, inp.softmax_scale, inp.gate_tanh)

    def backward(self, inp: AttentionProblem, out: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(dq, dk, dv, dprefix_k, dprefix_v, dgate)`` with the inputs' shapes (dgate fp32 ``[Bg, Hq]``)."""
        if not torch.compiler.is_compiling():
            _cpu_extension.check_isa_setting()
        return torch.ops.fastadapter_cpu.backward(grad_out, inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v,
                                                  inp.gate, out, lse_w, lse_p, *_ragged_args(inp), inp.causal,
                                                  inp.softmax_scale, inp.gate_tanh)


def workspace_bytes() -> int:
    """Bytes of scratch memory the calling thread's kernel calls keep for the next call: the packed operands of
    the products and dq's fp32 copies (``csrc/workspace.h``). At most ``FASTADAPTER_CPU_WORKSPACE_MB`` MiB per
    calling thread (default 256; 0 keeps none); 0 when the library is not built."""
    if _cpu_extension.unavailable_reason() is not None:
        return 0
    return torch.ops.fastadapter_cpu.workspace_bytes()


def release_workspace() -> None:
    """Frees the scratch memory the calling thread's kernel calls keep (``workspace_bytes``); the next call
    allocates it again. Does nothing when the library is not built."""
    if _cpu_extension.unavailable_reason() is None:
        torch.ops.fastadapter_cpu.release_workspace()


def _ragged_args(inp: AttentionProblem) -> tuple:
    """``(cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)`` of the C++ ops (0 maxima dense;
    shared offsets as the one tensor twice)."""
    return inp.cu_seqlens_q, inp.cu_seqlens_k, inp.seqused_k, inp.max_seqlen_q, inp.max_seqlen_k


register_backend(CpuBackend())
# Load the library now: a missing one warns at import, and torch.compile never traces the import.
_cpu_extension.unavailable_reason()
