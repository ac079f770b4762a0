"""The arguments of each kernel's launch, built from an :class:`~.problem.AttentionProblem`: the host side of
the kernels' signatures, apart from the ``@triton.jit`` functions so that the compiler-facts reader
(:mod:`.compiler_facts`) builds the very arguments a real launch gets without importing a kernel.

* :func:`forward_arguments`: the forward kernel (:mod:`.forward`);
* :class:`BackwardBuffers` and :func:`preprocess_arguments`, :func:`dkdv_arguments`, :func:`dq_arguments`: the
  three backward kernels (:mod:`.backward`).

Every builder returns every argument but the autotuned tile sizes (``BLOCK_M``, ``BLOCK_N``), by the kernel's
parameter names.
"""
from __future__ import annotations

import torch
import triton

from .configs import candidates
from .layout import (Layout, broadcast_strides, lse_strides, row_strides, sequence_arguments,
                     unit_stride_head_dim)
from .problem import AttentionProblem


def forward_arguments(inp: AttentionProblem, layout: Layout, out: torch.Tensor, lse_w: torch.Tensor,
                      lse_p: torch.Tensor) -> dict:
    """Every argument of :func:`.forward.zero_init_attention_forward_kernel` but the autotuned tile sizes."""
    q, k, v = (unit_stride_head_dim(t) for t in (inp.q, inp.k, inp.v))
    pk, pv = (unit_stride_head_dim(t) for t in (inp.prefix_k, inp.prefix_v))
    pkb, pks, pkh, _ = broadcast_strides(pk)
    pvb, pvs, pvh, _ = broadcast_strides(pv)
    gb, gh = broadcast_strides(inp.gate)
    names = ("stride_qb stride_qs stride_qh stride_kb stride_ks stride_kh stride_vb stride_vs stride_vh "
             "stride_ob stride_os stride_oh").split()
    strides = dict(zip(names, row_strides(q, layout.varlen) + row_strides(k, layout.varlen)
                       + row_strides(v, layout.varlen) + row_strides(out, layout.varlen)))
    lb, lh = lse_strides(lse_w, layout.varlen)
    return dict(Q=q, K=k, V=v, PREFIX_K=pk, PREFIX_V=pv, GATE=inp.gate, OUT=out, LSE_W=lse_w, LSE_P=lse_p,
                **sequence_arguments(inp), **strides,
                stride_pkb=pkb, stride_pks=pks, stride_pkh=pkh, stride_pvb=pvb, stride_pvs=pvs, stride_pvh=pvh,
                stride_gb=gb, stride_gh=gh, stride_lb=lb, stride_lh=lh,
                seqlen_q=layout.seqlen_q, seqlen_k=layout.seqlen_k, prefix_len=layout.prefix_len,
                heads_q=layout.heads_q, group=layout.group, softmax_scale=inp.softmax_scale,
                **layout.seqlen_buckets(), CAUSAL=inp.causal, GATE_TANH=inp.gate_tanh,
                **layout.common_constexprs())


#: Programs the preprocess grid aims for: enough to fill a 132-SM GPU several times over.
PREPROCESS_TARGET_PROGRAMS = 1024


def preprocess_splits(layout: Layout) -> int:
    """How many programs share the query tiles of one (sequence, head) in the preprocess kernel.

    No more than the tiles of the smallest configuration: more splits would only add idle programs.
    """
    batch_heads = max(layout.batch * layout.heads_q, 1)
    smallest_tile = min(c.kwargs["BLOCK_M"] for c in candidates("backward_preprocess", layout.block_d))
    tiles = max(triton.cdiv(layout.seqlen_q, smallest_tile), 1)
    return max(1, min(triton.cdiv(PREPROCESS_TARGET_PROGRAMS, batch_heads), tiles))


def _without(constexprs: dict, *names: str) -> dict:
    """``constexprs`` less the compile-time parameters a kernel does not take."""
    return {k: v for k, v in constexprs.items() if k not in names}


def _strides(prefix: str, t: torch.Tensor, varlen: bool) -> dict:
    b, s, h = row_strides(t, varlen)
    return {f"stride_{prefix}b": b, f"stride_{prefix}s": s, f"stride_{prefix}h": h}


def _prefix_strides(prefix: str, t: torch.Tensor) -> dict:
    b, s, h, _ = broadcast_strides(t)
    return {f"stride_{prefix}b": b, f"stride_{prefix}s": s, f"stride_{prefix}h": h}


class BackwardBuffers:
    """The tensors of one backward call: inputs with a unit-stride head dim, the saved tensors, the row
    statistics ``D_w``, ``D_p`` (fp32, the lse's layout), the prefix partials and the gradients."""

    def __init__(self, inp: AttentionProblem, layout: Layout, out, lse_w, lse_p, grad_out):
        self.q, self.k, self.v, self.prefix_k, self.prefix_v, self.grad_out = (
            unit_stride_head_dim(t) for t in (inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, grad_out))
        # The kernels index out, lse_w, lse_p and the statistics alike; the forward made them contiguous.
        self.gate, self.out = inp.gate, out
        self.lse_w, self.lse_p = lse_w.contiguous(), lse_p.contiguous()
        self.num_splits = preprocess_splits(layout)
        fp32 = dict(dtype=torch.float32, device=inp.device)
        # Varlen tokens outside every sequence are never written by the kernels: their statistics and
        # gradients must read 0.
        alloc_like = torch.zeros_like if layout.varlen else torch.empty_like
        self.delta_w = alloc_like(self.lse_w)
        self.delta_p = alloc_like(self.lse_p) if layout.prefix_len else None
        partial_shape = (layout.batch * layout.heads_q, self.num_splits)
        if layout.prefix_len:
            self.partial_dpk = torch.empty(partial_shape + (layout.prefix_len, layout.head_dim), **fp32)
            self.partial_dpv = torch.empty_like(self.partial_dpk)
            self.partial_dgamma = torch.empty(partial_shape, **fp32)
        else:
            self.partial_dpk = self.partial_dpv = self.partial_dgamma = None
        alloc = torch.zeros if layout.varlen else torch.empty
        self.dq = alloc(inp.q.shape, dtype=inp.dtype, device=inp.device)
        # Keys no sequence uses (past seqused_k, or after cu_seqlens_k[-1]) are never written by the dk/dv kernel,
        # and with no query row (Sq = 0 or B = 0) it is not launched: those keys get a zero gradient.
        alloc_kv = torch.zeros if layout.varlen or layout.seqused or inp.q.numel() == 0 else torch.empty
        self.dk = alloc_kv(inp.k.shape, dtype=inp.dtype, device=inp.device)
        self.dv = alloc_kv(inp.v.shape, dtype=inp.dtype, device=inp.device)


