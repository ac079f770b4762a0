"""Fused backends: a forward kernel that saves the log-sum-exps and a memory-efficient backward, as one
``torch.library`` custom op per backend.

A :class:`FusedBackend` registers its own ops when it is made: ``fastadapter::<name>_forward`` returns
``(out, lse_w, lse_p)`` and ``fastadapter::<name>_backward`` every gradient from the saved inputs, output and
log-sum-exps (never an ``S×S`` tensor). Both have fake implementations, so ``torch.compile(fullgraph=True)`` traces
through them, and the forward op's autograd formula calls the backward op. The ops carry the
:class:`~fastadapter.kernels.problem.AttentionProblem` as the arguments of
:data:`~fastadapter.kernels.problem.OP_SCHEMA` (its one flattening) and rebuild it inside; nothing is looked up
by name at run time.

A second-order gradient (``create_graph=True``, then a backward through the gradients) is not supported: the
backward op raises a ``NotImplementedError`` that says so.
"""
from __future__ import annotations

import torch

from ..kernels.problem import OP_SCHEMA, AttentionProblem
from .registry import Backend

_GRADIENTS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


class FusedBackend(Backend):
    """A backend of fused kernels. Subclasses set ``name`` and implement :meth:`forward` and :meth:`backward`."""

    fused = True

    def __init__(self):
        self._forward_op = torch.library.custom_op(
            f"fastadapter::{self.name}_forward", self._forward_impl, mutates_args=(),
            schema=f"({OP_SCHEMA}) -> (Tensor, Tensor, Tensor)")
        self._forward_op.register_fake(_forward_fake)
        self._backward_op = torch.library.custom_op(
            f"fastadapter::{self.name}_backward", self._backward_impl, mutates_args=(),
            schema=f"(Tensor grad_out, Tensor out, Tensor lse_w, Tensor lse_p, {OP_SCHEMA}) -> {_GRADIENTS}")
        self._backward_op.register_fake(_backward_fake)
        self._forward_op.register_autograd(self._autograd_backward, setup_context=_setup_context)
        self._backward_op.register_autograd(_no_second_order(self.name), setup_context=_no_context)

    # -- what a fused backend implements
    def forward(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``out`` (q's shape and dtype, contiguous) and fp32 ``lse_w, lse_p`` of shape ``problem.lse_shape()``.

        ``lse_p`` is ``-inf`` when P == 0; ``lse_w`` is ``-inf`` for rows with no visible word key.
        """
        raise NotImplementedError

    def backward(self, problem: AttentionProblem, out: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
                 grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(dq, dk, dv, dprefix_k, dprefix_v, dgate)`` with the shapes of the inputs (``dgate``: fp32, the
        shape of ``problem.gate``, i.e. ``[Bg, Hq]``)."""
        raise NotImplementedError

    # -- the op
    def attention(self, problem: AttentionProblem) -> torch.Tensor:
        """The output, through the custom op when autograd or ``torch.compile`` needs it; otherwise (inference,
        decoding) the forward is called directly, which saves the custom op's dispatch (~40 µs a call on CPU, a
        sixth of a decode step at LLaMA-7B's heads over 512 cached tokens)."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in problem.tensors)
        if not needs_grad and not torch.compiler.is_compiling():
            return self.forward(problem)[0]
        return self._forward_op(*problem.op_arguments())[0]

    def _forward_impl(self, *args):
        return self.forward(AttentionProblem.from_op_arguments(*args))

    def _backward_impl(self, grad_out, out, lse_w, lse_p, *args):
        problem = AttentionProblem.from_op_arguments(*args)
        return tuple(self.backward(problem, out, lse_w, lse_p, grad_out))

    def _autograd_backward(self, ctx, grad_out, _grad_lse_w, _grad_lse_p):
        out, lse_w, lse_p, *tensors = ctx.saved_tensors
        grads = self._backward_op(grad_out, out, lse_w, lse_p, *tensors, *ctx.options)
        return (*grads,) + (None,) * (len(tensors) + len(ctx.options) - len(grads))


def _setup_context(ctx, inputs, output):
    # The nine tensor (or None) arguments first, then the five numbers and flags (OP_SCHEMA's order).
    out, lse_w, lse_p = output
    ctx.save_for_backward(out, lse_w, lse_p, *inputs[:9])
    ctx.options = tuple(inputs[9:])


def _forward_fake(*args):
    problem = AttentionProblem.from_op_arguments(*args)
    q = problem.q
    return (q.new_empty(q.shape), q.new_empty(problem.lse_shape(), dtype=torch.float32),
            q.new_empty(problem.lse_shape(), dtype=torch.float32))


def _backward_fake(grad_out, out, lse_w, lse_p, *args):
    problem = AttentionProblem.from_op_arguments(*args)
    return tuple(t.new_empty(t.shape) for t in problem.tensors)


def _no_context(ctx, inputs, output):
    pass


def _no_second_order(name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"zero_init_attention's {name!r} backend has no second-order gradient: a backward through its "
            f"gradients (torch.autograd.grad(..., create_graph=True), then backward again) is not supported; the "
            f"'reference' backend (plain PyTorch ops) supports it")
    return backward
