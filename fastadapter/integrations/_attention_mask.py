"""The attention masks Hugging Face hands to an attention layer, and zero-init attention under an explicit mask.

transformers builds one 4D mask per forward (``masking_utils.create_causal_mask``) and gives it to every layer:

* ``None`` when SDPA's own ``is_causal`` is exact: no padding and ``Sq == Sk`` or ``Sq == 1``, or a prefill into an
  empty static cache (``Sk`` > ``Sq``: the tail of the cache is empty). SDPA's ``is_causal`` is *top-left*
  aligned, so in that last case the keys after the first ``Sq`` are never seen (:func:`keys_seen_without_mask`);
* a bool ``[B, 1, Sq, Sk]`` (SDPA: True = may attend) or an additive float ``[B, 1, Sq, Sk]`` (eager: 0 or the
  dtype's minimum) when it is not: left padding, right padding, packed sequences, sliding windows.

:func:`as_explicit_mask` turns a mask that is exactly the bottom-right causal mask (the eager implementation
always builds one) into ``None``, so that it takes the fused causal path. :func:`left_padding` recognises the
causal mask of a left-padded batch (``generate()`` on prompts of different lengths, prefill and every decode step)
and :func:`right_padding` that of a right-padded one (training batches as PEFT users pad them): each row then runs
the fused op on its own keys. Anything else (packed rows, sliding windows) runs :func:`masked_zero_init_attention`,
two SDPA calls that honour the mask exactly. The prefix is never masked
(DESIGN.md §1): the prompt is not a position of the sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _bottom_right_causal(seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """bool ``[Sq, Sk]``: query i may see key j iff ``j <= i + Sk - Sq`` (fastadapter's causal convention)."""
    row = torch.arange(seqlen_q, device=device)[:, None]
    col = torch.arange(seqlen_k, device=device)[None, :]
    return col <= row + (seqlen_k - seqlen_q)


def keys_seen_without_mask(seqlen_q: int, seqlen_k: int) -> int:
    """How many of the ``Sk`` keys the queries may see when the layer got no mask.

    transformers then runs SDPA with ``is_causal = Sq > 1`` (top-left aligned: query i sees keys j <= i), which it
    only does when that is right: ``Sq == Sk``, ``Sq == 1`` (no mask at all), or a prefill into an empty static
    cache whose keys beyond the first ``Sq`` are zeros. Keeping the first ``Sq`` keys in that last case turns
    top-left alignment into fastadapter's bottom-right causal rule.
    """
    return seqlen_q if 1 < seqlen_q < seqlen_k else seqlen_k


def as_explicit_mask(attention_mask, seqlen_q: int, seqlen_k: int) -> Optional[torch.Tensor]:
    """The mask to apply explicitly, or ``None`` when causal attention alone is exact.

    Args:
        attention_mask: what the decoder layer received: ``None``, bool or float ``[B, 1 or H, Sq, Sk']`` with
            ``Sk' >= Sk`` (HF may hand a mask as wide as a static cache; only the first ``Sk`` columns count).
        seqlen_q, seqlen_k: the query length and the number of keys (cache included).

    Returns:
        ``None`` for no mask or exactly the bottom-right causal mask; else the mask cut to ``[..., Sq, Sk]``.

    Raises:
        TypeError: a mask that is not a 4D tensor (a flex-attention ``BlockMask``, or the 2D padding mask of a
            flash-attention implementation), naming what was given.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        kind = type(attention_mask).__name__
        shape = f" of shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor) else ""
        raise TypeError(f"fastadapter's adapted attention needs the 4D attention mask of the 'sdpa' or 'eager' "
                        f"attention implementation (or None), got a {kind}{shape}; load the model with "
                        f"attn_implementation='sdpa' or 'eager'")
    if attention_mask.shape[-2] != seqlen_q or attention_mask.shape[-1] < seqlen_k:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} does not cover {seqlen_q} queries "
                         f"and {seqlen_k} keys")
    mask = attention_mask[..., :seqlen_k]
    causal = _bottom_right_causal(seqlen_q, seqlen_k, mask.device)
    if mask.dtype == torch.bool:
        allowed = mask
        fully_blocking = True
    else:
        # An additive mask is causal only if it adds exactly 0 where allowed and a value that zeroes the
        # probability (-inf, or the dtype's minimum as HF uses) everywhere else.
        allowed = mask == 0
        fully_blocking = bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all())
    # One O(B·Sq·Sk) comparison against attention's O(B·H·Sq·Sk·D): cheap, and it moves eager-mode models and
    # padding-free batches onto the fused path.
    if fully_blocking and bool((allowed == causal).all()):
        return None
    return mask


def _allowed(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """bool ``[B, Sq, Sk]`` (True = may attend) of a mask with one head, or None (several heads, or an additive mask
    with values other than 0 and "blocked")."""
    if mask.shape[1] != 1:
        return None
    if mask.dtype == torch.bool:
        return mask[:, 0]
    if not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        return None
    return mask[:, 0] == 0


def left_padding(mask: torch.Tensor, seqlen_q: int, seqlen_k: int) -> Optional[list[int]]:
    """The left padding of each row when ``mask`` is exactly causal attention over a left-padded batch, else None.

    Row b of such a mask lets query i see key j iff ``pad_b <= j <= i + Sk - Sq``: bottom-right causal over the
    keys ``[pad_b, Sk)``, which is :func:`fastadapter.zero_init_attention` on those keys alone (queries that see no
    key get 0 for their word part there too).

    Args:
        mask: an explicit mask from :func:`as_explicit_mask`, bool or additive ``[B, 1, Sq, Sk]``.
        seqlen_q, seqlen_k: the query length and the number of keys.

    Returns:
        ``[pad_0, ..., pad_{B-1}]``, or None for any other mask (a head dimension other than 1 included).
    """
    allowed = _allowed(mask)
    if allowed is None:
        return None
    # The last query sees every key that is not padding: its first allowed key is the row's padding. A row with
    # no key at all is left to the explicit path.
    last = allowed[:, -1]
    if not bool(last.any(-1).all()):
        return None
    pads = last.int().argmax(-1)
    causal = _bottom_right_causal(seqlen_q, seqlen_k, mask.device)
    keys = torch.arange(seqlen_k, device=mask.device)
    expected = causal[None] & (keys[None, None, :] >= pads[:, None, None])
    if not bool((allowed == expected).all()):
        return None
    return [int(p) for p in pads]


def right_padding(mask: torch.Tensor, seqlen_q: int, seqlen_k: int) -> Optional[list[int]]:
    """The length of each row when ``mask`` is exactly causal self-attention over a right-padded batch, else None.

    Row b of such a mask (``Sq == Sk``, no cache: training and prefill as PEFT users pad) lets query i see key j iff
    ``j <= i`` and ``j < len_b``: the real queries ``[0, len_b)`` attend causally to the real keys, and the padding
    queries ``[len_b, S)`` to all of them — two calls of :func:`fastadapter.zero_init_attention` per row.

    Returns:
        ``[len_0, ..., len_{B-1}]`` (each at least 1), or None for any other mask.
    """
    allowed = _allowed(mask)
    if allowed is None or seqlen_q != seqlen_k:
        return None
    # The last query sees exactly the real keys.
    last = allowed[:, -1]
    lengths = last.sum(-1)
    if not bool((lengths > 0).all()):
        return None
    keys = torch.arange(seqlen_k, device=mask.device)
    causal = _bottom_right_causal(seqlen_q, seqlen_k, mask.device)
    expected = causal[None] & (keys[None, None, :] < lengths[:, None, None])
    if not bool((allowed == expected).all()):
        return None
    return [int(n) for n in lengths]


def masked_zero_init_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                               prefix_v: torch.Tensor, gate: torch.Tensor, mask: torch.Tensor, *,
                               softmax_scale: float, gate_activation: str) -> torch.Tensor:
    """Zero-init attention whose word part follows an explicit mask instead of the causal rule.

        out = softmax(scale · q kᵀ + mask) v  +  γ · softmax(scale · q prefix_kᵀ) prefix_v

    Args:
        q: ``[B, Sq, Hq, D]``; k, v: ``[B, Sk, Hkv, D]``; prefix_k, prefix_v: ``[1 or B, P, Hkv, D]``.
        gate: raw gate ``[Hq]`` or ``[1]``.
        mask: bool (True = may attend) or additive float ``[B or 1, 1 or Hq, Sq, Sk]``.
        softmax_scale, gate_activation: as :func:`fastadapter.zero_init_attention`.

    Returns:
        ``[B, Sq, Hq, D]`` in q's dtype. A query row that may see no word gets 0 for its word part (PyTorch's
        SDPA convention, and DESIGN.md's), so left-padding rows stay finite.
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
    if prefix_k.shape[1] > 0:
        batch = q.shape[0]
        pkh = prefix_k.transpose(1, 2).expand(batch, -1, -1, -1)
        pvh = prefix_v.transpose(1, 2).expand(batch, -1, -1, -1)
        out_p = F.scaled_dot_product_attention(qh, pkh, pvh, scale=softmax_scale, enable_gqa=True)
        gamma = torch.tanh(gate.float()) if gate_activation == "tanh" else gate.float()
        out = out + gamma.to(out.dtype).reshape(1, -1, 1, 1) * out_p
    return out.transpose(1, 2)
