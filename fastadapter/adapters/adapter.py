"""LLaMA-Adapter on a :class:`LlamaModel`: ``AdapterConfig``, ``add_adapter``, ``save_adapter``, ``load_adapter``.

``add_adapter`` freezes every base weight and gives each adapted layer a learnable prompt ``[P, dim]`` and a
zero-initialised gate; the lower layers keep plain causal attention. With the paper's settings on LLaMA-7B
(P = 10, top 30 of 32 layers, one gate per head) that is 10·30·4096 + 30·32 = 1,229,760 trainable parameters.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .adapter_formats import detect_adapter_format, read_foreign_adapter
from .adapter_file import (AdapterFileError, base_model_fingerprint, exact_base_model_fingerprint, fingerprint_matches,
                           read_adapter_file, write_adapter_file)
from ..model.layer_adapter import LayerAdapter
from ..model.llama import LlamaModel


@dataclass(frozen=True)
class AdapterConfig:
    """How to adapt a model.

    Attributes:
        prompt_len: P, the learnable prompt tokens of each adapted layer.
        layers: the number of top layers to adapt (30: the top 30), or an explicit list of layer indices.
        gate_activation: ``"tanh"`` (the paper's training code) or ``"none"`` (the raw gate, PEFT and litgpt).
        gate_per_head: one gate per query head (the paper) or one scalar gate per layer (PEFT).
    """

    prompt_len: int = 10
    layers: Union[int, Sequence[int]] = 30
    gate_activation: str = "tanh"
    gate_per_head: bool = True

    def __post_init__(self):
        if not isinstance(self.prompt_len, int) or self.prompt_len <= 0:
            raise ValueError(f"prompt_len must be a positive int, got {self.prompt_len!r}")
        if self.gate_activation not in ("tanh", "none"):
            raise ValueError(f"gate_activation must be 'tanh' or 'none', got {self.gate_activation!r}")
        if not isinstance(self.layers, int):
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def layer_indices(self, n_layers: int) -> list[int]:
        """The adapted layers of a model with ``n_layers`` layers, ascending."""
        if isinstance(self.layers, int):
            if not 0 < self.layers <= n_layers:
                raise ValueError(f"cannot adapt the top {self.layers} layers of a model with {n_layers} layers")
            return list(range(n_layers - self.layers, n_layers))
        indices = sorted(set(self.layers))
        if not indices or indices[0] < 0 or indices[-1] >= n_layers:
            raise ValueError(f"adapter layers {list(self.layers)} must be a non-empty list of indices in "
                             f"[0, {n_layers})")
        return indices

    def to_dict(self, n_layers: int) -> dict:
        """The JSON description stored in adapter files (``layers`` as an explicit index list)."""
        return {"prompt_len": self.prompt_len, "layers": self.layer_indices(n_layers),
                "gate_activation": self.gate_activation, "gate_per_head": self.gate_per_head}


def adapted_layers(model: LlamaModel) -> dict[int, LayerAdapter]:
    """``{layer index: LayerAdapter}`` of every adapted layer of ``model`` (empty when it has none)."""
    return {i: block.attention.adapter for i, block in enumerate(model.layers) if block.attention.adapter}


def add_adapter(model: LlamaModel, config: Optional[AdapterConfig] = None) -> LlamaModel:
    """Freeze every weight of ``model`` and add LLaMA-Adapter's prompts and zero gates (in place).

    Replaces adapters added before. The new parameters are fp32, on the model's device (meta included).

    Returns:
        ``model``, whose only trainable parameters are now ``layers.{i}.attention.adapter.{prompt,gate}``.
    """
    config = AdapterConfig() if config is None else config
    if not isinstance(model, LlamaModel):
        raise TypeError(f"add_adapter needs a fastadapter LlamaModel, got {type(model).__name__}")
    indices = config.layer_indices(model.config.n_layers)
    model.requires_grad_(False)
    device = model.tok_embeddings.weight.device
    for i, block in enumerate(model.layers):
        block.attention.adapter = None
        if i in indices:
            block.attention.adapter = LayerAdapter(config.prompt_len, model.config.dim, model.config.n_heads,
                                                   gate_per_head=config.gate_per_head,
                                                   gate_activation=config.gate_activation, device=device)
    model.adapter_config = config
    model.adapter_source = None
    return model


def base_model_description(model: LlamaModel) -> dict:
    """The ``base_model`` part of an adapter file's description: fingerprint and dimensions of ``model`` (and the
    fingerprint of its exact embedding rows, ``exact_fingerprint``, which a check accepts but a file never holds)."""
    c = model.config
    # A base sharded by FSDP (fastadapter.training.fsdp) recorded its fingerprint while the embedding was whole.
    weight = model.tok_embeddings.weight
    fingerprint = getattr(model, "base_fingerprint", None) or base_model_fingerprint(
        weight, c.n_layers, c.n_heads, c.n_kv_heads)
    exact = None if weight.is_meta else exact_base_model_fingerprint(weight, c.n_layers, c.n_heads, c.n_kv_heads)
    return {"fingerprint": fingerprint, "exact_fingerprint": exact,
            "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
            "vocab_size": c.vocab_size, "family": c.family}


def write_adapter(path: Union[str, os.PathLike], adapters: dict, description: dict, what: str = "the model", *,
                  extra_tensors: Optional[dict] = None, vision: Optional[dict] = None) -> None:
    """Write ``{layer index: LayerAdapter}`` (prompts and gates, fp32) to the adapter file ``path`` for the base
    model ``description`` (:func:`base_model_description`'s keys). Shared by fastadapter's LLaMA, the Hugging
    Face integration and the multimodal model, so all write the same files; the last adds ``extra_tensors`` (its
    image projection) and the ``vision`` description (see :func:`~fastadapter.adapters.adapter_file.write_adapter_file`)."""
    if not adapters:
        raise ValueError(f"{what} has no adapter to save: call add_adapter (apply_adapter) first")
    first = next(iter(adapters.values()))
    config = AdapterConfig(prompt_len=first.prompt_len, layers=list(adapters),
                           gate_activation=first.gate_activation, gate_per_head=first.gate.numel() != 1)
    tensors = {}
    for i, adapter in adapters.items():
        tensors[f"layers.{i}.adapter_prompt"] = adapter.prompt
        tensors[f"layers.{i}.adapter_gate"] = adapter.gate
    tensors.update(extra_tensors or {})
    write_adapter_file(path, tensors, config.to_dict(description["n_layers"]), description, vision=vision)


class ReadAdapter(NamedTuple):
    """What :func:`read_adapter` found: the adapter's configuration, its tensors in fastadapter's layout, the file
    they came from (the weights file inside a PEFT folder), its format, and why its gates are applied as they are."""

    config: AdapterConfig
    tensors: dict
    path: str
    format: str
    gate_activation_reason: str


def read_adapter(path: Union[str, os.PathLike], description: dict, *, format: Optional[str] = None,
                 what: str = "the model", gate_activation: Optional[str] = None) -> ReadAdapter:
    """Read the adapter at ``path`` for the base model ``description``, every tensor checked against the model's
    shapes. Shared by fastadapter's LLaMA and the Hugging Face integration.

    Args:
        format: ``"fastadapter"``, ``"peft"``, ``"litgpt"`` or ``"llama_adapter_v1"``; detected when None.
        gate_activation: for an adapter of another project, how its raw gates are applied (``"tanh"`` or
            ``"none"``; None: its format's default, see :func:`read_foreign_adapter`). A fastadapter file keeps the
            activation it records, and asking for another one is an error.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``gate_activation`` other than the one a fastadapter file was trained with.
        AdapterFileError: an unreadable file, or an adapter made for another base model (a different fingerprint
            or shape); the message names the file and the mismatch.
    """
    path = os.fspath(path)
    format = format or detect_adapter_format(path)
    if format == "fastadapter":
        tensors, meta = read_adapter_file(path)
        _check_base_model(description, path, meta["base_model"], what)
        config_dict = dict(meta["config"])
        if gate_activation not in (None, config_dict["gate_activation"]):
            raise ValueError(f"{path}: this fastadapter adapter was trained with gate_activation="
                             f"{config_dict['gate_activation']!r}; gate_activation={gate_activation!r} applies to "
                             f"adapters of other projects (LLaMA-Adapter v1, PEFT, litgpt)")
        config_dict["gate_activation_reason"] = "the activation recorded in the file (the one it was trained with)"
    else:
        # The foreign readers only need the model's dimensions.
        config_dict, tensors, path = read_foreign_adapter(path, format, types.SimpleNamespace(**description),
                                                          gate_activation=gate_activation)
    config = AdapterConfig(prompt_len=config_dict["prompt_len"], layers=list(config_dict["layers"]),
                           gate_activation=config_dict["gate_activation"],
                           gate_per_head=config_dict["gate_per_head"])
    _check_fits(description, path, config, tensors)
    return ReadAdapter(config, tensors, path, format, config_dict["gate_activation_reason"])


def copy_adapter_tensors(adapters: dict, tensors: dict) -> None:
    """Copy the prompts and gates read by :func:`read_adapter` into ``{layer index: LayerAdapter}``."""
    with torch.no_grad():
        for i, adapter in adapters.items():
            adapter.prompt.copy_(tensors[f"layers.{i}.adapter_prompt"])
            adapter.gate.copy_(tensors[f"layers.{i}.adapter_gate"])


def save_adapter(model: LlamaModel, path: Union[str, os.PathLike]) -> None:
    """Write the adapter of ``model`` (prompts and gates only, fp32) to the safetensors file ``path``."""
    write_adapter(path, adapted_layers(model), base_model_description(model))


def load_adapter(model: LlamaModel, path: Union[str, os.PathLike], *, format: Optional[str] = None,
                 gate_activation: Optional[str] = None) -> LlamaModel:
    """Give ``model`` the adapter stored at ``path`` (in place; replaces any adapter it had).

    Args:
        path: a fastadapter adapter file, or an adapter of another project: the original LLaMA-Adapter v1
            checkpoint, a PEFT ``adaption_prompt`` folder (or its ``adapter_model.safetensors``), a litgpt adapter
            checkpoint.
        format: ``"fastadapter"``, ``"llama_adapter_v1"``, ``"peft"`` or ``"litgpt"``; detected when None.
        gate_activation: ``"tanh"`` or ``"none"`` for an adapter of another project, overriding its format's
            default (LLaMA-Adapter v1: ``"tanh"``, its training code; ``"none"`` reproduces its inference code; see
            :func:`~fastadapter.adapters.adapter_formats.read_foreign_adapter`). A fastadapter file records the
            activation it was trained with: asking for another one is an error.

    After the call, ``model.adapter_source`` is ``{"path", "format", "gate_activation", "gate_activation_reason"}``:
    where the adapter came from and which gate activation it runs with, and why.

    Raises:
        FileNotFoundError: nothing at ``path``.
        AdapterFileError: an unreadable file, or an adapter made for another base model (a different fingerprint
            or shape); the message names the file (for a PEFT folder, its weights file) and the mismatch.
    """
    read = read_adapter(path, base_model_description(model), format=format, gate_activation=gate_activation)
    add_adapter(model, read.config)
    copy_adapter_tensors(adapted_layers(model), read.tensors)
    model.adapter_source = {"path": read.path, "format": read.format, "gate_activation": read.config.gate_activation,
                            "gate_activation_reason": read.gate_activation_reason}
    return model


def _check_base_model(description: dict, path: str, base_model: dict, what: str) -> None:
    """Raise :class:`AdapterFileError` when the file's base model is not the model ``description``."""
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
        if int(base_model[key]) != description[key]:
            raise AdapterFileError(f"{path}: this adapter was made for a base model with {key}={base_model[key]}, "
                                   f"but {what} has {key}={description[key]}")
    if not fingerprint_matches(base_model["fingerprint"], description):
        raise AdapterFileError(f"{path}: this adapter was made for another base model of the same shape "
                               f"(fingerprint {base_model['fingerprint'][:12]}…, the model's is "
                               f"{description['fingerprint'][:12]}…)")


def _check_fits(description: dict, path: str, config: AdapterConfig, tensors: dict) -> None:
    """Raise :class:`AdapterFileError` unless every prompt and gate has the shape the model needs and finite
    values."""
    try:
        indices = config.layer_indices(description["n_layers"])
    except ValueError as exc:
        raise AdapterFileError(f"{path}: {exc}") from exc
    gate_numel = description["n_heads"] if config.gate_per_head else 1
    for i in indices:
        for name, shape in ((f"layers.{i}.adapter_prompt", (config.prompt_len, description["dim"])),
                            (f"layers.{i}.adapter_gate", (gate_numel,))):
            if name not in tensors:
                raise AdapterFileError(f"{path}: tensor {name!r} is missing (expected shape {list(shape)})")
            got = tensors[name]
            if tuple(got.shape) != shape:
                raise AdapterFileError(f"{path}: tensor {name!r} has shape {list(got.shape)}, the model needs "
                                       f"{list(shape)}")
            if not bool(torch.isfinite(got).all()):  # a NaN gate would turn every output into NaN
                raise AdapterFileError(f"{path}: tensor {name!r} holds NaN or infinite values; the adapter is "
                                       f"corrupt (or was saved after training diverged)")
