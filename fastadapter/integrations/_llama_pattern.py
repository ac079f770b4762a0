"""The forward of a Hugging Face attention layer of the Llama pattern, with zero-init attention in the middle.

"Llama pattern": separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` linears (biases allowed), RoPE applied
by the modeling file's ``apply_rotary_pos_emb`` to q and k, keys and values appended to a ``Cache`` with
``update(k, v, layer_idx)``, then softmax attention scaled by ``module.scaling`` and ``o_proj``.

Accepted by allowlist (:data:`SUPPORTED_ATTENTION_CLASSES`): a class is accepted only once its forward was read and
tested here (zero gates equal the base model, non-zero gates equal an independent reference in
tests/integrations/test_integrations_models.py); any other class is refused with
:class:`UnsupportedAttentionError`, because a forward with the same submodules can still compute something else
(Olmo clips q, k, v; SmolLM3 skips RoPE on some layers). The features of the accepted classes that change
attention are read from the module and its config by :func:`check_llama_pattern` and either applied or refused:

* q/k norms (Qwen3, Gemma3: ``q_norm``/``k_norm`` RMSNorms over the head dimension, before RoPE): applied to the
  queries and keys, and ``k_norm`` to the prompt's keys too (the prompt goes through the layer's key path, RoPE
  excepted);
* qkv clipping (Olmo ``config.clip_qkv``): q, k, v clamped to ``[-clip, clip]``, the prompt's keys and values too;
* no-RoPE layers (SmolLM3 ``config.no_rope_layers``, read as the module's ``use_rope``): RoPE skipped there;
* a softmax scale other than ``1/sqrt(D)`` (Gemma2/3 ``query_pre_attn_scalar``): ``module.scaling`` is used;
* sliding windows (Mistral, Qwen2/3, Gemma2/3): they live in the mask, see :mod:`._attention_mask`;
* refused: logit soft-capping (Gemma2's default ``attn_logit_softcapping=50``: the fused op has no soft-capping of
  the scores; load the config with ``attn_logit_softcapping=None`` to adapt such a model), bidirectional attention
  (``is_causal`` False), fused qkv projections (``qkv_proj``, ``c_attn``, ``W_pack``, ``query_key_value``: the
  prompt's keys would be read from rows of one weight, which is where litgpt went wrong) and any other submodule.

Both integrations run the same function: :mod:`.transformers` with fastadapter's own prompt and gate,
:mod:`.peft` with the parameters of PEFT's ``AdaptedAttention``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ._attention_mask import batch_layout, keys_seen_without_mask

#: Attention classes whose forward :func:`llama_pattern_attention` reproduces, each tested.
SUPPORTED_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                               "Gemma2Attention", "Gemma3Attention", "OlmoAttention", "SmolLM3Attention")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORMS = ("q_norm", "k_norm")
_FUSED_QKV = ("qkv_proj", "c_attn", "W_pack", "query_key_value", "Wqkv")
_REQUIRED_ATTRIBUTES = ("config", "layer_idx", "head_dim", "scaling")


class UnsupportedAttentionError(TypeError):
    """An attention module whose computation fastadapter cannot take over."""


@dataclass(frozen=True)
class AttentionSpec:
    """What an accepted attention class does around its softmax, read once by :func:`check_llama_pattern`.

    Attributes:
        rotary: its modeling file's ``apply_rotary_pos_emb``.
        use_rope: False on SmolLM3's no-RoPE layers.
        clip_qkv: Olmo's clamp of q, k and v (None: no clamp).
        norms: whether the module has ``q_norm`` and ``k_norm`` (Qwen3, Gemma3).
    """

    rotary: Callable
    use_rope: bool = True
    clip_qkv: Optional[float] = None
    norms: bool = False


def check_llama_pattern(attn: nn.Module) -> AttentionSpec:
    """Check that ``attn`` is an accepted attention layer; return what its forward does around the softmax.

    Raises:
        UnsupportedAttentionError: naming the class, why it is refused, and the supported classes.
    """
    name = type(attn).__name__
    supported = ", ".join(SUPPORTED_ATTENTION_CLASSES)
    children = {child for child, _ in attn.named_children()}
    config = getattr(attn, "config", None)
    problems = []
    fused = sorted(children & set(_FUSED_QKV))
    if fused:
        problems.append(f"a fused qkv projection {fused} (the prompt's keys and values would be read from rows of "
                        f"one weight; fastadapter needs separate q_proj, k_proj, v_proj)")
    missing = [p for p in _PROJECTIONS if not isinstance(getattr(attn, p, None), nn.Linear)]
    if missing and not fused:
        problems.append(f"no nn.Linear {missing}")
    extra = sorted(children - set(_PROJECTIONS) - set(_NORMS) - set(_FUSED_QKV))
    if extra:
        problems.append(f"extra submodules {extra} that the Llama pattern does not apply")
    norms = [n for n in _NORMS if n in children]
    if norms and len(norms) != 2:
        problems.append(f"only {norms} of q_norm and k_norm")
    missing = [a for a in _REQUIRED_ATTRIBUTES if not hasattr(attn, a)]
    if missing:
        problems.append(f"no attribute {missing}")
    softcap = getattr(attn, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
    if softcap:
        problems.append(f"logit soft-capping (attn_logit_softcapping={softcap}): the fused op has no soft-capping of "
                        f"the attention scores; set config.attn_logit_softcapping = None to adapt it without")
    if not getattr(attn, "is_causal", True):
        problems.append("bidirectional (non-causal) attention")
    rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if rotary is None:
        problems.append(f"no apply_rotary_pos_emb in its module {type(attn).__module__}")
    if name not in SUPPORTED_ATTENTION_CLASSES:
        problems.append("not one of the classes whose forward fastadapter reproduces and tests (a class of the "
                        "same structure may still compute something else: clipping, skipped RoPE, …)")
    if problems:
        raise UnsupportedAttentionError(f"attention class {name} cannot be adapted: {'; '.join(problems)}. "
                                        f"Supported attention classes: {supported}")
    clip = getattr(config, "clip_qkv", None) if name == "OlmoAttention" else None
    return AttentionSpec(rotary=rotary, use_rope=bool(getattr(attn, "use_rope", True)),
                         clip_qkv=float(clip) if clip is not None else None, norms=bool(norms))


def _clip(x: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    return x if spec.clip_qkv is None else x.clamp(-spec.clip_qkv, spec.clip_qkv)


def project_prompt(attn: nn.Module, spec: AttentionSpec, prompt: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaption prompt ``[P, hidden]`` through the layer's frozen key and value path (``k_proj``/``v_proj``
    with their biases, the qkv clamp, ``k_norm``; no RoPE): ``prefix_k, prefix_v [1, P, Hkv, D]``.

    ``dtype`` is the compute dtype, the hidden states' — never the projection weight's dtype, which for a
    quantized model is its storage dtype (``uint8`` for bitsandbytes' 4-bit weights)."""
    prompt = prompt.to(dtype)
    shape = (1, prompt.shape[0], -1, attn.head_dim)
    prefix_k = _clip(attn.k_proj(prompt), spec).view(shape)
    prefix_v = _clip(attn.v_proj(prompt), spec).view(shape)
    if spec.norms:
        prefix_k = attn.k_norm(prefix_k)
    return prefix_k, prefix_v


