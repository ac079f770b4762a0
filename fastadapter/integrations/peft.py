"""Fused attention for PEFT's ``adaption_prompt`` models: ``accelerate``, ``restore``, ``export_to_peft``.

PEFT (0.21) wraps each adapted ``LlamaAttention`` in an ``AdaptedAttention`` that runs the whole base attention,
then *recomputes* the queries, projects its prompt and runs an eager fp32 prefix softmax and a second ``o_proj``.
:func:`accelerate` gives those modules a forward that computes the same thing in one
:func:`fastadapter.zero_init_attention` call (raw scalar gate: ``gate_activation="none"``):

    o_proj(attn(q, k, v) + gate · softmax(q prefix_kᵀ) prefix_v)   (PEFT: o_proj(attn) + o_proj(gate · …))

(with zero gates: the base model within float rounding, not bit for bit; docs/integrations.md, "Zero gates")

How: each ``AdaptedAttention`` instance becomes a :class:`FusedAdaptedAttention`, a subclass that only overrides
``forward``. The instance keeps its parameters (``adaption_prompt [1, P, hidden]``, ``adaption_gate [1]``), its
wrapped module and its place in PEFT's bookkeeping (the active layers *and* the ones PEFT caches for inactive
adapters), so optimisers, ``save_pretrained``, ``set_adapter`` and ``disable_adapter`` see no difference.
:func:`restore` turns them back.

:func:`export_to_peft` goes the other way: a fastadapter adapter whose form PEFT can express (one scalar raw gate
per layer, the top layers) written as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.
"""
from __future__ import annotations

import os
from typing import Union

from torch import nn

from ..adapters.adapter_file import read_adapter_file
from ._llama_pattern import UnsupportedAttentionError, check_llama_pattern, llama_pattern_attention
from ._versions import require_supported_version

require_supported_version("peft")

from peft.tuners.adaption_prompt.layer import AdaptedAttention, _BaseAdaptedAttention  # noqa: E402
from peft.tuners.adaption_prompt.model import AdaptionPromptModel  # noqa: E402

__all__ = ["FusedAdaptedAttention", "FusedAdaptionPromptModel", "accelerate", "restore", "export_to_peft"]


class FusedAdaptedAttention(AdaptedAttention):
    """PEFT's ``AdaptedAttention`` computing its output with one fused zero-init attention call.

    Same parameters, same wrapped module (``self.model``), same outputs within dtype tolerance; the forward takes
    the keyword arguments the decoder layer passes (``hidden_states [B, S, hidden]``, ``position_embeddings``,
    ``attention_mask``, ``past_key_values``) and returns ``(output [B, S, hidden], None)``.
    """

    def forward(self, **kwargs):
        if kwargs.get("output_attentions", False):
            raise NotImplementedError("output_attentions is not supported by the fused attention (no weights are "
                                      "formed); call fastadapter.integrations.peft.restore(model) first")
        base = self.model
        spec = self.__dict__.get("_spec") or check_llama_pattern(base)
        out = llama_pattern_attention(base, spec, kwargs["hidden_states"], kwargs["position_embeddings"],
                                      kwargs.get("attention_mask"), kwargs.get("past_key_values"),
                                      self.adaption_prompt[0], self.adaption_gate, "none")
        out = base.o_proj(out)
        if base.o_proj.bias is not None:
            # PEFT applies o_proj, bias included, to the word and to the prefix output separately: the bias
            # counts twice there, and must here too for the outputs to match.
            out = out + base.o_proj.bias
        return out, None


#: The attention classes whose PEFT ``AdaptedAttention`` forward :class:`FusedAdaptedAttention` reproduces: PEFT
#: recomputes the queries as ``q_proj`` + RoPE and scales the prefix scores by ``1/sqrt(head_dim)``, which is the
#: class's own attention only for these (no q/k norms, clipping or skipped RoPE, the standard scale).
PEFT_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")

_GPT2_REASON = ("PEFT's AdaptedAttentionGPT (GPT-2) adds the prefix attention to the output of GPT-2's c_proj, "
                "unprojected, while the word attention goes through c_proj: the two parts cannot come out of one "
                "fused attention output (and GPT-2's fused c_attn Conv1D is not the Llama pattern); GPT-2 keeps "
                "running PEFT's own code")


