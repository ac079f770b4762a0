"""Loader of Hugging Face folders of the LLaMA family: ``config.json`` and ``*.safetensors`` (one file, or shards
listed by ``model.safetensors.index.json``).

Families (``model_type``), all loaded into fastadapter's thin :class:`~fastadapter.model.llama.LlamaModel`, so that
``fastadapter train`` packs, masks, checkpoints and resumes them the same way. Each is LLaMA's RMSNorm / RoPE /
GQA / gated-MLP block plus a few :class:`~fastadapter.model.config.LlamaConfig` options:

* ``llama`` — LLaMA 1/2/3.x, RoPE ``default``, ``llama3``, ``linear`` or ``yarn`` scaling, tied or separate output;
* ``mistral`` — the LLaMA architecture plus a sliding attention window: the model's ``max_seq_len`` is capped at
  the window, so that every sequence it runs is no longer than the window and full causal attention is exact;
* ``qwen2`` — plus biases on ``q_proj``/``k_proj``/``v_proj`` (``qkv_bias``); a sliding window
  (``use_sliding_window``) is capped as Mistral's;
* ``qwen3`` — plus RMSNorms over the head dimension of q and k before RoPE (``qk_norm``), an explicit head width
  (``explicit_head_dim``); windows capped as Qwen2's;
* ``gemma2`` — embeddings scaled by ``sqrt(hidden)``, RMSNorms ``· (1 + w)``, GeGLU (tanh GELU), norms on the
  outputs of attention and feed-forward too (``sandwich_norms``), softmax scale ``query_pre_attn_scalar^-½``,
  final logit soft-capping; its sliding-window layers are capped as Mistral's. Attention-logit soft-capping
  (``attn_logit_softcapping``, 50 in Google's checkpoints) is refused unless null: the fused op has none;
* ``gemma3_text`` — Gemma2's block without soft-capping, plus q/k norms, and two RoPEs: the sliding layers
  rotate with their own base (``rope_local_base_freq``, ``local_rope_layers``) and the full-attention layers with
  ``rope_theta`` and the scaling (``linear`` ×8 in Gemma3 4B+); windows capped as Mistral's. From a multimodal
  ``gemma3`` folder (Gemma3 4B, 12B, 27B) the language model is loaded (``text_config``, the
  ``language_model.`` tensors); the vision tower is not, so such a model is fine-tuned and run on text;
* ``olmo`` — layer norms without weight or bias (``norm="layernorm_no_params"``), q/k/v clamped to
  ``clip_qkv``;
* ``smollm3`` — no RoPE on the layers ``no_rope_layers`` marks 0 (``layers_without_rope``).

These are the families whose attention the transformers integration takes over (its allowlist in
:mod:`fastadapter.integrations._llama_pattern`), so the patched Hugging Face route is never needed for training
from the CLI. Biases other than Qwen2's, bidirectional attention and other activations are refused by name.

Hugging Face's conversion permutes the rows of ``q_proj``/``k_proj`` so that its rotate-half RoPE equals Meta's
rotation of adjacent pairs; this loader undoes the permutation (and the same permutation of the q/k norms'
weights, which scale those rows), and the model keeps Meta's RoPE.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Optional

import torch

from .weights import CheckpointError, assign_weights, build_on_meta
from ..model.config import Llama3RopeScaling, LinearRopeScaling, LlamaConfig, RopeScaling, YarnRopeScaling

#: Hugging Face parameter name (after ``model.``) -> Meta name; ``{i}`` is the layer.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attention.q_norm.weight", "self_attn.k_norm.weight": "attention.k_norm.weight",
}
#: Gemma2/3's four norms per layer: its ``post_attention_layernorm`` normalises the attention's output, and
#: ``pre_feedforward_layernorm`` is LLaMA's ``ffn_norm``.
_SANDWICH_NORM_NAMES = {
    "post_attention_layernorm.weight": "attention_output_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "ffn_output_norm.weight",
}
_BIAS_NAMES = {"self_attn.q_proj.bias": "attention.wq.bias", "self_attn.k_proj.bias": "attention.wk.bias",
               "self_attn.v_proj.bias": "attention.wv.bias"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
#: Meta names of tensors whose rows (or elements) are in Hugging Face's rotate-half order within each head.
_ROTARY_ROWS = ("attention.wq.weight", "attention.wk.weight", "attention.wq.bias", "attention.wk.bias")
_ROTARY_NORMS = ("attention.q_norm.weight", "attention.k_norm.weight")


def _rope_scaling(path: str, params: dict, max_position_embeddings: int, where: str = ""
                  ) -> Optional[RopeScaling]:
    """The RoPE scaling a Hugging Face ``rope_parameters`` dict describes (``rope_type`` default, llama3, linear
    or yarn); ``where`` names the layer type for Gemma3's per-type parameters."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{path}: RoPE{where} with partial_rotary_factor={params['partial_rotary_factor']} "
                              f"(RoPE on part of each head) is not supported; fastadapter rotates whole heads")
    if rope_type == "llama3":
        return Llama3RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                                 high_freq_factor=float(params["high_freq_factor"]),
                                 original_max_seq_len=int(params["original_max_position_embeddings"]))
    if rope_type == "linear":
        return LinearRopeScaling(factor=float(params["factor"]))
    if rope_type == "yarn":
        original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
        factor = float(params.get("factor") or max_position_embeddings / original)
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # YaRN's mscale, as transformers' _compute_yarn_parameters

            def mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if params.get("mscale") and params.get("mscale_all_dim"):
                attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
            else:
                attention_factor = mscale(factor)
        return YarnRopeScaling(factor=factor, original_max_seq_len=original,
                               beta_fast=float(params.get("beta_fast") or 32),
                               beta_slow=float(params.get("beta_slow") or 1),
                               attention_factor=float(attention_factor), truncate=bool(params.get("truncate", True)))
    raise CheckpointError(f"{path}: RoPE type {rope_type!r}{where} is not supported (fastadapter knows 'default', "
                          f"'llama3', 'linear' and 'yarn')")


