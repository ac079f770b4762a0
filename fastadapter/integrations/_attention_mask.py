"""How a padded Hugging Face batch becomes one ragged zero-init attention call per adapted layer.

transformers builds one mask per forward (``masking_utils.create_causal_mask``; one per layer type for models with
sliding layers) and hands the same tensor to every layer:

* ``None`` when SDPA's own ``is_causal`` is exact: no padding and ``Sq == Sk`` or ``Sq == 1``, or a prefill into an
  empty static cache (``Sk`` > ``Sq``: the tail of the cache is empty). SDPA's ``is_causal`` is *top-left*
  aligned, so in that last case the keys after the first ``Sq`` are never seen (:func:`keys_seen_without_mask`);
* a bool ``[B, 1, Sq, Sk]`` (sdpa: True = may attend) or an additive float ``[B, 1, Sq, Sk]`` (eager: 0 or the
  dtype's minimum) otherwise: left padding, right padding, packed sequences, sliding windows.

:func:`batch_layout` reads that mask **once per forward** (the result is kept on the mask tensor, which every
layer shares) and decides, in this one place, how every adapted layer runs:

``causal``
    no mask, or exactly the bottom-right causal one: one dense call.
``left``
    a left-padded batch (``generate()`` on prompts of different lengths: prefill and every decode step; left-padded
    training): one varlen call. q and k are flattened to ``[B·S, H, D]`` without any gather: row b is two
    sequences, its ``pad_b`` padding keys with no query, then its queries over the keys ``[pad_b, Sk)``.
``right``
    a right-padded batch (``Sq == Sk``, training as PEFT users pad): one causal varlen call over the rows' real
    tokens (row b is its ``len_b`` real tokens, then its padding tokens as a sequence of their own), and one
    non-causal varlen call over the padding queries alone, which see every real key of their row.
``masked``
    anything else, with the reason: a mask per head, an additive mask with values other than 0 and "blocked"
    (a soft bias), sliding windows that cut into the causal window, packed sequences (block-diagonal masks), rows
    with no key at all. These run :func:`masked_zero_init_attention`: the op's masked mode (``attn_mask``).

Padding rows (queries that may see no key: left padding's first ``pad_b`` queries at prefill) get exactly what the
unpatched model computes for them, because transformers' loss includes the last padding position of a left-padded
batch (its logits predict the first real token): with a bool mask (sdpa) PyTorch's SDPA gives 0 for the word part,
as the fused op does; with an additive mask (eager) every key gets the same score ``s + min(dtype) == min(dtype)``,
so the softmax is uniform and the word part is the mean of the row's values over all ``Sk`` keys, with the
gradient of a softmax at the uniform point, which :meth:`BatchLayout.attention` adds (:func:`_uniform_words`). The prefix is never masked (DESIGN.md §1): the prompt is not a position of the
sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..attention import zero_init_attention, zero_init_attention_varlen

_CACHE_ATTRIBUTE = "_fastadapter_layouts"


def keys_seen_without_mask(seqlen_q: int, seqlen_k: int) -> int:
    """How many of the ``Sk`` keys the queries may see when the layer got no mask.

    transformers then runs SDPA with ``is_causal = Sq > 1`` (top-left aligned: query i sees keys j <= i), which it
    only does when that is right: ``Sq == Sk``, ``Sq == 1`` (no mask at all), or a prefill into an empty static
    cache whose keys beyond the first ``Sq`` are zeros. Keeping the first ``Sq`` keys in that last case turns
    top-left alignment into fastadapter's bottom-right causal rule.
    """
    return seqlen_q if 1 < seqlen_q < seqlen_k else seqlen_k


def _check_mask(attention_mask, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        kind = type(attention_mask).__name__
        shape = f" of shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor) else ""
        raise TypeError(f"fastadapter's adapted attention needs the 4D attention mask of the 'sdpa' or 'eager' "
                        f"attention implementation (or None), got a {kind}{shape}; load the model with "
                        f"attn_implementation='sdpa' or 'eager'")
    if attention_mask.shape[-2] != seqlen_q or attention_mask.shape[-1] < seqlen_k:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} does not cover {seqlen_q} queries "
                         f"and {seqlen_k} keys")
    return attention_mask[..., :seqlen_k]


def _as_bool(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The bool form (True = may attend) of a bool mask or of an additive one that only adds 0 or "blocked" (-inf,
    or the dtype's minimum as HF uses); None for an additive mask with other values (a soft bias)."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        return None
    return mask == 0


def _allowed(mask: torch.Tensor) -> tuple[Optional[torch.Tensor], str]:
    """bool ``[B, Sq, Sk]`` (True = may attend) of a mask with one head, or ``(None, why not)``."""
    if mask.shape[1] != 1:
        return None, f"a mask per head ({mask.shape[1]} heads)"
    allowed = _as_bool(mask)
    if allowed is None:
        return None, "an additive mask with values other than 0 and 'blocked' (a soft bias)"
    return allowed[:, 0], ""


def _uniform_words(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, Sq', Hq, D]`` fp32: the word part of queries ``q [B, Sq', Hq, D]`` whose every key of
    ``k, v [B, Sk, Hkv, D]`` is blocked by an additive mask, as eager attention computes it.

    Every score is ``s + min(dtype) == min(dtype)``: the softmax is uniform and the output the mean of the values.
    Its gradient is that of the softmax at the uniform point (the mask is a constant, so autograd sends
    ``p (dp - Σ p dp)`` on to the scores, hence to q and k): ``softmax(s - s.detach())`` is exactly that, so when a
    gradient is needed the scores of these queries are formed (``[B, Hq, Sq', Sk]``, padding queries only).
    """
    heads, group = q.shape[2], q.shape[2] // v.shape[2]
    vh = v.float().repeat_interleave(group, dim=2)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return vh.mean(dim=1, keepdim=True).expand(-1, q.shape[1], heads, -1)
    kh = k.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kh) * scale
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores - scores.detach(), dim=-1), vh)


