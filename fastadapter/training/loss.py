"""The loss of a training step and of an evaluation: the summed cross-entropy of a packed batch's loss tokens,
with the output head fused into the cross-entropy in chunks of tokens (no ``[T, V]`` logits tensor held), or the
plain full-logits reference."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX
from .fsdp import is_sharded
from .linear_cross_entropy import linear_cross_entropy
from .packing import PackedBatch


def _language_model(model: nn.Module):
    """The model that holds the output head (a multimodal model wraps its language model as ``.llama``)."""
    return getattr(model, "llama", model)


def fuses_head_and_loss(model: nn.Module) -> bool:
    """Whether :func:`token_loss_sum` fuses ``model``'s head with the cross-entropy: a thin model that can return
    its hidden states, unsharded (a sharded head is gathered only inside the model's own forward)."""
    language = _language_model(model)
    return hasattr(language, "output_weight") and hasattr(language, "config") and not is_sharded(language)


def token_loss_sum(model: nn.Module, batch: PackedBatch, fused: Optional[bool] = None) -> torch.Tensor:
    """The summed cross-entropy of ``batch``'s loss tokens (fp32 scalar).

    The head runs only at the loss tokens (about half of Alpaca's); with ``fused`` (default: when
    :func:`fuses_head_and_loss`), head and cross-entropy run in chunks of tokens
    (:func:`~fastadapter.training.linear_cross_entropy.linear_cross_entropy`), so no ``[T, V]`` logits tensor
    is held; ``fused=False`` is the plain reference: full logits, then ``F.cross_entropy``.
    """
    positions = (batch.labels[0] != IGNORE_INDEX).nonzero().squeeze(1)
    labels = batch.labels[0, positions]
    # Every batch says what else the model takes besides its tokens (images: fastadapter.training.image_data).
    extra = batch.extra_inputs()
    call = dict(cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen, logits_positions=positions, **extra)
    if fused is None:
        fused = fuses_head_and_loss(model)
    if not fused:
        logits = model(batch.tokens, **call)[0]
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    language = _language_model(model)
    hidden = model(batch.tokens, return_hidden=True, **call)[0]
    return linear_cross_entropy(hidden, language.output_weight, labels, language.config.final_logit_softcap)