def _flat_rope_parameters(hf: dict, default_theta: float = 10000.0) -> dict:
    """The RoPE parameters transformers reads: ``rope_scaling`` (older config files) when it is given, else
    ``rope_parameters`` (transformers ≥ 5) — the first replaces the second whole, as in transformers'
    ``convert_rope_params_to_dict`` — with ``rope_theta`` from the top level when the dict has none."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    return params


#: ``model_type`` values this loader reads.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo", "smollm3")
#: ``tie_word_embeddings`` when a family's config.json leaves it out (the default of its transformers config).
_TIED_BY_DEFAULT = ("gemma2", "gemma3_text", "smollm3")


def _layer_types(hf: dict, model_type: str) -> list[str]:
    """``full_attention`` / ``sliding_attention`` of every layer: ``layer_types``, or the pattern a family's
    config class derives when an older config.json leaves it out (Gemma2: every other layer; Gemma3: five of
    every ``sliding_window_pattern`` (6))."""
    n_layers = int(hf["num_hidden_layers"])
    if hf.get("layer_types") is not None:
        return list(hf["layer_types"])
    if model_type == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if model_type == "gemma3_text":
        pattern = int(hf.get("sliding_window_pattern", 6))
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if model_type == "mistral" or hf.get("use_sliding_window"):
        # Qwen2/3 slide from layer max_window_layers up; capping at the window covers any such choice.
        return ["sliding_attention"] * n_layers
    return ["full_attention"] * n_layers


def _sliding_window(hf: dict, model_type: str) -> Optional[int]:
    """The attention window of the model's sliding layers, or None when every layer attends to its whole past."""
    window = hf.get("sliding_window")
    if window is None:
        return None
    if model_type == "smollm3" and not hf.get("use_sliding_window", False):
        return None  # SmolLM3's attention slides only with use_sliding_window, whatever layer_types say
    if "sliding_attention" not in _layer_types(hf, model_type):
        return None
    return int(window)


def _refuse(path: str, hf: dict, key: str, why: str, allowed=(None, False)) -> None:
    if hf.get(key) not in allowed:
        raise CheckpointError(f"{path}: {key}={hf[key]!r} is not supported: {why}")


