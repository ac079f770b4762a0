"""Loader of GGUF checkpoints (llama.cpp's single file: config, tokenizer and quantized weights together) into
fastadapter's thin :class:`~fastadapter.model.llama.LlamaModel`.

Architectures (``general.architecture``) read, the same families :mod:`.load_hf` reads from Hugging Face
folders: ``llama`` (LLaMA 1/2/3, Mistral, SmolLM2: llama.cpp writes them all as ``llama``), ``qwen2``, ``qwen3``,
``gemma2`` and ``gemma3`` (the text model). Anything else is refused with the reason.

The config comes from the ``{arch}.*`` metadata; each weight is dequantized with the ``gguf`` package's own
dequantizers (:func:`gguf.quants.dequantize`) and converted to the compute dtype (float32 by default) one tensor
at a time, with a progress bar over the tensors. A quantization type the installed ``gguf`` cannot dequantize is
refused before any tensor is read. To keep the frozen base small, quantize it again with torchao
(``fastadapter train --quantize int8|int4``).

llama.cpp's conventions, undone here:

* **RoPE layout.** llama.cpp rotates adjacent pairs (Meta's layout, ``LLAMA_ROPE_TYPE_NORM``) for ``llama`` and
  rotates halves (``NEOX``) for Qwen and Gemma. Its converter permutes the ``q``/``k`` rows of a ``llama`` model
  from Hugging Face's rotate-half order back into Meta's, which is the order fastadapter's model uses, so they
  load as stored; Qwen and Gemma rows are stored in Hugging Face's order and are unpermuted as
  :mod:`.load_hf` does (q/k norms and biases included).
* **Gemma's norms** are stored as ``1 + w`` (llama.cpp's RMSNorm multiplies by the weight); fastadapter's
  ``rmsnorm_plus_one`` adds the 1 itself, so 1 is subtracted from every ``*norm.weight``.
* **Tied embeddings**: a file without ``output.weight`` ties the output layer to ``token_embd.weight``.
* **Gemma's softmax scale** is ``key_length^-½`` as llama.cpp computes it (``query_pre_attn_scalar`` =
  ``embedding_length / head_count`` for the 27B models, which llama.cpp tells by their layer count).
* **Gemma3's two RoPEs**: sliding-window layers (five of every six, or as ``attention.sliding_window_pattern``
  says) rotate with ``rope.freq_base_swa`` (10000 when absent), the others with ``rope.freq_base`` and
  ``rope.scaling.*``.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .weights import CheckpointError, assign_weights, build_on_meta
from ..model.config import LinearRopeScaling, LlamaConfig, RopeScaling, YarnRopeScaling
from .gguf_file import GGUFFile, GGUFFormatError, read_gguf
from .load_hf import unpermute_rotary_rows

#: ``general.architecture`` values this loader reads -> the Hugging Face ``model_type`` they correspond to.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                      "gemma3": "gemma3_text"}
#: Architectures whose q/k rows llama.cpp keeps in Hugging Face's rotate-half order (its NEOX RoPE).
ROTATE_HALF_ARCHITECTURES = ("qwen2", "qwen3", "gemma2", "gemma3")
_GEMMA = ("gemma2", "gemma3")
#: llama.cpp's layer counts of the 27B Gemmas, whose softmax scale is (dim / n_heads)^-½, not head_dim^-½.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
#: Gemma3's sliding-window pattern when the file gives none (llama.cpp's ``set_swa_pattern(6)``: five sliding
#: layers, then one full) and the RoPE base of its sliding layers when ``rope.freq_base_swa`` is absent.
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0

#: GGUF tensor name (after ``blk.{i}.``) -> Meta name (after ``layers.{i}.``).
LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "attn_q.bias": "attention.wq.bias", "attn_k.bias": "attention.wk.bias", "attn_v.bias": "attention.wv.bias",
    "attn_q_norm.weight": "attention.q_norm.weight", "attn_k_norm.weight": "attention.k_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    # Gemma2/3's norms on the outputs of attention and feed-forward.
    "post_attention_norm.weight": "attention_output_norm.weight", "post_ffw_norm.weight": "ffn_output_norm.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "output.weight"}
#: Meta names of tensors whose rows are in rotate-half order within each head in a NEOX-RoPE file.
_ROTARY_ROWS = (".attention.wq.weight", ".attention.wk.weight", ".attention.wq.bias", ".attention.wk.bias")
_ROTARY_NORMS = (".attention.q_norm.weight", ".attention.k_norm.weight")


def is_gguf_file(path: str) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _scalar(path: str, metadata: dict, key: str, default=None, required: bool = False):
    value = metadata.get(key, default)
    if value is None and required:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} varies per layer ({value}); fastadapter's layers all have the same "
                                  f"shape")
        value = value[0]
    return value


def _rope_scaling(path: str, metadata: dict, arch: str, max_seq_len: int) -> Optional[RopeScaling]:
    """The RoPE scaling of ``{arch}.rope.scaling.*`` (``none``, ``linear`` or ``yarn``)."""
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind in ("none", None) or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return LinearRopeScaling(factor=float(factor))
    if kind == "yarn":
        original = int(metadata.get(f"{arch}.rope.scaling.original_context_length") or max_seq_len)
        return YarnRopeScaling(factor=float(factor), original_max_seq_len=original,
                               beta_fast=float(metadata.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                               beta_slow=float(metadata.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
                               attention_factor=float(metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0)
                                                      or 1.0))
    raise CheckpointError(f"{path}: RoPE scaling {kind!r} is not supported (fastadapter reads 'linear' and 'yarn')")


def read_gguf_config(gguf: GGUFFile) -> LlamaConfig:
    """The :class:`LlamaConfig` of a GGUF file's ``general.architecture`` and ``{arch}.*`` metadata.

    Raises:
        CheckpointError: an architecture outside :data:`GGUF_ARCHITECTURES`, a missing key, or an option the
            thin model does not compute (attention-logit soft-capping, per-frequency RoPE factors).
    """
    path, metadata, arch = gguf.path, gguf.metadata, gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; fastadapter loads "
                              f"{', '.join(GGUF_ARCHITECTURES)} GGUF files (the families its thin LLaMA model runs)")

    def key(name, default=None, required=False):
        return _scalar(path, metadata, f"{arch}.{name}", default, required)

    if "rope_freqs.weight" in gguf.tensors:
        raise CheckpointError(f"{path}: per-frequency RoPE factors (tensor 'rope_freqs.weight', LLaMA-3.1's RoPE "
                              f"scaling as llama.cpp stores it) are not supported; load the Hugging Face folder "
                              f"instead, whose rope_scaling fastadapter reads")
    dim, n_layers = int(key("embedding_length", required=True)), int(key("block_count", required=True))
    n_heads = int(key("attention.head_count", required=True))
    n_kv_heads = int(key("attention.head_count_kv", n_heads))
    head_dim = key("attention.key_length") or key("rope.dimension_count")
    if head_dim is not None and int(head_dim) != int(key("attention.value_length", head_dim)):
        raise CheckpointError(f"{path}: key and value heads of different widths ({head_dim}, "
                              f"{key('attention.value_length')}) are not supported")
    if head_dim is not None and dim % n_heads == 0 and int(head_dim) == dim // n_heads:
        head_dim = None  # the usual width
    embedding = gguf.tensors.get("token_embd.weight")
    vocab_size = key("vocab_size") or (embedding.shape[0] if embedding is not None else None)
    if vocab_size is None:
        raise CheckpointError(f"{path}: no {arch}.vocab_size and no token_embd.weight")
    max_seq_len = int(key("context_length", 2048))
    options: dict = {"rope_theta": float(key("rope.freq_base", 10_000.0))}
    options["rope_scaling"] = _rope_scaling(path, metadata, arch, max_seq_len)
    if arch == "qwen2":
        options["qkv_bias"] = True
    if arch in ("qwen3", "gemma3"):
        options["qk_norm"] = True
    if arch in _GEMMA:
        if float(key("attn_logit_softcapping", 0.0) or 0.0) != 0.0:
            raise CheckpointError(f"{path}: {arch}.attn_logit_softcapping={key('attn_logit_softcapping')} is not "
                                  f"supported: the fused zero-init attention has no soft-capping of the attention "
                                  f"scores")
        scalar = (dim // n_heads if n_layers == _GEMMA_27B_LAYERS[arch]
                  else int(key("attention.key_length", dim // n_heads)))
        softcap = key("final_logit_softcapping")
        options.update(norm="rmsnorm_plus_one", sandwich_norms=True, mlp_activation="gelu_tanh",
                       scale_embeddings=True, attention_scale=float(scalar) ** -0.5,
                       final_logit_softcap=None if not softcap else float(softcap))
        window = key("attention.sliding_window")
        if window is not None:
            # Sequences no longer than the window see their whole past: full causal attention is then exact.
            max_seq_len = min(max_seq_len, int(window))
        if arch == "gemma3":
            pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
            if isinstance(pattern, list):  # one flag per layer, true for a sliding layer
                if len(pattern) != n_layers:
                    raise CheckpointError(f"{path}: {arch}.attention.sliding_window_pattern has {len(pattern)} "
                                          f"flags for {n_layers} layers")
                sliding = tuple(i for i, flag in enumerate(pattern) if flag)
            else:  # every pattern-th layer attends globally
                sliding = tuple(i for i in range(n_layers) if (i + 1) % int(pattern))
            options.update(local_rope_layers=sliding,
                           local_rope_theta=float(key("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA)))
    try:
        return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                           vocab_size=int(vocab_size), hidden_dim=int(key("feed_forward_length", required=True)),
                           norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)), max_seq_len=max_seq_len,
                           tie_embeddings="output.weight" not in gguf.tensors,
                           explicit_head_dim=None if head_dim is None else int(head_dim), **options)
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {exc}") from exc


def meta_name(gguf_name: str) -> Optional[str]:
    """The Meta parameter name (see :mod:`fastadapter.model.llama`) of a GGUF tensor name, or None for tensors the model has no
    parameter for."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        index, _, rest = gguf_name[len("blk."):].partition(".")
        if index.isdigit() and rest in LAYER_NAMES:
            return f"layers.{index}.{LAYER_NAMES[rest]}"
    return None


