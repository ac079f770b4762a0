"""How the kernels address batched and varlen tensors: strides, sequence lengths and tile sizes of one call.

The kernels have a single source for both layouts. A tensor is described by ``(stride_b, stride_s, stride_h)``:
batched ``[B, S, H, D]`` tensors use their own strides; packed varlen ``[T, H, D]`` tensors use ``stride_b = 0``
and find each sequence's first token in ``cu_seqlens_q`` (q, out, their gradients and row statistics) or
``cu_seqlens_k`` (k, v and their gradients). Broadcast operands use stride 0 too: a prefix shared by
the batch (``Bp == 1``) and a gate with one row (``Bg == 1``) are read by every sequence. The head dimension
must be contiguous (``stride(-1) == 1``) so that rows load as wide vectors.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton

from ._interpreter import interpreting
from .problem import AttentionProblem

#: The largest prefix that fits one tile (the prompt of LLaMA-Adapter is 10 tokens).
MAX_PREFIX_LEN = 64
#: The largest head dimension the tiles are sized for.
MAX_HEAD_DIM = 256


def row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """``(stride_b, stride_s, stride_h)`` of a ``[B, S, H, D]`` tensor, or ``(0, stride_t, stride_h)`` varlen."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a tensor whose first dimension is broadcast over the batch when it has size 1."""
    return (0 if t.shape[0] == 1 else t.stride(0),) + tuple(t.stride()[1:])


def unit_stride_head_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its head dimension is contiguous (any other strides are fine), else a copy.

    Only a tensor transposed along its last dimension needs the copy; bshd views of bhsd tensors do not.
    """
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@dataclass(frozen=True)
class Layout:
    """The shape facts every kernel launch of one attention call needs.

    Attributes:
        batch: B, or the number of packed sequences N.
        heads_q, heads_kv, group: query heads, kv heads and ``heads_q // heads_kv``.
        seqlen_q, seqlen_k: the (longest) query and key sequence; the kernels read each varlen length from
            ``cu_seqlens_q`` / ``cu_seqlens_k``, and the keys used from ``seqused_k``.
        prefix_len: P (0 means no prefix).
        head_dim: D; ``block_d`` is D rounded up to a power of two (at least 16, the smallest ``tl.dot``).
        block_p: P rounded up likewise (the prefix is one tile).
        varlen: packed sequences.
        shared_offsets: varlen q and k share one ``cu_seqlens`` (packed self-attention): the kernels read the
            key offsets from the query offsets (one register less, which keeps the dk/dv kernel's GQA loop from
            spilling on sm_90).
        seqused: ``seqused_k`` is given (each sequence reads only its first keys).
        interpreter: the kernels run under Triton's interpreter (see :mod:`._interpreter`).
        arch: the compute capability of the inputs' CUDA device (80 for sm_80; 0 off CUDA): part of the
            autotuning key, and the target the launch plan is compiled for.
    """

    batch: int
    heads_q: int
    heads_kv: int
    group: int
    seqlen_q: int
    seqlen_k: int
    prefix_len: int
    head_dim: int
    block_d: int
    block_p: int
    varlen: bool
    interpreter: bool
    arch: int = 0
    seqused: bool = False
    shared_offsets: bool = False

    @staticmethod
    def of(problem: AttentionProblem) -> "Layout":
        return Layout(batch=problem.batch, heads_q=problem.heads_q, heads_kv=problem.heads_kv,
                      group=problem.heads_q // problem.heads_kv, seqlen_q=problem.seqlen_q,
                      seqlen_k=problem.seqlen_k, prefix_len=problem.prefix_len, head_dim=problem.head_dim,
                      block_d=max(16, triton.next_power_of_2(problem.head_dim)),
                      block_p=max(16, triton.next_power_of_2(max(problem.prefix_len, 1))),
                      varlen=problem.varlen, interpreter=interpreting(), arch=device_arch(problem.device),
                      seqused=problem.seqused_k is not None, shared_offsets=problem.shares_offsets)

    def seqlen_buckets(self) -> dict:
        """The autotuning keys of the lengths: the (longest) query and key sequence, each rounded up to a power
        of two, so that varlen batches of slightly different lengths reuse one tuned configuration, and a decode
        step over a long cache is not tuned as a long prefill."""
        return dict(seqlen_q_bucket=triton.next_power_of_2(max(self.seqlen_q, 1)),
                    seqlen_k_bucket=triton.next_power_of_2(max(self.seqlen_k, 1)))

    def common_constexprs(self) -> dict:
        """Compile-time parameters shared by every kernel of the call."""
        return dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, BLOCK_P=self.block_p,
                    HAS_PREFIX=self.prefix_len > 0, VARLEN=self.varlen, SHARED_OFFSETS=self.shared_offsets,
                    HAS_SEQUSED=self.seqused,
                    INTERPRETER=self.interpreter, ARCH=self.arch)


def device_arch(device: torch.device) -> int:
    """Compute capability of a CUDA device as one number (``(9, 0)`` -> 90); 0 for any other device."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def device_guard(device: torch.device):
    """The context every launch runs in: ``torch.cuda.device(device)`` for CUDA tensors, so that the kernels run
    on the inputs' GPU (and its current stream) rather than the current one (a model split over GPUs); nothing
    otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def lse_strides(stats: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """``(stride_b, stride_h)`` of a contiguous row-statistics tensor ``[B, Hq, Sq]`` or varlen ``[Hq, T]``."""
    if varlen:
        return 0, stats.stride(0)
    return stats.stride(0), stats.stride(1)


def sequence_arguments(problem: AttentionProblem) -> dict:
    """The pointers every kernel reads its sequences' bounds from: ``CU_SEQLENS_Q``, ``CU_SEQLENS_K`` (None in
    dense mode) and ``SEQUSED_K`` (None when every key is used; see :func:`.tiles.sequence_bounds`)."""
    return dict(CU_SEQLENS_Q=problem.cu_seqlens_q, CU_SEQLENS_K=problem.cu_seqlens_k, SEQUSED_K=problem.seqused_k)
