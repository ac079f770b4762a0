"""The ``cpu`` backend: the compiled C++ kernels of ``csrc/`` (``torch.ops.fastadapter_cpu``).

Fused flash-style forward and memory-efficient backward for CPU tensors: multithreaded over sequences, kv heads
and query tiles (split over the KV cache for decode), fp32 accumulation. The library holds three kernel variants
and picks one per call from the CPU's features (csrc/dispatch.h; ``python -m fastadapter.info`` says which):
AVX-512 register tiles (bf16 on AVX512-BF16 ``vdpbf16ps``, fp32 on FMA, fp16 on MKL), AVX2 register tiles (fp32
FMA; bf16 and fp16 computed in fp32), or a generic one on MKL. ``FASTADAPTER_CPU_ISA=avx512|avx2|generic`` forces
a variant, ``FASTADAPTER_CPU_GEMM=mkl`` MKL products within it. Supports every option of the contract (GQA/MQA,
shared or per-sample prefix, P = 0, gate rows, tanh/none, causal or not, varlen, inputs without elements) in
fp32, bf16 and fp16. The automatic choice takes it for every CPU input when the library is built.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _cpu_extension
from .._inputs import AttentionInputs
from . import Backend, register_backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuBackend(Backend):
    """Fused C++ kernels for CPU tensors; unavailable when ``fastadapter._C`` was not built."""

    name = "cpu"
    fused = True

    def unavailable_reason(self) -> Optional[str]:
        return _cpu_extension.unavailable_reason()

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        reason = self.unavailable_reason()
        if reason:
            return [reason]
        reasons = []
        if inp.device.type != "cpu":
            reasons.append(f"tensors on {inp.device} (the cpu backend runs CPU tensors only)")
        if inp.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {inp.dtype} (supported: float32, bfloat16, float16)")
        if inp.ragged:
            reasons.append("separate query/key offsets or seqused_k (not yet in the C++ kernels)")
        return reasons

    def forward(self, inp: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.fastadapter_cpu.forward(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate,
                                                 inp.cu_seqlens_q, inp.max_seqlen_q, inp.causal, inp.softmax_scale,
                                                 inp.gate_tanh)

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.ops.fastadapter_cpu.backward(grad_out, inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v,
                                                  inp.gate, out, lse_w, lse_p, inp.cu_seqlens_q, inp.max_seqlen_q,
                                                  inp.causal, inp.softmax_scale, inp.gate_tanh)


register_backend(CpuBackend())
# Load the library now: a missing one warns at import, and torch.compile never traces the import.
_cpu_extension.unavailable_reason()
