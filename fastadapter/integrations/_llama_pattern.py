"""The forward of a Hugging Face attention layer of the Llama pattern, with zero-init attention in the middle.

"Llama pattern": separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` linears (biases allowed), RoPE applied
by the modeling file's ``apply_rotary_pos_emb`` to q and k, keys and values appended to a ``Cache`` with
``update(k, v, layer_idx)``, then softmax attention scaled by ``module.scaling`` and ``o_proj``. The classes below
are the ones this is tested on; a class of another model with the same structure is accepted with a warning, and
anything else (fused ``qkv_proj``, q/k norms, logit soft-capping) is refused by :func:`check_llama_pattern`.

Both integrations run the same function: :mod:`.transformers` with fastadapter's own prompt and gate,
:mod:`.peft` with the parameters of PEFT's ``AdaptedAttention``.
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ..attention import zero_init_attention
from ._attention_mask import (as_explicit_mask, keys_seen_without_mask, left_padding, masked_zero_init_attention,
                              right_padding)

#: Attention classes whose forward :func:`llama_pattern_attention` reproduces, tested in tests/test_integrations*.
SUPPORTED_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_REQUIRED_ATTRIBUTES = ("config", "layer_idx", "head_dim", "scaling")


class UnsupportedAttentionError(TypeError):
    """An attention module whose computation fastadapter cannot take over."""


def check_llama_pattern(attn: nn.Module) -> Callable:
    """Check that ``attn`` is an attention layer of the Llama pattern; return its ``apply_rotary_pos_emb``.

    Raises:
        UnsupportedAttentionError: naming the class, what it lacks, and the supported classes.
    """
    name = type(attn).__name__
    supported = ", ".join(SUPPORTED_ATTENTION_CLASSES)
    children = {child for child, _ in attn.named_children()}
    problems = []
    missing = [p for p in _PROJECTIONS if not isinstance(getattr(attn, p, None), nn.Linear)]
    if missing:
        problems.append(f"no nn.Linear {missing}")
    extra = sorted(children - set(_PROJECTIONS))
    if extra:
        problems.append(f"extra submodules {extra} (e.g. q/k norms) that the Llama pattern does not apply")
    missing = [a for a in _REQUIRED_ATTRIBUTES if not hasattr(attn, a)]
    if missing:
        problems.append(f"no attribute {missing}")
    if getattr(getattr(attn, "config", None), "attn_logit_softcapping", None):
        problems.append("logit soft-capping")
    if not getattr(attn, "is_causal", True):
        problems.append("non-causal attention")
    rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if rotary is None:
        problems.append(f"no apply_rotary_pos_emb in its module {type(attn).__module__}")
    if problems:
        raise UnsupportedAttentionError(f"attention class {name} does not follow the Llama pattern "
                                        f"({'; '.join(problems)}); supported attention classes: {supported}")
    if name not in SUPPORTED_ATTENTION_CLASSES:
        warnings.warn(f"attention class {name} has the structure of the Llama pattern but is not one of the tested "
                      f"classes ({supported}); compare its outputs with the unpatched model before relying on it",
                      stacklevel=3)
    return rotary


def project_prompt(attn: nn.Module, prompt: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaption prompt ``[P, hidden]`` through the layer's frozen ``k_proj``/``v_proj`` (biases included, no
    RoPE): ``prefix_k, prefix_v [1, P, Hkv, D]``.

    ``dtype`` is the compute dtype, the hidden states' — never the projection weight's dtype, which for a
    quantized model is its storage dtype (``uint8`` for bitsandbytes' 4-bit weights)."""
    prompt = prompt.to(dtype)
    shape = (1, prompt.shape[0], -1, attn.head_dim)
    return attn.k_proj(prompt).view(shape), attn.v_proj(prompt).view(shape)