def check_dequantizable(gguf: GGUFFile) -> None:
    """Raise :class:`CheckpointError` naming the tensors whose quantization type the installed ``gguf`` package
    cannot dequantize (tried on one block of each type, before any weight is read)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    refused: dict[str, list[str]] = {}
    for qtype in {t.qtype for t in gguf.tensors.values()}:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        try:
            if qtype.name in ("F32", "F16"):
                continue
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError) as exc:
            refused[f"{qtype.name} ({exc})"] = [t.name for t in gguf.tensors.values() if t.qtype == qtype]
    if refused:
        listed = "; ".join(f"{why}: {', '.join(names[:3])}{', …' if len(names) > 3 else ''}"
                           for why, names in refused.items())
        raise CheckpointError(f"{gguf.path}: quantization types the installed gguf package cannot dequantize: "
                              f"{listed}")


def dequantize_tensor(tensor, dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor (:class:`~.gguf_file.GGUFTensor`) as a ``dtype`` tensor of its logical shape, through
    :func:`gguf.quants.dequantize`."""
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.qtype)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only mapped file
        values = np.array(values)
    return torch.from_numpy(values.reshape(tensor.shape)).to(dtype)


def load_gguf(path: str, *, dtype: Optional[torch.dtype] = None, progress: bool = True):
    """A :class:`LlamaModel` with the dequantized weights of the GGUF file at ``path``.

    Args:
        dtype: the compute dtype the weights are dequantized into (default float32).
        progress: show a progress bar over the tensors (on stderr).
    """
    from tqdm.auto import tqdm

    try:
        gguf = read_gguf(path)
    except GGUFFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    config = read_gguf_config(gguf)
    check_dequantizable(gguf)
    dtype = dtype or torch.float32
    if not dtype.is_floating_point:
        raise CheckpointError(f"{path}: weights are dequantized into a floating-point dtype, not {dtype}")
    rotate_half = gguf.architecture in ROTATE_HALF_ARCHITECTURES
    gemma = gguf.architecture in _GEMMA
    tensors, sources = {}, {"": path}
    wanted = [(name, t) for t, name in ((t, meta_name(t.name)) for t in gguf.tensors.values()) if name is not None]
    for name, tensor in tqdm(wanted, desc=f"dequantizing {os.path.basename(path)}", unit="tensor",
                             disable=not progress):
        # Norms stay in float32 until the 1 is subtracted: rounding 1 + w first would lose w's low bits.
        is_norm = name.endswith("norm.weight")
        value = dequantize_tensor(tensor, torch.float32 if is_norm else dtype)
        if gemma and is_norm:
            value = value - 1.0
        if rotate_half and name.endswith(_ROTARY_ROWS + _ROTARY_NORMS):
            heads = 1 if name.endswith(_ROTARY_NORMS) else config.n_heads if ".wq." in name else config.n_kv_heads
            if value.shape[0] != heads * config.head_dim:
                raise CheckpointError(f"{path}: tensor {tensor.name!r} has shape {list(value.shape)}, expected "
                                      f"{heads * config.head_dim} rows ({heads} heads of {config.head_dim})")
            value = unpermute_rotary_rows(value, heads)
        tensors[name], sources[name] = value.to(dtype), path
    return assign_weights(build_on_meta(config), tensors, sources, dtype)