def llama_pattern_attention(attn: nn.Module, spec: AttentionSpec, hidden_states: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor],
                            attention_mask: Optional[torch.Tensor], past_key_values, prompt: torch.Tensor,
                            gate: torch.Tensor, gate_activation: str) -> torch.Tensor:
    """The adapted layer's attention output, before ``o_proj``: ``[B, S, Hq·D]``, with one fused op call for any
    padding (two for right padding: the padding queries apart, see :mod:`._attention_mask`).

    Args:
        attn: the Hugging Face attention module whose projections, norms, ``scaling`` and ``layer_idx`` are used.
        spec: what :func:`check_llama_pattern` read from it.
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
    q = _clip(attn.q_proj(hidden_states), spec).view(shape)
    k = _clip(attn.k_proj(hidden_states), spec).view(shape)
    v = _clip(attn.v_proj(hidden_states), spec).view(shape)
    if spec.norms:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if spec.use_rope:
        cos, sin = position_embeddings
        q, k = spec.rotary(q, k, cos, sin, unsqueeze_dim=2)
    if past_key_values is not None:
        # The cache stores [B, Hkv, S, D]; its result is read back as a strided [B, Sk, Hkv, D] view (no copy).
        k, v = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    prefix_k, prefix_v = project_prompt(attn, spec, prompt, hidden_states.dtype)

    if attention_mask is None:
        seen = keys_seen_without_mask(seqlen, k.shape[1])
        k, v = k[:, :seen], v[:, :seen]
    layout = batch_layout(attention_mask, seqlen, k.shape[1])
    out = layout.attention(q, k, v, prefix_k, prefix_v, gate, softmax_scale=attn.scaling,
                           gate_activation=gate_activation)
    return out.reshape(batch, seqlen, -1)