def llama_pattern_attention(attn: nn.Module, rotary: Callable, hidden_states: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor],
                            attention_mask: Optional[torch.Tensor], past_key_values, prompt: torch.Tensor,
                            gate: torch.Tensor, gate_activation: str) -> torch.Tensor:
    """The adapted layer's attention output, before ``o_proj``: ``[B, S, Hq·D]``.

    Args:
        attn: the Hugging Face attention module whose projections, ``scaling`` and ``layer_idx`` are used.
        rotary: its modeling file's ``apply_rotary_pos_emb``.
        hidden_states: ``[B, S, hidden]``.
        position_embeddings: ``(cos, sin)``, each ``[B, S, D]``, from the model's rotary embedding.
        attention_mask: what the decoder layer received (see :mod:`._attention_mask`).
        past_key_values: a transformers ``Cache`` or None.
        prompt: ``[P, hidden]``; gate: raw gate ``[Hq]`` or ``[1]``; gate_activation: ``"tanh"`` or ``"none"``.
    """
    if attn.training and getattr(attn, "attention_dropout", 0.0) > 0:
        raise ValueError(f"{type(attn).__name__} has attention_dropout={attn.attention_dropout}; the fused "
                         f"zero-init attention has no dropout: set config.attention_dropout = 0.0 to train")
    batch, seqlen, _ = hidden_states.shape
    shape = (batch, seqlen, -1, attn.head_dim)
    # Projections straight into the [B, S, H, D] layout of zero_init_attention: no transpose before RoPE.
    q = attn.q_proj(hidden_states).view(shape)
    k = attn.k_proj(hidden_states).view(shape)
    v = attn.v_proj(hidden_states).view(shape)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin, unsqueeze_dim=2)
    if past_key_values is not None:
        # The cache stores [B, Hkv, S, D]; its result is read back as a strided [B, Sk, Hkv, D] view (no copy).
        k, v = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    prefix_k, prefix_v = project_prompt(attn, prompt, hidden_states.dtype)

    if attention_mask is None:
        seen = keys_seen_without_mask(seqlen, k.shape[1])
        k, v = k[:, :seen], v[:, :seen]
    mask = as_explicit_mask(attention_mask, seqlen, k.shape[1])
    if mask is None:
        out = zero_init_attention(q, k, v, prefix_k, prefix_v, gate, causal=True, softmax_scale=attn.scaling,
                                  gate_activation=gate_activation)
    else:
        out = _padded_attention(q, k, v, prefix_k, prefix_v, gate, mask, attn.scaling, gate_activation)
    return out.reshape(batch, seqlen, -1)


def _padded_attention(q, k, v, prefix_k, prefix_v, gate, mask, scale: float, gate_activation: str) -> torch.Tensor:
    """Zero-init attention under an explicit mask ``[B, 1, Sq, Sk]``: left- or right-padded causal batches row by
    row through the fused op (each row on its own keys), any other mask through the two masked SDPA calls."""
    def fused(b: int, rows: slice, keys: slice, causal: bool) -> torch.Tensor:
        pk, pv = (prefix_k, prefix_v) if prefix_k.shape[0] == 1 else (prefix_k[b:b + 1], prefix_v[b:b + 1])
        return zero_init_attention(q[b:b + 1, rows], k[b:b + 1, keys], v[b:b + 1, keys], pk, pv, gate,
                                   causal=causal, softmax_scale=scale, gate_activation=gate_activation)

    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    pads = left_padding(mask, seqlen_q, seqlen_k)
    if pads is not None:
        return torch.cat([fused(b, slice(None), slice(pad, None), True) for b, pad in enumerate(pads)])
    lengths = right_padding(mask, seqlen_q, seqlen_k)
    if lengths is not None:
        # Real queries attend causally to the real keys; padding queries see every real key.
        rows = []
        for b, length in enumerate(lengths):
            parts = [fused(b, slice(0, length), slice(0, length), True)]
            if length < seqlen_q:
                parts.append(fused(b, slice(length, None), slice(0, length), False))
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)
    return masked_zero_init_attention(q, k, v, prefix_k, prefix_v, gate, mask, softmax_scale=scale,
                                      gate_activation=gate_activation)
