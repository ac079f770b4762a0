"""The output head and the token cross-entropy fused, in chunks of tokens: peak memory that does not grow with
vocabulary × tokens.

A training step needs the logits only to turn them into a loss. Computed whole, they are a ``[T, V]`` fp32
tensor, and autograd keeps it (or its softmax) until backward: Gemma-3's 262,144-way head makes that 1 MiB per
loss token, the step's largest tensor by far. :func:`linear_cross_entropy` computes the same summed loss chunk by
chunk of tokens, as Liger-Kernel's fused linear cross-entropy does: each chunk's logits ``[c, V]`` exist only
while that chunk's loss and its gradients are computed, in the forward pass, and only the gradients
(``[T, dim]`` for the hidden states, ``[V, dim]`` for the head when it is trained) are kept for backward. Its
arithmetic is the reference's: one head product per chunk forward, one product per input for its gradient — the
same products the plain path runs in forward and backward, so nothing is recomputed.

For fp32 on the CPU (no soft-capping) a chunk's products take :func:`fastadapter.linear.linear`'s route (oneDNN off
Intel CPUs, MKL on them) and its loss and gradient come from one compiled pass over its logits, in place
(:func:`fastadapter.model.row_kernels.cross_entropy_rows_`): a row stays in cache across its max, exponentials
and scaling, where the eager composition writes four chunk-sized tensors.

:func:`linear_cross_entropy_reference` is the readable version (``F.cross_entropy`` on full logits); the tests
check that both give the same loss and gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..linear import linear
from ..model import row_kernels
from ..onednn_linear import input_gradient
from .data import IGNORE_INDEX

#: Bytes of fp32 logits one chunk may hold (the chunk's token count follows from the vocabulary size).
CHUNK_BYTES = 32 * 2**20
#: Fewest tokens per chunk: every chunk streams the whole ``[V, dim]`` head twice (logits, gradient), and below
#: about 128 rows those products are bound by that stream. Gemma-3's 262,144-way head, 833 loss tokens, one core
#: pair: 32-token chunks (what 32 MiB holds) took 1.5x the time of 128-token chunks, which matched full logits.
MIN_CHUNK_TOKENS = 128


def chunk_tokens_for(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: as many tokens' fp32 logits as fit in ``chunk_bytes``, and at least
    :data:`MIN_CHUNK_TOKENS` (1 MiB of logits per token for Gemma-3: 128 MiB chunks)."""
    return max(MIN_CHUNK_TOKENS, chunk_bytes // (4 * vocab_size))


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: Optional[float]) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [T, dim] and weight [V, dim] with the same dim, got hidden "
                         f"{list(hidden.shape)} and weight {list(weight.shape)}")
    if labels.shape != hidden.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 [T] = [{hidden.shape[0]}], got {labels.dtype} {list(labels.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")


def _logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """Logits ``[T, V]`` in fp32 (fp64 for fp64 inputs); the product in the inputs' dtype, as the model's head
    computes it."""
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   softcap: Optional[float] = None) -> torch.Tensor:
    """The summed cross-entropy of the logits ``hidden @ weight.T`` (soft-capped as ``cap · tanh(z / cap)``
    when ``softcap`` is given) against ``labels``; positions labelled ``IGNORE_INDEX`` count for nothing.

    Args:
        hidden: ``[T, dim]`` final-normed hidden states; weight: ``[V, dim]`` the output head; labels: int64 ``[T]``.

    Returns:
        fp32 scalar (fp64 for fp64 inputs).
    """
    _check(hidden, weight, labels, softcap)
    return F.cross_entropy(_logits(hidden, weight, softcap), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, chunk_tokens, record):
        want_hidden, want_weight = record and ctx.needs_input_grad[0], record and ctx.needs_input_grad[1]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if want_weight else None
        # fp32 on the CPU: the products on fastadapter.linear's route, the loss and its gradient in one pass over
        # each chunk's logits, in place (row_kernels.cross_entropy_rows_).
        compiled_rows = ((want_hidden or want_weight) and softcap is None
                         and row_kernels.runs_row_kernels(hidden, weight))
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h, y = hidden[rows], labels[rows]
            if compiled_rows:
                grad = linear(h, weight).contiguous()  # [c, V]: the only vocabulary-sized tensor, per chunk
                total += row_kernels.cross_entropy_rows_(grad, y, IGNORE_INDEX).sum()
                if want_hidden:
                    grad_hidden[rows] = input_gradient(grad, weight)
                if want_weight:
                    grad_weight += grad.t() @ h
                continue
            logits = _logits(h, weight, softcap)  # [c, V] fp32: the only vocabulary-sized tensor, per chunk
            kept = y != IGNORE_INDEX
            target = torch.where(kept, y, 0)
            log_z = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, target[:, None])[:, 0]
            total += ((log_z - picked) * kept).sum()
            if not (want_hidden or want_weight):
                continue
            # d(loss)/d(logits) = softmax − one-hot, zero on ignored rows; through the cap, × (1 − (z / cap)²).
            grad = torch.exp(logits - log_z[:, None])
            grad.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
            grad *= kept[:, None]
            if softcap is not None:
                grad *= 1 - (logits / softcap) ** 2
            del logits
            if want_hidden:
                grad_hidden[rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight += grad.t() @ h.to(accumulate)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         softcap: Optional[float] = None, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """:func:`linear_cross_entropy_reference`, computed ``chunk_tokens`` tokens at a time.

    Args:
        hidden: ``[T, dim]``; weight: ``[V, dim]``; labels: int64 ``[T]`` (``IGNORE_INDEX``: no loss).
        softcap: Gemma2's final logit soft-capping, or None.
        chunk_tokens: tokens per chunk (default :func:`chunk_tokens_for` the vocabulary: 32 MiB of fp32 logits,
            at least 128 tokens).

    Returns:
        fp32 scalar (fp64 for fp64 inputs): the summed token loss. With gradients recorded, the gradients of
        ``hidden`` (and of ``weight`` when it requires one) are computed chunk by chunk during this call and kept
        for backward, so no ``[T, V]`` tensor is ever held.
    """
    _check(hidden, weight, labels, softcap)
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(weight.shape[0])
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    # Inside the Function's forward grad mode is always off: whether this call records a gradient is decided here.
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, softcap, chunk_tokens,
                                            torch.is_grad_enabled())