def _causal(seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """bool ``[Sq, Sk]``: query i may see key j iff ``j <= i + Sk - Sq`` (fastadapter's causal convention)."""
    row = torch.arange(seqlen_q, device=device)[:, None]
    col = torch.arange(seqlen_k, device=device)[None, :]
    return col <= row + (seqlen_k - seqlen_q)


def _offsets(*parts: torch.Tensor) -> torch.Tensor:
    """int32 ``[2B+1]`` offsets of sequences whose lengths alternate ``parts[0][b], parts[1][b]`` row by row."""
    lengths = torch.stack(parts, dim=1).reshape(-1)
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


@dataclass
class BatchLayout:
    """How the adapted layers of one forward run their attention (see the module docstring).

    Attributes:
        kind: ``"causal"``, ``"left"``, ``"right"`` or ``"masked"``.
        reason: why a ``"masked"`` batch cannot take the fused path (empty otherwise).
        seqlen_q, seqlen_k: the query length and the number of keys this layout was made for.
        mask: the explicit mask ``[B, 1 or H, Sq, Sk]`` (``"masked"`` only).
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: the main varlen call (``"left"``, ``"right"``).
        blind: bool ``[B, n, 1, 1]``: which of the first n queries see no key (``"left"``), when their word part
            is the uniform mean of the row's values (an additive mask, :func:`_uniform_words`); None when it is 0.
        pad_rows: int64 ``[n_pad]`` indices into the flattened ``[B·Sq]`` queries of the padding queries
            (``"right"``), and ``pad_cu_seqlens_q``, ``pad_max_seqlen_q`` of their non-causal call over the real
            keys (its key offsets are ``cu_seqlens_k``).
    """

    kind: str
    seqlen_q: int
    seqlen_k: int
    reason: str = ""
    mask: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    blind: Optional[torch.Tensor] = None
    pad_rows: Optional[torch.Tensor] = None
    pad_cu_seqlens_q: Optional[torch.Tensor] = None
    pad_max_seqlen_q: int = 0

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                  prefix_v: torch.Tensor, gate: torch.Tensor, *, softmax_scale: float,
                  gate_activation: str) -> torch.Tensor:
        """Zero-init attention of one adapted layer under this layout.

        Args:
            q: ``[B, Sq, Hq, D]``; k, v: ``[B, Sk, Hkv, D]`` (cache included; strided views are fine).
            prefix_k, prefix_v: ``[1, P, Hkv, D]``; gate: raw ``[Hq]`` or ``[1]``.
            softmax_scale, gate_activation: as :func:`fastadapter.zero_init_attention`.

        Returns:
            ``[B, Sq, Hq, D]``: what the unpatched model's attention computes for every row, padding included,
            plus the gated prefix part.
        """
        if (q.shape[1], k.shape[1]) != (self.seqlen_q, self.seqlen_k):
            raise ValueError(f"this layout was made for {self.seqlen_q} queries and {self.seqlen_k} keys, got "
                             f"{q.shape[1]} and {k.shape[1]}")
        common = dict(softmax_scale=softmax_scale, gate_activation=gate_activation)
        if self.kind == "causal":
            return zero_init_attention(q, k, v, prefix_k, prefix_v, gate, causal=True, **common)
        if self.kind == "masked":
            return masked_zero_init_attention(q, k, v, prefix_k, prefix_v, gate, self.mask, **common)
        batch, seqlen_q, heads, dim = q.shape
        q_flat = q.reshape(batch * seqlen_q, heads, dim)
        k_flat = k.reshape(batch * self.seqlen_k, k.shape[2], k.shape[3])
        v_flat = v.reshape(batch * self.seqlen_k, v.shape[2], v.shape[3])
        # "right" shares one offsets tensor for q and k (packed self-attention); "left" has two.
        out = zero_init_attention_varlen(q_flat, k_flat, v_flat, prefix_k, prefix_v, gate, self.cu_seqlens_q,
                                         self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k, causal=True,
                                         **common)
        if self.kind == "right" and self.pad_rows.numel():
            pad_out = zero_init_attention_varlen(q_flat.index_select(0, self.pad_rows), k_flat, v_flat, prefix_k,
                                                 prefix_v, gate, self.pad_cu_seqlens_q, self.cu_seqlens_k,
                                                 self.pad_max_seqlen_q, self.max_seqlen_k, causal=False, **common)
            out = out.index_copy(0, self.pad_rows, pad_out)
        out = out.view(batch, seqlen_q, heads, dim)
        if self.blind is not None:
            # The eager softmax of a fully blocked row is uniform over the row's Sk keys (module docstring); those
            # rows are among the first blind.shape[1] queries.
            rows = self.blind.shape[1]
            fix = self.blind * _uniform_words(q[:, :rows], k, v, softmax_scale)
            out = out + F.pad(fix, (0, 0, 0, 0, 0, seqlen_q - rows)).to(out.dtype)
        return out