def _family_options(path: str, hf: dict, model_type: str, n_layers: int) -> dict:
    """The :class:`LlamaConfig` options (beyond LLaMA's dimensions and RoPE) of ``model_type``, after refusing
    what the thin model does not compute."""
    no_bias = "the thin model's projections have no bias (q/k/v biases are Qwen2's only)"
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    gemma = model_type in ("gemma2", "gemma3_text")
    expected = "gelu_pytorch_tanh" if gemma else "silu"
    if activation != expected:
        raise CheckpointError(f"{path}: hidden activation {activation!r} is not supported for {model_type} (expected "
                              f"{expected!r})")
    if model_type == "llama":
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise CheckpointError(f"{path}: LLaMA layers without biases are expected (attention_bias/mlp_bias set)")
        return {}
    if model_type == "mistral":
        return {}
    if model_type == "qwen2":
        return {"qkv_bias": True}
    for key in ("attention_bias", "mlp_bias"):
        _refuse(path, hf, key, no_bias)
    _refuse(path, hf, "use_bidirectional_attention", "fastadapter's attention is causal")
    if model_type == "qwen3":
        return {"qk_norm": True}
    if model_type == "olmo":
        # OlmoLayerNorm's eps is fixed at 1e-5, whatever the config says.
        return {"norm": "layernorm_no_params", "norm_eps": 1e-5,
                "clip_qkv": None if hf.get("clip_qkv") is None else float(hf["clip_qkv"])}
    if model_type == "smollm3":
        uses_rope = hf.get("no_rope_layers")  # 1: RoPE, 0: none (the name is transformers')
        if uses_rope is None:
            interval = int(hf.get("no_rope_layer_interval", 4))
            uses_rope = [int((i + 1) % interval != 0) for i in range(n_layers)]
        return {"layers_without_rope": tuple(i for i, rope in enumerate(uses_rope) if not rope)}
    # Gemma2 and Gemma3 (text).
    _refuse(path, hf, "attn_logit_softcapping",
            "the fused zero-init attention has no soft-capping of the attention scores (cap · tanh(scores / cap)); "
            "fastadapter loads Gemma folders whose config.json sets attn_logit_softcapping to null (the "
            "transformers integration refuses it for the same reason)")
    options = {"norm": "rmsnorm_plus_one", "sandwich_norms": True, "mlp_activation": "gelu_tanh",
               "scale_embeddings": True, "attention_scale": float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
               "final_logit_softcap": (None if hf.get("final_logit_softcapping") is None
                                       else float(hf["final_logit_softcapping"]))}
    if model_type == "gemma3_text":
        options["qk_norm"] = True
    return options


def _gemma3_rope(path: str, hf: dict, max_position_embeddings: int) -> dict:
    """Gemma3's two RoPEs: ``rope_theta`` and ``rope_scaling`` of the full-attention layers, and the local base
    of the sliding-window layers (``rope_parameters`` per layer type, or the older ``rope_theta``,
    ``rope_scaling``, ``rope_local_base_freq``)."""
    per_type = hf.get("rope_parameters") or {}
    if "full_attention" in per_type or "sliding_attention" in per_type:
        global_params = dict(per_type.get("full_attention") or {})
        global_params.setdefault("rope_theta", 1_000_000.0)
        local_params = dict(per_type.get("sliding_attention") or {})
        local_params.setdefault("rope_theta", 10_000.0)
    else:
        global_params = _flat_rope_parameters(hf, 1_000_000.0)
        local_params = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    if _rope_scaling(path, local_params, max_position_embeddings, " of the sliding layers") is not None:
        raise CheckpointError(f"{path}: a scaled RoPE on Gemma3's sliding layers is not supported (expected "
                              f"rope_type 'default' there; the full-attention layers may be scaled)")
    local = [i for i, t in enumerate(_layer_types(hf, "gemma3_text")) if t == "sliding_attention"]
    return {"rope_theta": float(global_params["rope_theta"]),
            "rope_scaling": _rope_scaling(path, global_params, max_position_embeddings),
            "local_rope_layers": tuple(local), "local_rope_theta": float(local_params["rope_theta"])}


#: Gemma3TextConfig's defaults for what the ``text_config`` of Google's multimodal Gemma3 folders leaves out.
_GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                         "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
                         "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1_000_000.0,
                         "rope_local_base_freq": 10_000.0}