def _adaption_prompt_model(peft_model: nn.Module) -> AdaptionPromptModel:
    """The ``AdaptionPromptModel`` inside a ``PeftModel`` (or the model itself)."""
    candidate = getattr(peft_model, "base_model", peft_model)
    if isinstance(peft_model, AdaptionPromptModel):
        candidate = peft_model
    if not isinstance(candidate, AdaptionPromptModel):
        raise TypeError(f"expected a PEFT model made with AdaptionPromptConfig (its base_model an "
                        f"AdaptionPromptModel), got {type(peft_model).__name__} wrapping "
                        f"{type(candidate).__name__}")
    return candidate


def _adapted_attentions(adaption_model: AdaptionPromptModel) -> list[_BaseAdaptedAttention]:
    """Every adapted attention module: those in the model and those PEFT caches for inactive adapters."""
    found = [m for m in adaption_model.model.modules() if isinstance(m, _BaseAdaptedAttention)]
    for cached in adaption_model._cached_adapters.values():
        found.extend(m for m in cached if isinstance(m, _BaseAdaptedAttention))
    return found


def _check_acceleratable(module: _BaseAdaptedAttention):
    """The :class:`AttentionSpec` of an adapted attention that :class:`FusedAdaptedAttention` can run, else raise
    :class:`UnsupportedAttentionError` with the reason."""
    supported = ", ".join(PEFT_ATTENTION_CLASSES)
    if not isinstance(module, AdaptedAttention):
        reason = _GPT2_REASON if type(module).__name__ == "AdaptedAttentionGPT" else "not PEFT's AdaptedAttention"
        raise UnsupportedAttentionError(f"{type(module).__name__} cannot be accelerated: {reason}. Supported: PEFT's "
                                        f"AdaptedAttention over {supported}")
    name = type(module.model).__name__
    spec = check_llama_pattern(module.model)
    if name not in PEFT_ATTENTION_CLASSES or abs(module.model.scaling * module.model.head_dim ** 0.5 - 1) > 1e-6:
        raise UnsupportedAttentionError(f"AdaptedAttention over {name} cannot be accelerated: PEFT computes its "
                                        f"prefix queries as q_proj + RoPE scaled by 1/sqrt(head_dim), which is not "
                                        f"what {name} computes, so the fused op would not reproduce PEFT; "
                                        f"supported: AdaptedAttention over {supported} (fastadapter.integrations."
                                        f"transformers.apply_adapter adapts {name} exactly)")
    return spec


def _accelerate_modules(modules) -> None:
    specs = [_check_acceleratable(module) for module in modules]  # check every module before changing any
    for module, spec in zip(modules, specs):
        # The forward reuses the spec found by the check instead of checking at every call.
        module.__dict__["_spec"] = spec
        module.__class__ = FusedAdaptedAttention


