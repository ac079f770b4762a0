"""Tiny GGUF files for the tests, written with the ``gguf`` package's ``GGUFWriter`` the way llama.cpp's converter
writes them: a random fastadapter model's weights under GGUF names, q/k rows of ``llama`` files in Meta's
(adjacent-pairs) order and of Qwen/Gemma files in Hugging Face's (rotate-half) order, Gemma's norms as ``1 + w``,
the projections quantized to Q8_0.

The tensor names are the loader's own table read backwards (one table of GGUF names, in
:mod:`fastadapter.loaders.load_gguf`); the real GGUF files of ``test_gguf_real.py``, against transformers' own
GGUF load, check that table independently."""
import numpy as np
import torch

from fastadapter.loaders.load_gguf import GLOBAL_NAMES, LAYER_NAMES, ROTATE_HALF_ARCHITECTURES

#: Meta name (after ``layers.{i}.``) -> GGUF name (after ``blk.{i}.``).
_GGUF_LAYER_NAMES = {meta: gguf for gguf, meta in LAYER_NAMES.items()}
_GGUF_GLOBAL_NAMES = {meta: gguf for gguf, meta in GLOBAL_NAMES.items()}


def rotate_half_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> Hugging Face's rotate-half order (what llama.cpp keeps for NEOX RoPE)."""
    if weight.dim() == 1:
        return rotate_half_rows(weight[:, None], n_heads)[:, 0]
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_name(meta_name: str) -> str:
    if meta_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[meta_name]
    _, index, rest = meta_name.split(".", 2)
    return f"blk.{index}.{_GGUF_LAYER_NAMES[rest]}"


def write_gguf(path, model, arch: str, *, quantize: bool = True, metadata=None, tokenizer_metadata=None,
               tensor_types=None):
    """Write ``model`` (a :class:`LlamaModel`) as the GGUF file ``path`` of architecture ``arch``.

    ``metadata``: extra ``{key: value}`` (ints, floats, strings); ``tokenizer_metadata``: ``{key: value}``
    written as they are (lists as arrays); ``tensor_types``: ``{gguf name: np dtype}`` to store some tensors
    raw in a type of their own (an int32 weight, for the refusal tests)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, value in {**(metadata or {}), **(tokenizer_metadata or {})}.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    rotate_half = arch in ROTATE_HALF_ARCHITECTURES
    for name, param in model.state_dict().items():
        value = param.detach().float()
        if rotate_half and name.endswith(("wq.weight", "wq.bias", "wk.weight", "wk.bias", "q_norm.weight",
                                          "k_norm.weight")):
            heads = 1 if "norm" in name else config.n_heads if ".wq." in name else config.n_kv_heads
            value = rotate_half_rows(value, heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            value = value + 1.0
        target = gguf_name(name)
        array = value.numpy()
        if tensor_types and target in tensor_types:
            writer.add_tensor(target, array.astype(tensor_types[target]))
        elif quantize and array.ndim == 2 and array.shape[1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