def _gemma3_language_model_config(path: str, hf: dict) -> dict:
    """The ``gemma3_text`` config of a multimodal Gemma3 folder's language model (its ``text_config``, over
    Gemma3TextConfig's defaults); the vision tower and projector are not loaded."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{path}: a multimodal Gemma3 config (model_type 'gemma3') needs a 'text_config' "
                              f"object describing its language model")
    tied = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return {**_GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text", "tie_word_embeddings": tied}


def read_hf_config(folder: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face folder's ``config.json`` (``model_type`` one of
    :data:`FAMILIES`)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings (model_type, hidden_size, ...), got a "
                              f"{type(hf).__name__}")
    model_type = hf.get("model_type", "llama")
    if model_type == "gemma3":
        hf, model_type = _gemma3_language_model_config(path, hf), "gemma3_text"
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: model_type is {model_type!r}; fastadapter loads {', '.join(FAMILIES)} "
                              f"models")
    try:
        dim, n_heads, n_layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        max_position_embeddings = int(hf.get("max_position_embeddings", 2048))
        options = _family_options(path, hf, model_type, n_layers)
        if model_type == "gemma3_text":
            options.update(_gemma3_rope(path, hf, max_position_embeddings))
        else:
            params = _flat_rope_parameters(hf)
            options.update(rope_theta=float(params["rope_theta"]),
                           rope_scaling=_rope_scaling(path, params, max_position_embeddings))
        head_dim = hf.get("head_dim")
        if head_dim is not None and dim % n_heads == 0 and int(head_dim) == dim // n_heads:
            head_dim = None  # the usual width: LLaMA's config, unchanged
        max_seq_len = max_position_embeddings
        window = _sliding_window(hf, model_type)
        if window is not None:
            # Sequences no longer than the window see their whole past: full causal attention is then exact.
            max_seq_len = min(max_seq_len, window)
        options.setdefault("norm_eps", float(hf.get("rms_norm_eps", 1e-6)))
        config = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads,
                             n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                             vocab_size=int(hf["vocab_size"]), hidden_dim=int(hf["intermediate_size"]),
                             max_seq_len=max_seq_len, explicit_head_dim=None if head_dim is None else int(head_dim),
                             tie_embeddings=bool(hf.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
                             sliding_window=window, family=model_type, **options)
    except KeyError as exc:
        raise CheckpointError(f"{path}: key {exc} is missing") from exc
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {exc}") from exc
    return config


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not valid JSON ({exc}); expected {{\"weight_map\": {{tensor: shard "
                                  f"file}}}}") from exc
        except (KeyError, TypeError):
            raise CheckpointError(f"{index}: no 'weight_map' object; expected {{\"weight_map\": {{tensor: shard "
                                  f"file}}}}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        root = os.path.realpath(folder)
        for name in files:
            # A shard is a file of this folder: "../x" or "/x" would load weights from anywhere on the machine.
            target = os.path.realpath(os.path.join(folder, name))
            if os.path.isabs(name) or os.path.dirname(target) != root:
                raise CheckpointError(f"{index}: shard {name!r} is not a file of the model folder {folder}; "
                                      f"shards must be plain file names next to the index")
            if not os.path.isfile(target):
                raise CheckpointError(f"{index}: lists shard {name}, which is missing")
        return [os.path.join(folder, name) for name in files]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights (PyTorch .bin weights are not read: they need "
                              f"unpickling)")
    return files


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's permutation of ``q_proj``/``k_proj`` rows ``[n_heads · D, dim]`` (or of their biases
    ``[n_heads · D]``): within each head, HF stores the even rotary components first, then the odd ones; Meta
    interleaves them."""
    if weight.dim() == 1:
        return unpermute_rotary_rows(weight[:, None], n_heads)[:, 0]
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def load_hf(folder: str, *, dtype: Optional[torch.dtype] = None):
    """A :class:`LlamaModel` with the weights of a Hugging Face folder of one of :data:`FAMILIES`."""
    from safetensors import SafetensorError, safe_open

    config = read_hf_config(folder)
    tensors, sources = {}, {"": folder}
    for file in _weight_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = _meta_name(key, config.sandwich_norms)
                    if name is None:
                        continue
                    tensor = f.get_tensor(key)
                    if name.endswith(_ROTARY_ROWS + _ROTARY_NORMS):
                        # q/k norms: one head of head_dim weights, in the rotate-half order of the rows they scale.
                        heads = (1 if name.endswith(_ROTARY_NORMS) else
                                 config.n_heads if ".wq." in name else config.n_kv_heads)
                        expected = (heads * config.head_dim,) + ((config.dim,) if name.endswith(_ROTARY_ROWS[:2])
                                                                 else ())
                        if tuple(tensor.shape) != expected:
                            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(tensor.shape)}, expected "
                                                  f"{list(expected)}")
                        tensor = unpermute_rotary_rows(tensor, heads)
                    tensors[name], sources[name] = tensor, file
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({exc})") from exc
    return assign_weights(build_on_meta(config), tensors, sources, dtype)


def _language_model_key(key: str) -> str:
    """The text model's name of a multimodal Gemma3 folder's language-model tensor (``language_model.model.…``
    as saved, ``model.language_model.…`` in transformers ≥ 5's own layout, → ``model.…``); other keys as they
    are (the vision tower's then match nothing)."""
    if key.startswith("language_model."):
        return key[len("language_model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def _meta_name(key: str, sandwich_norms: bool = False) -> Optional[str]:
    key = _language_model_key(key)
    if key in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[key]
    if key.startswith("model.layers."):
        index, _, rest = key[len("model.layers."):].partition(".")
        if sandwich_norms and rest in _SANDWICH_NORM_NAMES:
            return f"layers.{index}.{_SANDWICH_NORM_NAMES[rest]}"
        if rest in _LAYER_NAMES:
            return f"layers.{index}.{_LAYER_NAMES[rest]}"
        if rest in _BIAS_NAMES:
            return f"layers.{index}.{_BIAS_NAMES[rest]}"
    return None  # buffers such as rotary_emb.inv_freq in old exports