def batch_layout(attention_mask, seqlen_q: int, seqlen_k: int) -> BatchLayout:
    """The layout of a batch from the mask its layers receive; computed once per mask tensor and shape.

    Args:
        attention_mask: what the decoder layer received: ``None``, bool or additive float ``[B, 1 or H, Sq, Sk']``
            with ``Sk' >= Sk`` (HF may hand a mask as wide as a static cache; only the first ``Sk`` columns count).
        seqlen_q, seqlen_k: the query length and the number of keys (cache included).

    Raises:
        TypeError: a mask that is not a 4D tensor (a flex-attention ``BlockMask``, or the 2D padding mask of a
            flash-attention implementation), naming what was given.
        ValueError: a mask that does not cover ``Sq`` queries and ``Sk`` keys.
    """
    if attention_mask is None:
        return BatchLayout("causal", seqlen_q, seqlen_k)
    # The key includes the tensor's version counter: a mask changed in place is read again.
    key = (seqlen_q, seqlen_k, getattr(attention_mask, "_version", 0))
    cache = getattr(attention_mask, _CACHE_ATTRIBUTE, None)
    if cache is not None and key in cache:
        return cache[key]
    layout = _read_layout(_check_mask(attention_mask, seqlen_q, seqlen_k), seqlen_q, seqlen_k)
    if layout.kind == "masked":
        return layout  # not kept: it holds the mask, which would then keep itself alive
    if cache is None:
        cache = {}
        setattr(attention_mask, _CACHE_ATTRIBUTE, cache)
    cache[key] = layout
    return layout


