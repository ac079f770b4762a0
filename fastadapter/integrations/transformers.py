"""LLaMA-Adapter on Hugging Face models: ``apply_adapter``, ``remove_adapter``, ``save_adapter``, ``load_adapter``.

Patch point. Each adapted layer's ``self_attn`` is replaced by an :class:`AdapterAttention` that takes over the
layer's own ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (same objects, same state-dict names) and adds a
:class:`~fastadapter.model.layer_adapter.LayerAdapter` (prompt ``[P, hidden]`` and zero-init gate) under
``self_attn.adapter``. Why a module and not a function registered with transformers' ``AttentionInterface``:

* the prefix must be projected by *this layer's* ``k_proj``/``v_proj`` and added inside the attention, so the
  work belongs to the layer; an attention function would have to find its prompt through the module anyway;
* the attention implementation is one setting of the whole model (``config._attn_implementation``); switching
  it would also change the lower, unadapted layers and the masks they get, while the brief is to leave them
  untouched: they keep running whatever the model was loaded with (sdpa, eager);
* the model's ``forward``, ``generate()``, caches and gradient checkpointing stay the model's own: only the
  attention of the adapted layers changes, and ``remove_adapter`` puts the original modules back.

Masks: with no padding the layer receives no mask (sdpa) or exactly the causal one (eager) and runs the fused
causal path; a left- or right-padded batch is read once per forward into ragged offsets and runs the fused op in
one varlen call per layer (two for right padding); packed sequences and sliding windows that cut run an exact
masked composition (see :mod:`._attention_mask`).

Adapter files are fastadapter's (``fastadapter.adapters.adapter_file``): an adapter trained on a Hugging Face model
loads into fastadapter's thin LLaMA built from the same weights, and back (same base-model fingerprint).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..adapters.adapter import AdapterConfig, copy_adapter_tensors, read_adapter, write_adapter
from ..adapters.adapter_file import base_model_fingerprint, exact_base_model_fingerprint
from ..model.layer_adapter import LayerAdapter
from ._llama_pattern import check_llama_pattern, llama_pattern_attention
from ._versions import require_supported_version

_log = logging.getLogger("fastadapter.integrations")

__all__ = ["AdapterAttention", "apply_adapter", "remove_adapter", "adapted_layers", "save_adapter", "load_adapter"]

# Plain attributes of the Llama-pattern attention classes that their forward (and transformers' bookkeeping)
# reads; copied onto the replacement.
_ATTRIBUTES = ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
               "is_causal", "sliding_window", "layer_type", "is_sliding", "use_rope", "attn_logit_softcapping")


class AdapterAttention(nn.Module):
    """A Hugging Face attention layer of the Llama pattern with LLaMA-Adapter's prompt and gate.

    Holds the original layer's projections under their own names, so the base weights keep their state-dict keys
    (``…self_attn.q_proj.weight``) and the new parameters are ``…self_attn.adapter.prompt [P, hidden]`` and
    ``…self_attn.adapter.gate [Hq] or [1]`` (fp32).

    ``forward(hidden_states [B, S, hidden], position_embeddings, attention_mask, past_key_values, **kwargs)``
    returns ``(output [B, S, hidden], None)`` like the module it replaces (no attention weights: the fused kernel
    never forms them).
    """

    def __init__(self, base: nn.Module, adapter: LayerAdapter):
        super().__init__()
        self._spec = check_llama_pattern(base)
        for name in _ATTRIBUTES:
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        if self._spec.norms:
            self.q_norm, self.k_norm = base.q_norm, base.k_norm
        self.adapter = adapter
        # The original module, outside the module tree (its weights are the ones above): remove_adapter puts it
        # back.
        self.__dict__["base_attention"] = base

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, past_key_values=None, **kwargs):
        if position_embeddings is None:
            raise ValueError("AdapterAttention needs the (cos, sin) position_embeddings that the decoder layer "
                             "passes (transformers >= 5)")
        out = llama_pattern_attention(self, self._spec, hidden_states, position_embeddings, attention_mask,
                                      past_key_values, self.adapter.prompt, self.adapter.gate,
                                      self.adapter.gate_activation)
        return self.o_proj(out), None

    def extra_repr(self) -> str:
        return f"base={type(self.base_attention).__name__}, layer_idx={self.layer_idx}"


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM or base model (each with a ``self_attn``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(f"{type(model).__name__} has no decoder layers with a self_attn (expected "
                        f"model.get_decoder().layers[i].self_attn, as LlamaForCausalLM, MistralForCausalLM, "
                        f"Qwen2ForCausalLM)")
    return layers


def _model_dims(model: nn.Module) -> dict:
    config = model.config
    return {"dim": config.hidden_size, "n_layers": config.num_hidden_layers,
            "n_heads": config.num_attention_heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "vocab_size": model.get_input_embeddings().weight.shape[0]}


def adapted_layers(model: nn.Module) -> dict[int, AdapterAttention]:
    """``{layer index: AdapterAttention}`` of every adapted layer of ``model`` (empty when none)."""
    return {i: layer.self_attn for i, layer in enumerate(_decoder_layers(model))
            if isinstance(layer.self_attn, AdapterAttention)}


def remove_adapter(model: nn.Module) -> nn.Module:
    """Put the original attention modules back (in place; the base weights were never copied) and give every base
    parameter the ``requires_grad`` that :func:`apply_adapter` found."""
    for layer in _decoder_layers(model):
        if isinstance(layer.self_attn, AdapterAttention):
            # The original was outside the module tree: give it the mode the model is in now.
            layer.self_attn = layer.self_attn.base_attention.train(layer.self_attn.training)
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    found = model.__dict__.pop(_REQUIRES_GRAD_FOUND, None)
    if found is not None:
        for name, parameter in model.named_parameters():
            if name in found:
                parameter.requires_grad_(found[name])
    return model


#: Attribute of an adapted model: ``{parameter name: requires_grad}`` as :func:`apply_adapter` found them.
_REQUIRES_GRAD_FOUND = "_fastadapter_requires_grad_found"


def apply_adapter(model: nn.Module, prompt_len: int = 10, layers: Union[int, Sequence[int]] = 30,
                  gate_activation: str = "tanh", *, gate_per_head: bool = True) -> nn.Module:
    """Turn a Hugging Face Llama-pattern model into a LLaMA-Adapter model, in place.

    Freezes every base weight; each adapted layer gets a prompt ``[prompt_len, hidden]`` (N(0, 1), fp32) and a
    zero gate (``[Hq]`` with ``gate_per_head``, else ``[1]``, fp32), so the model starts computing what the base
    model computes, to within float rounding (the adapted layers' word attention is fastadapter's kernel: see
    docs/integrations.md, "Zero gates"). Lower layers are untouched. Replaces an adapter applied before.

    Args:
        model: a causal LM (or its base model) whose attention class is on the allowlist of
            :mod:`._llama_pattern`: Llama, Mistral, Qwen2, Qwen3, Gemma2 (without logit soft-capping), Gemma3, Olmo,
            SmolLM3.
        prompt_len: P, prompt tokens per adapted layer.
        layers: the number of top layers to adapt, or an explicit list of layer indices. A number larger than
            the model's layer count adapts every layer, with a note logged on the ``fastadapter`` logger (as
            ``fastadapter train --adapter-layers`` clamps it); the default 30 is the paper's, for LLaMA-7B's 32.
        gate_activation: ``"tanh"`` (the paper's training code) or ``"none"`` (raw gate, PEFT and litgpt).
        gate_per_head: one gate per query head (the paper) or one scalar per layer (PEFT).

    Returns:
        ``model``; its only trainable parameters are ``…layers.{i}.self_attn.adapter.{prompt,gate}``.

    Raises:
        UnsupportedVersionError: a transformers older than the supported ones (a newer one only warns).
        UnsupportedAttentionError: an attention class that is not on the allowlist, or a feature of it that the
            fused op cannot compute (logit soft-capping, fused qkv, bidirectional attention): names both.
        ValueError: bad ``prompt_len`` / ``gate_activation``, ``layers`` not positive, or a list of ``layers``
            naming a layer the model does not have.
    """
    require_supported_version("transformers")
    decoder_layers = _decoder_layers(model)
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > len(decoder_layers):
        _log.warning("apply_adapter: layers=%d but the model has %d layers: adapting all %d", layers,
                  len(decoder_layers), len(decoder_layers))
        layers = len(decoder_layers)
    config = AdapterConfig(prompt_len=prompt_len, layers=layers, gate_activation=gate_activation,
                           gate_per_head=gate_per_head)
    indices = config.layer_indices(len(decoder_layers))
    remove_adapter(model)
    for i in indices:  # check every layer before changing any
        check_llama_pattern(decoder_layers[i].self_attn)
    model.__dict__[_REQUIRES_GRAD_FOUND] = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    dims = _model_dims(model)
    for i in indices:
        base = decoder_layers[i].self_attn
        adapter = LayerAdapter(config.prompt_len, dims["dim"], dims["n_heads"], gate_per_head=config.gate_per_head,
                               gate_activation=config.gate_activation, device=base.q_proj.weight.device)
        decoder_layers[i].self_attn = AdapterAttention(base, adapter)
    model.adapter_config = config
    return model


def _base_model_description(model: nn.Module) -> dict:
    dims = _model_dims(model)
    weight, layers = model.get_input_embeddings().weight, (dims["n_layers"], dims["n_heads"], dims["n_kv_heads"])
    return {"fingerprint": base_model_fingerprint(weight, *layers),
            "exact_fingerprint": exact_base_model_fingerprint(weight, *layers), **dims,
            "family": getattr(model.config, "model_type", None) or "llama"}


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write the prompts and gates of ``model`` (fp32) to the fastadapter adapter file ``path`` (safetensors).

    The file loads into fastadapter's LLaMA (``fastadapter.load_adapter``) built from the same weights, and into
    this model with :func:`load_adapter`.
    """
    adapters = {i: attn.adapter for i, attn in adapted_layers(model).items()}
    write_adapter(path, adapters, _base_model_description(model), what=type(model).__name__)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], *, format: Optional[str] = None,
                 gate_activation: Optional[str] = None) -> nn.Module:
    """Give ``model`` the adapter stored at ``path`` (in place; replaces any adapter it had).

    Args:
        path: a fastadapter adapter file, a PEFT ``adaption_prompt`` folder (or its weights file), a litgpt or an
            original LLaMA-Adapter v1 checkpoint.
        format: ``"fastadapter"``, ``"peft"``, ``"litgpt"`` or ``"llama_adapter_v1"``; detected when None.
        gate_activation: ``"tanh"`` or ``"none"`` for an adapter of another project, overriding its format's
            default (as :func:`fastadapter.adapters.load_adapter`); a fastadapter file keeps the one it records.

    After the call, ``model.adapter_source`` says where the adapter came from, which gate activation it runs
    with, and why (as :func:`fastadapter.adapters.load_adapter`).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``gate_activation`` other than the one a fastadapter file was trained with.
        AdapterFileError: an unreadable file, or one made for another base model (dimensions or fingerprint),
            naming the file and the mismatch.
    """
    read = read_adapter(path, _base_model_description(model), format=format, what=type(model).__name__,
                        gate_activation=gate_activation)
    config = read.config
    apply_adapter(model, config.prompt_len, list(config.layers), config.gate_activation,
                  gate_per_head=config.gate_per_head)
    copy_adapter_tensors({i: attn.adapter for i, attn in adapted_layers(model).items()}, read.tensors)
    model.adapter_source = {"path": read.path, "format": read.format, "gate_activation": config.gate_activation,
                            "gate_activation_reason": read.gate_activation_reason}
    return model
