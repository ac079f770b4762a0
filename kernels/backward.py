"""The backward pass of zero-init attention: three kernel launches and a tiny torch reduction.

1. :mod:`.backward_preprocess`: ``D_w``, ``D_p`` per query row and per-program partial sums of
   ``dprefix_k``, ``dprefix_v`` and ``dγ``;
2. :mod:`.backward_dkdv`: ``dk``, ``dv`` (GQA group summed in registers);
3. :mod:`.backward_dq`: ``dq``, word and prefix parts.

Every probability is recomputed from the saved log-sum-exps; no ``S × S`` tensor exists at any point. The
launcher sums the prefix partials over splits, the heads of each kv group and (for a prompt shared by the
batch) the batch, and turns ``dγ`` into ``dgate``.
"""
from __future__ import annotations

import torch
import triton

from .backward_dkdv import dkdv_grid, zero_init_attention_backward_dkdv_kernel
from .backward_dq import dq_grid, zero_init_attention_backward_dq_kernel
from .backward_preprocess import preprocess_grid, zero_init_attention_backward_preprocess_kernel
from .configs import candidates, launch
from .layout import (Layout, broadcast_strides, device_guard, lse_strides, row_strides, sequence_arguments,
                     unit_stride_head_dim)
from .problem import AttentionProblem

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


def _reduce_prefix_gradients(inp: AttentionProblem, layout: Layout, buf: BackwardBuffers):
    """``dprefix_k, dprefix_v [Bp, P, Hkv, D]`` and ``dgate`` fp32 ``[Bg, Hq]`` from the kernels' partials."""
    batch, heads_kv, group = layout.batch, layout.heads_kv, layout.group
    if not layout.prefix_len:
        empty_prefix = torch.zeros(inp.prefix_k.shape, dtype=inp.dtype, device=inp.device)
        return empty_prefix, empty_prefix.clone(), torch.zeros(inp.gate.shape, dtype=torch.float32,
                                                               device=inp.device)

    def prefix_grad(partial: torch.Tensor) -> torch.Tensor:
        # [B·Hq, splits, P, D] -> sum splits and group heads -> [B, Hkv, P, D] -> batch when shared -> [Bp, P, Hkv, D]
        grad = partial.view(batch, heads_kv, group, buf.num_splits, layout.prefix_len, layout.head_dim)
        grad = grad.sum(dim=(2, 3))
        if inp.prefix_k.shape[0] == 1:
            grad = grad.sum(dim=0, keepdim=True)
        # Contiguous, as the op's fake implementation promises (torch.compile checks the strides).
        return grad.permute(0, 2, 1, 3).to(inp.dtype).contiguous()

    dgamma = buf.partial_dgamma.view(batch, layout.heads_q, buf.num_splits).sum(dim=2)  # [B, Hq]
    if inp.gate.shape[0] == 1:
        dgamma = dgamma.sum(dim=0, keepdim=True)
    dgate = dgamma * (1.0 - torch.tanh(inp.gate) ** 2) if inp.gate_tanh else dgamma
    return prefix_grad(buf.partial_dpk), prefix_grad(buf.partial_dpv), dgate


def attention_backward(inp: AttentionProblem, out: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
                       grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every gradient of zero-init attention from the saved inputs, output and log-sum-exps.

    Args:
        inp: the :class:`~.problem.AttentionProblem` of the forward call.
        out: the forward output (q's shape).
        lse_w, lse_p: the forward's fp32 log-sum-exps, shape ``inp.lse_shape()``.
        grad_out: the incoming gradient, q's shape (any strides with a unit-stride head dim).

    Returns:
        ``(dq, dk, dv, dprefix_k, dprefix_v, dgate)``, all contiguous: the first five in the inputs' shapes
        and dtype, ``dgate`` fp32 ``[Bg, Hq]`` like ``inp.gate``.
    """
    layout = Layout.of(inp)
    buf = BackwardBuffers(inp, layout, out, lse_w, lse_p, grad_out.to(inp.dtype))
    if inp.q.numel() and layout.batch:
        batch_heads = layout.batch * layout.heads_q
        with device_guard(inp.device):
            launch("backward_preprocess", zero_init_attention_backward_preprocess_kernel,
                   preprocess_grid(buf.num_splits, batch_heads), preprocess_arguments(inp, layout, buf))
            if inp.k.numel():
                launch("backward_dkdv", zero_init_attention_backward_dkdv_kernel,
                       dkdv_grid(layout.seqlen_k, layout.batch * layout.heads_kv), dkdv_arguments(inp, layout, buf))
            launch("backward_dq", zero_init_attention_backward_dq_kernel, dq_grid(layout.seqlen_q, batch_heads),
                   dq_arguments(inp, layout, buf))
    elif buf.partial_dgamma is not None:  # no query row: every prefix partial is 0
        for partial in (buf.partial_dpk, buf.partial_dpv, buf.partial_dgamma):
            partial.zero_()
    dprefix_k, dprefix_v, dgate = _reduce_prefix_gradients(inp, layout, buf)
    return buf.dq, buf.dk, buf.dv, dprefix_k, dprefix_v, dgate
