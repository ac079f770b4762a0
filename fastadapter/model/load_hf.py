"""Loader of Hugging Face folders of the LLaMA family: ``config.json`` and ``*.safetensors`` (one file, or shards
listed by ``model.safetensors.index.json``).

Families (``model_type``), all loaded into fastadapter's thin :class:`~fastadapter.model.llama.LlamaModel`, so that
``fastadapter train`` packs, masks, checkpoints and resumes them the same way:

* ``llama`` — LLaMA 1/2/3.x, RoPE ``default`` or ``llama3`` scaling, tied or separate output layer;
* ``mistral`` — the LLaMA architecture plus a sliding attention window: the model's ``max_seq_len`` is capped at
  the window, so that every sequence it runs is shorter than the window and full causal attention is exact;
* ``qwen2`` — the LLaMA architecture plus biases on ``q_proj``/``k_proj``/``v_proj`` (``LlamaConfig.qkv_bias``);
  a sliding window (``use_sliding_window``) is capped as Mistral's.

These are the families whose attention the transformers integration takes over (LlamaAttention,
MistralAttention, Qwen2Attention); their blocks are the same RMSNorm / RoPE / GQA / SwiGLU computation, so the
thin model covers them and the patched Hugging Face route is never needed for training from the CLI.

Hugging Face's conversion permutes the rows of ``q_proj``/``k_proj`` so that its rotate-half RoPE equals Meta's
rotation of adjacent pairs; this loader undoes the permutation, and the model keeps Meta's RoPE.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch

from .checkpoints import CheckpointError, assign_weights, build_on_meta
from .config import Llama3RopeScaling, LlamaConfig

#: Hugging Face parameter name (after ``model.``) -> Meta name; ``{i}`` is the layer.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_BIAS_NAMES = {"self_attn.q_proj.bias": "attention.wq.bias", "self_attn.k_proj.bias": "attention.wk.bias",
               "self_attn.v_proj.bias": "attention.wv.bias"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}


def _rope_settings(path: str, hf: dict) -> tuple[float, Optional[Llama3RopeScaling]]:
    """RoPE theta and scaling from ``rope_parameters`` (transformers ≥ 5) or ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(factor=float(params["factor"]),
                                        low_freq_factor=float(params["low_freq_factor"]),
                                        high_freq_factor=float(params["high_freq_factor"]),
                                        original_max_seq_len=int(params["original_max_position_embeddings"]))
    raise CheckpointError(f"{path}: RoPE type {rope_type!r} is not supported (fastadapter knows 'default' and "
                          f"'llama3')")


#: ``model_type`` values this loader reads.
FAMILIES = ("llama", "mistral", "qwen2")


def _sliding_window(hf: dict) -> Optional[int]:
    """The attention window of a Mistral / Qwen2 config, or None when every layer attends to its whole past."""
    window = hf.get("sliding_window")
    if window is None:
        return None
    model_type = hf.get("model_type", "llama")
    if model_type == "qwen2":
        layer_types = hf.get("layer_types")
        windowed = (any(t == "sliding_attention" for t in layer_types) if layer_types is not None
                    else bool(hf.get("use_sliding_window", False)))
        if not windowed:
            return None
    return int(window)


def read_hf_config(folder: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face folder's ``config.json`` (``model_type`` one of
    :data:`FAMILIES`)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    model_type = hf.get("model_type", "llama")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: model_type is {model_type!r}; fastadapter loads {', '.join(FAMILIES)} "
                              f"models")
    qkv_bias = model_type == "qwen2"
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise CheckpointError(f"{path}: LLaMA layers without biases are expected (attention_bias/mlp_bias set)")
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        theta, scaling = _rope_settings(path, hf)
        max_seq_len = int(hf.get("max_position_embeddings", 2048))
        window = _sliding_window(hf)
        if window is not None:
            # Sequences no longer than the window see their whole past: full causal attention is then exact.
            max_seq_len = min(max_seq_len, window)
        config = LlamaConfig(dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
                             n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                             vocab_size=int(hf["vocab_size"]), hidden_dim=int(hf["intermediate_size"]),
                             norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                             max_seq_len=max_seq_len, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                             qkv_bias=qkv_bias)
    except KeyError as exc:
        raise CheckpointError(f"{path}: key {exc} is missing") from exc
    if hf.get("head_dim") not in (None, config.head_dim):
        raise CheckpointError(f"{path}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads = "
                              f"{config.head_dim}; fastadapter's LLaMA needs them equal")
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
                    name = _meta_name(key)
                    if name is None:
                        continue
                    tensor = f.get_tensor(key)
                    if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wq.bias",
                                      "attention.wk.bias")):
                        heads = config.n_heads if ".wq." in name else config.n_kv_heads
                        expected = (heads * config.head_dim,) + ((config.dim,) if name.endswith("weight") else ())
                        if tuple(tensor.shape) != expected:
                            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(tensor.shape)}, expected "
                                                  f"{list(expected)}")
                        tensor = unpermute_rotary_rows(tensor, heads)
                    tensors[name], sources[name] = tensor, file
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({exc})") from exc
    return assign_weights(build_on_meta(config), tensors, sources, dtype)


def _meta_name(key: str) -> Optional[str]:
    if key in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[key]
    if key.startswith("model.layers."):
        index, _, rest = key[len("model.layers."):].partition(".")
        if rest in _LAYER_NAMES:
            return f"layers.{index}.{_LAYER_NAMES[rest]}"
        if rest in _BIAS_NAMES:
            return f"layers.{index}.{_BIAS_NAMES[rest]}"
    return None  # buffers such as rotary_emb.inv_freq in old exports
