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

from .arguments import BackwardBuffers, dkdv_arguments, dq_arguments, preprocess_arguments
from .autotune import launch
from .backward_dkdv import dkdv_grid, zero_init_attention_backward_dkdv_kernel
from .backward_dq import dq_grid, zero_init_attention_backward_dq_kernel
from .backward_preprocess import preprocess_grid, zero_init_attention_backward_preprocess_kernel
from .layout import Layout, device_guard
from .problem import AttentionProblem

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