def preprocess_arguments(inp: AttentionProblem, layout: Layout, buf: BackwardBuffers) -> dict:
    """Every argument of the preprocess kernel but the autotuned tile size."""
    varlen = layout.varlen
    lb, lh = lse_strides(buf.lse_w, varlen)
    gb, gh = broadcast_strides(buf.gate)
    return dict(Q=buf.q, PREFIX_K=buf.prefix_k, PREFIX_V=buf.prefix_v, GATE=buf.gate, OUT=buf.out,
                GRAD_OUT=buf.grad_out, LSE_P=buf.lse_p, DELTA_W=buf.delta_w, DELTA_P=buf.delta_p,
                PARTIAL_DPK=buf.partial_dpk, PARTIAL_DPV=buf.partial_dpv, PARTIAL_DGAMMA=buf.partial_dgamma,
                CU_SEQLENS_Q=inp.cu_seqlens_q, **_strides("q", buf.q, varlen), **_prefix_strides("pk", buf.prefix_k),
                **_prefix_strides("pv", buf.prefix_v), stride_gb=gb, stride_gh=gh,
                **_strides("o", buf.out, varlen), **_strides("do", buf.grad_out, varlen),
                stride_lb=lb, stride_lh=lh, seqlen_q=layout.seqlen_q, prefix_len=layout.prefix_len,
                heads_q=layout.heads_q, group=layout.group, softmax_scale=inp.softmax_scale,
                num_splits=buf.num_splits, seqlen_q_bucket=layout.seqlen_buckets()["seqlen_q_bucket"],
                GATE_TANH=inp.gate_tanh, **_without(layout.common_constexprs(), "SHARED_OFFSETS", "HAS_SEQUSED"))


def dkdv_arguments(inp: AttentionProblem, layout: Layout, buf: BackwardBuffers) -> dict:
    """Every argument of the dk/dv kernel but the autotuned tile sizes."""
    varlen = layout.varlen
    lb, lh = lse_strides(buf.lse_w, varlen)
    constexprs = layout.common_constexprs()
    return dict(Q=buf.q, K=buf.k, V=buf.v, GRAD_OUT=buf.grad_out, LSE_W=buf.lse_w, DELTA_W=buf.delta_w,
                DK=buf.dk, DV=buf.dv, **sequence_arguments(inp), **_strides("q", buf.q, varlen),
                **_strides("k", buf.k, varlen), **_strides("v", buf.v, varlen),
                **_strides("do", buf.grad_out, varlen), **_strides("dk", buf.dk, varlen),
                **_strides("dv", buf.dv, varlen), stride_lb=lb, stride_lh=lh, seqlen_q=layout.seqlen_q,
                seqlen_k=layout.seqlen_k, heads_kv=layout.heads_kv, group=layout.group,
                softmax_scale=inp.softmax_scale, **layout.seqlen_buckets(), CAUSAL=inp.causal,
                **_without(constexprs, "BLOCK_P", "HAS_PREFIX"))


def dq_arguments(inp: AttentionProblem, layout: Layout, buf: BackwardBuffers) -> dict:
    """Every argument of the dq kernel but the autotuned tile sizes."""
    varlen = layout.varlen
    lb, lh = lse_strides(buf.lse_w, varlen)
    gb, gh = broadcast_strides(buf.gate)
    return dict(Q=buf.q, K=buf.k, V=buf.v, PREFIX_K=buf.prefix_k, PREFIX_V=buf.prefix_v, GATE=buf.gate,
                GRAD_OUT=buf.grad_out, LSE_W=buf.lse_w, LSE_P=buf.lse_p, DELTA_W=buf.delta_w,
                DELTA_P=buf.delta_p, DQ=buf.dq, **sequence_arguments(inp), **_strides("q", buf.q, varlen),
                **_strides("k", buf.k, varlen), **_strides("v", buf.v, varlen),
                **_prefix_strides("pk", buf.prefix_k), **_prefix_strides("pv", buf.prefix_v),
                stride_gb=gb, stride_gh=gh, **_strides("do", buf.grad_out, varlen),
                **_strides("dq", buf.dq, varlen), stride_lb=lb, stride_lh=lh, seqlen_q=layout.seqlen_q,
                seqlen_k=layout.seqlen_k, prefix_len=layout.prefix_len, heads_q=layout.heads_q,
                group=layout.group, softmax_scale=inp.softmax_scale, **layout.seqlen_buckets(),
                CAUSAL=inp.causal, GATE_TANH=inp.gate_tanh, **layout.common_constexprs())
