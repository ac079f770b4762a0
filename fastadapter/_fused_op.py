"""The ``torch.library`` custom ops that run a fused backend's forward and backward kernels.

``fastadapter::fused_attention_forward`` returns ``(out, lse_w, lse_p)``; its autograd formula calls
``fastadapter::fused_attention_backward``, which returns every gradient from the saved inputs, output and
log-sum-exps (never an ``S×S`` tensor). Both have fake implementations, so ``torch.compile(fullgraph=True)``
traces through them. The backend is a string argument: the op looks it up in the registry at run time.

The ragged arguments travel as they are in :class:`~fastadapter._inputs.AttentionInputs`: ``cu_seqlens_q`` and
``cu_seqlens_k`` (None in dense mode; one tensor passed twice when q and k share offsets, which the backends see
again as the same tensor), ``seqused_k``, ``max_seqlen_q`` and ``max_seqlen_k`` (0 in dense mode).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._inputs import AttentionInputs
from .backends import get_backend


def _inputs(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
            causal, scale, gate_tanh):
    if cu_seqlens_q is not None and cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens_q \
            and cu_seqlens_k.data_ptr() == cu_seqlens_q.data_ptr() and cu_seqlens_k.shape == cu_seqlens_q.shape:
        cu_seqlens_k = cu_seqlens_q  # one tensor given twice (the op's schema passes aliases as two arguments)
    return AttentionInputs(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, gate=gate, causal=causal,
                           softmax_scale=scale, gate_tanh=gate_tanh, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                           seqused_k=seqused_k)


@torch.library.custom_op("fastadapter::fused_attention_forward", mutates_args=())
def fused_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, gate: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                            cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor],
                            max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, gate_tanh: bool,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of a fused backend: ``out`` (q's shape, contiguous) and fp32 ``lse_w, lse_p``
    (``[B, Hq, Sq]``, or ``[Hq, Tq]`` in varlen mode). ``gate`` is fp32 ``[Bg, Hq]``."""
    inp = _inputs(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                  max_seqlen_k, causal, scale, gate_tanh)
    return get_backend(backend).forward(inp)


@fused_attention_forward.register_fake
def _(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal,
      scale, gate_tanh, backend):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return (q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32),
            q.new_empty(lse_shape, dtype=torch.float32))


@torch.library.custom_op("fastadapter::fused_attention_backward", mutates_args=())
def fused_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             prefix_k: torch.Tensor, prefix_v: torch.Tensor, gate: torch.Tensor,
                             out: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
                             cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                             seqused_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                             scale: float, gate_tanh: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor]:
    """Backward of a fused backend: ``(dq, dk, dv, dprefix_k, dprefix_v, dgate)``."""
    inp = _inputs(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                  max_seqlen_k, causal, scale, gate_tanh)
    return tuple(get_backend(backend).backward(inp, out, lse_w, lse_p, grad_out))


@fused_attention_backward.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, gate, out, lse_w, lse_p, cu_seqlens_q, cu_seqlens_k, seqused_k,
      max_seqlen_q, max_seqlen_k, causal, scale, gate_tanh, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape), gate.new_empty(gate.shape))


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal,
     scale, gate_tanh, backend) = inputs
    out, lse_w, lse_p = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, out, lse_w, lse_p, cu_seqlens_q, cu_seqlens_k,
                          seqused_k)
    ctx.options = (max_seqlen_q, max_seqlen_k, causal, scale, gate_tanh, backend)


def _backward(ctx, grad_out, _grad_lse_w, _grad_lse_p):
    q, k, v, prefix_k, prefix_v, gate, out, lse_w, lse_p, cu_seqlens_q, cu_seqlens_k, seqused_k = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, causal, scale, gate_tanh, backend = ctx.options
    grads = fused_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, gate, out, lse_w, lse_p, cu_seqlens_q,
                                     cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                     gate_tanh, backend)
    return (*grads, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("fastadapter::fused_attention_forward", _backward, setup_context=_setup_context)


def run_fused(inp: AttentionInputs, backend: str) -> torch.Tensor:
    """Run a fused backend on validated inputs; returns ``out``.

    Through the custom op when autograd or ``torch.compile`` needs it; otherwise (inference, decoding) the
    backend's forward is called directly, which saves the custom op's dispatch (~40 µs a call on CPU, a sixth of
    a decode step at LLaMA-7B's heads over 512 cached tokens).
    """
    tensors = (inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad and not torch.compiler.is_compiling():
        return get_backend(backend).forward(inp)[0]
    out, _, _ = fused_attention_forward(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate,
                                        inp.cu_seqlens_q, inp.cu_seqlens_k, inp.seqused_k, inp.max_seqlen_q,
                                        inp.max_seqlen_k, inp.causal, inp.softmax_scale, inp.gate_tanh, backend)
    return out