def _read_layout(mask: torch.Tensor, seqlen_q: int, seqlen_k: int) -> BatchLayout:
    def masked(reason: str) -> BatchLayout:
        return BatchLayout("masked", seqlen_q, seqlen_k, reason=reason, mask=mask)

    allowed, why = _allowed(mask)
    if allowed is None:
        return masked(why)
    device = mask.device
    causal = _causal(seqlen_q, seqlen_k, device)
    if bool((allowed == causal).all()):
        return BatchLayout("causal", seqlen_q, seqlen_k)
    last = allowed[:, -1]  # the last query sees every key of its row that is not padding
    if not bool(last.any(-1).all()):
        return masked("a row with no key at all")
    keys = torch.arange(seqlen_k, device=device)
    batch = mask.shape[0]

    pads = last.int().argmax(-1)  # the first key the last query sees
    if bool((allowed == (causal[None] & (keys[None, None, :] >= pads[:, None, None]))).all()):
        ends = torch.full_like(pads, seqlen_q)
        blind = None
        if mask.dtype != torch.bool:
            rows = torch.arange(seqlen_q, device=device)[None, :]
            blind_rows = rows + (seqlen_k - seqlen_q) < pads[:, None]  # [B, Sq]: queries that see no key
            count = int(blind_rows.sum(-1).max())  # they are the first ones of their row
            blind = blind_rows[:, :count, None, None] if count else None
        return BatchLayout("left", seqlen_q, seqlen_k,
                           cu_seqlens_q=_offsets(torch.zeros_like(pads), ends),
                           cu_seqlens_k=_offsets(pads, seqlen_k - pads), max_seqlen_q=seqlen_q,
                           max_seqlen_k=seqlen_k, blind=blind)

    lengths = last.sum(-1)
    if seqlen_q == seqlen_k and bool((allowed == (causal[None] & (keys[None, None, :] < lengths[:, None, None]))).all()):
        padding = seqlen_k - lengths
        offsets = _offsets(lengths, padding)
        rows = torch.arange(seqlen_q, device=device)[None, :]
        pad_rows = (rows + seqlen_q * torch.arange(batch, device=device)[:, None])[rows >= lengths[:, None]]
        return BatchLayout("right", seqlen_q, seqlen_k, cu_seqlens_q=offsets, cu_seqlens_k=offsets,
                           max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k, pad_rows=pad_rows,
                           pad_cu_seqlens_q=_offsets(padding, torch.zeros_like(padding)),
                           pad_max_seqlen_q=max(int(padding.max()), 1))
    return masked("neither causal nor causal over a left- or right-padded batch (sliding windows that cut, packed "
                  "sequences, or another pattern)")


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
        ``[B, Sq, Hq, D]`` in q's dtype. The word part is PyTorch's SDPA under the mask, as the unpatched sdpa and
        eager models compute it (a fully blocked row: 0 under a bool mask, the uniform mean under an additive one);
        the prefix part is the op's (its masked mode, ``attn_mask``, on the ``sdpa`` backend).
    """
    allowed = _as_bool(mask)
    if allowed is None:  # a soft bias: added to the scores as it is
        return zero_init_attention(q, k, v, prefix_k, prefix_v, gate, causal=False, attn_mask=mask,
                                   softmax_scale=softmax_scale, gate_activation=gate_activation, backend="sdpa")
    # The bool form: a fully blocked row gives 0 forward and backward. (Under the additive form, the gradients of
    # such rows from PyTorch's fused CPU kernel differ from eager's, measured: the backward recomputes their
    # probabilities from a log-sum-exp that rounds to min(dtype).) Eager's uniform softmax of such rows is added.
    out = zero_init_attention(q, k, v, prefix_k, prefix_v, gate, causal=False, attn_mask=allowed,
                              softmax_scale=softmax_scale, gate_activation=gate_activation, backend="sdpa")
    blind = ~allowed.any(dim=-1, keepdim=True) if mask.dtype != torch.bool else None  # [B, 1 or H, Sq, 1]
    if blind is not None and bool(blind.any()):
        out = out + (blind.transpose(1, 2) * _uniform_words(q, k, v, softmax_scale)).to(out.dtype)
    return out