class FusedAdaptionPromptModel(AdaptionPromptModel):
    """PEFT's ``AdaptionPromptModel`` whose adapters added later (``add_adapter``, ``load_adapter``, which both
    create their modules in ``_create_adapted_attentions``) are fused too. Set by :func:`accelerate` on the
    instance (``__class__``), undone by :func:`restore`."""

    def _create_adapted_attentions(self, config, parents) -> None:
        super()._create_adapted_attentions(config, parents)
        _accelerate_modules([getattr(parent, config.target_modules) for parent in parents])


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Run every ``AdaptedAttention`` of a PEFT ``adaption_prompt`` model through the fused op (in place).

    Adapters added afterwards (``peft_model.add_adapter``, ``peft_model.load_adapter``) are fused as they are
    created. Idempotent.

    Args:
        peft_model: what ``peft.get_peft_model(model, AdaptionPromptConfig(...))`` or
            ``PeftModel.from_pretrained`` returned, on a Llama or Mistral model (or Qwen2 run through PEFT's Llama
            code).

    Returns:
        ``peft_model``; parameters, ``state_dict`` and saved files unchanged.

    Raises:
        UnsupportedVersionError: transformers or peft outside the supported versions.
        UnsupportedAttentionError: an adapted attention whose PEFT computation the fused op does not reproduce,
            naming the class and the reason (GPT-2's ``AdaptedAttentionGPT``: see docs/integrations.md).
    """
    require_supported_version("transformers")
    require_supported_version("peft")
    adaption_model = _adaption_prompt_model(peft_model)
    modules = _adapted_attentions(adaption_model)
    if not modules:
        raise ValueError("the PEFT model has no adapted attention layers to accelerate")
    _accelerate_modules(modules)
    adaption_model.__class__ = FusedAdaptionPromptModel
    return peft_model


def restore(peft_model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: PEFT's own ``AdaptedAttention`` forward again (in place), for adapters added later
    too."""
    adaption_model = _adaption_prompt_model(peft_model)
    for module in _adapted_attentions(adaption_model):
        if type(module) is FusedAdaptedAttention:
            module.__dict__.pop("_spec", None)
            module.__class__ = AdaptedAttention
    if type(adaption_model) is FusedAdaptionPromptModel:
        adaption_model.__class__ = AdaptionPromptModel
    return peft_model


def _peft_form_error(source: str, problem: str) -> ValueError:
    return ValueError(f"{source} cannot be expressed as a PEFT adaption_prompt adapter: {problem}. PEFT has one raw "
                      f"scalar gate per layer (gate_activation='none', gate_per_head=False) on the top "
                      f"adapter_layers layers; apply_adapter(..., gate_activation='none', gate_per_head=False) "
                      f"makes such an adapter")


def export_to_peft(source: Union[nn.Module, str, os.PathLike], output_dir: Union[str, os.PathLike], *,
                   base_model_name_or_path: str = None) -> None:
    """Write a fastadapter adapter as a PEFT ``adaption_prompt`` folder (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base_model, output_dir)`` loads.

    Args:
        source: a Hugging Face model adapted by :func:`fastadapter.integrations.transformers.apply_adapter` or
            ``load_adapter``, or a fastadapter adapter file (then the tensors are named for a
            ``*ForCausalLM``: ``base_model.model.model.layers.{i}.self_attn.adaption_*``).
        output_dir: the folder to write (created if needed).
        base_model_name_or_path: recorded in ``adapter_config.json`` (defaults to the model's ``name_or_path``).

    Raises:
        ValueError: an adapter PEFT cannot express (a gate per head, a tanh gate, layers other than the top
            ones), saying which and how to make one that it can.
    """
    from peft import AdaptionPromptConfig
    from safetensors.torch import save_file

    if isinstance(source, nn.Module):
        from .transformers import _decoder_layers, adapted_layers
        name = type(source).__name__
        adapters = adapted_layers(source)
        if not adapters:
            raise ValueError(f"{name} has no fastadapter adapter to export: call apply_adapter first")
        n_layers = len(_decoder_layers(source))
        first = next(iter(adapters.values())).adapter
        gate_activation, per_head = first.gate_activation, first.gate.numel() != 1
        paths = {id(m): n for n, m in source.named_modules()}
        tensors = {i: (paths[id(attn)], attn.adapter.prompt, attn.adapter.gate) for i, attn in adapters.items()}
        base_model_name_or_path = base_model_name_or_path or getattr(source, "name_or_path", None) or None
    else:
        name = os.fspath(source)
        raw, meta = read_adapter_file(name)
        config = meta["config"]
        n_layers = int(meta["base_model"]["n_layers"])
        gate_activation, per_head = config["gate_activation"], config["gate_per_head"]
        tensors = {i: (f"model.layers.{i}.self_attn", raw[f"layers.{i}.adapter_prompt"],
                       raw[f"layers.{i}.adapter_gate"]) for i in config["layers"]}
    if gate_activation != "none":
        raise _peft_form_error(name, f"its gate activation is {gate_activation!r} (PEFT multiplies by the raw gate)")
    if per_head:
        raise _peft_form_error(name, "it has one gate per head")
    layers = sorted(tensors)
    if layers != list(range(n_layers - len(layers), n_layers)):
        raise _peft_form_error(name, f"it adapts layers {layers} of {n_layers}, not the top {len(layers)}")

    state = {}
    for i in layers:
        module_path, prompt, gate = tensors[i]
        state[f"base_model.model.{module_path}.adaption_prompt"] = prompt.detach().float().cpu()[None].contiguous()
        state[f"base_model.model.{module_path}.adaption_gate"] = gate.detach().float().cpu().reshape(1).clone()
    prompt_len = state[f"base_model.model.{tensors[layers[0]][0]}.adaption_prompt"].shape[1]
    os.makedirs(output_dir, exist_ok=True)
    AdaptionPromptConfig(adapter_len=prompt_len, adapter_layers=len(layers), target_modules="self_attn",
                         task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                         inference_mode=True).save_pretrained(os.fspath(output_dir))
    save_file(state, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
