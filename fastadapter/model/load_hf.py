"""Loader of Hugging Face ``LlamaForCausalLM`` folders: ``config.json`` and ``*.safetensors`` (one file, or shards
listed by ``model.safetensors.index.json``).

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


def read_hf_config(folder: str) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face folder's ``config.json``."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: model_type is {hf['model_type']!r}; fastadapter loads 'llama' models")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{path}: LLaMA layers without biases are expected (attention_bias/mlp_bias set)")
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        theta, scaling = _rope_settings(path, hf)
        config = LlamaConfig(dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
                             n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                             vocab_size=int(hf["vocab_size"]), hidden_dim=int(hf["intermediate_size"]),
                             norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                             max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                             tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
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
    """Undo Hugging Face's permutation of ``q_proj``/``k_proj`` rows ``[n_heads · D, dim]``: within each head,
    HF stores the even rotary components first, then the odd ones; Meta interleaves them."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def load_hf(folder: str, *, dtype: Optional[torch.dtype] = None):
    """A :class:`LlamaModel` with the weights of a Hugging Face ``LlamaForCausalLM`` folder."""
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
                    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
                        heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads
                        expected = (heads * config.head_dim, config.dim)
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
    return None  # buffers such as rotary_emb.inv_freq in old exports
