"""Adapters made by other projects, read into fastadapter's layout (``layers.{i}.adapter_prompt [P, dim]``,
``layers.{i}.adapter_gate [Hq] or [1]``) with the gate activation that makes the model compute the same thing.

* ``llama_adapter_v1`` (the original LLaMA-Adapter): ``adapter_query.weight [P·L, dim]`` (block j belongs to the
  j-th adapted layer) and ``layers.{i}.attention.gate [1, H, 1, 1]``; tanh gate, one per head.
* ``peft`` (``adaption_prompt``): ``…layers.{i}.self_attn.adaption_prompt [1, P, hidden]`` and
  ``…adaption_gate [1]``; raw scalar gate.
* ``litgpt``: ``transformer.h.{i}.attn.adapter_wte.weight [P, n_embd]`` and ``…attn.gating_factor [1, 1, H, 1]``
  (older versions: ``[1, H, 1, 1]``); raw gate, one per head.

Every one of them projects the prompt with the layer's frozen key/value projections, without RoPE, and adds the
gated, separately softmaxed prefix attention to the word attention: the computation of zero-init attention.
"""
from __future__ import annotations

import json
import os
import re

import torch

from .adapter_file import METADATA_KEY, AdapterFileError
from .config import LlamaConfig

FORMATS = ("fastadapter", "llama_adapter_v1", "peft", "litgpt")

_V1_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.attention\.gate$")
_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")
_LITGPT_KEY = re.compile(r"(?:^|\.)transformer\.h\.(\d+)\.attn\.(adapter_wte\.weight|gating_factor)$")


def _peft_weights_file(folder: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{folder}: a PEFT adapter folder needs adapter_model.safetensors or "
                            f"adapter_model.bin")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or of a ``torch.save`` file (read with ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as exc:
            raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for a corrupt or truncated file
        raise AdapterFileError(f"{path}: cannot be read as a PyTorch checkpoint ({exc})") from exc
    # litgpt (through Lightning Fabric) nests the weights under "model".
    if isinstance(state, dict) and set(state) == {"model"} and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise AdapterFileError(f"{path}: expected a dict of tensors")
    return state


def detect_adapter_format(path: str) -> str:
    """Which of :data:`FORMATS` the adapter at ``path`` (file or PEFT folder) is in."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return "peft"
        raise AdapterFileError(f"{path}: a folder adapter must be a PEFT folder with adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                if METADATA_KEY in (f.metadata() or {}):
                    return "fastadapter"
                keys = list(f.keys())
        except SafetensorError as exc:
            raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        keys = list(_read_state_dict(path))
    if any(k.endswith("adapter_query.weight") for k in keys):
        return "llama_adapter_v1"
    if any(_PEFT_KEY.search(k) for k in keys):
        return "peft"
    if any(_LITGPT_KEY.search(k) for k in keys):
        return "litgpt"
    raise AdapterFileError(f"{path}: not an adapter fastadapter knows: expected fastadapter metadata, "
                           f"adapter_query.weight (LLaMA-Adapter v1), *.adaption_prompt (PEFT) or "
                           f"transformer.h.*.attn.adapter_wte.weight (litgpt); found keys {keys[:5]}")


def read_foreign_adapter(path: str, format: str, model_config: LlamaConfig) -> tuple[dict, dict, str]:
    """``(config_dict, tensors, weights_file)`` in fastadapter's layout for an adapter of another project.

    ``config_dict`` has ``prompt_len``, ``layers`` (explicit indices), ``gate_activation``, ``gate_per_head``;
    ``weights_file`` is the file the tensors came from (inside the folder for PEFT), for error messages.
    """
    if format == "llama_adapter_v1":
        return (*_read_llama_adapter_v1(path, model_config), path)
    if format == "peft":
        weights = _peft_weights_file(path) if os.path.isdir(path) else path
        return (*_read_peft(weights), weights)
    if format == "litgpt":
        return (*_read_litgpt(path), path)
    raise ValueError(f"unknown adapter format {format!r}; expected one of {FORMATS}")


def _by_layer(path: str, state: dict, pattern: re.Pattern) -> dict[int, dict[str, torch.Tensor]]:
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = pattern.search(key)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if not found:
        raise AdapterFileError(f"{path}: no adapter tensors found")
    return dict(sorted(found.items()))


def _read_llama_adapter_v1(path: str, model_config: LlamaConfig) -> tuple[dict, dict]:
    state = _read_state_dict(path)
    query_key = next((k for k in state if k.endswith("adapter_query.weight")), None)
    if query_key is None:
        raise AdapterFileError(f"{path}: tensor 'adapter_query.weight' [P·L, dim] is missing")
    gates = {}
    for key, tensor in state.items():
        match = _V1_GATE.search(key)
        if match:
            gates[int(match.group(1))] = tensor
    query = state[query_key]
    layers = sorted(gates)
    if not layers:
        # The very first v1 checkpoints had no gate tensors in the file; the adapted layers are then the top
        # L = rows / P ones, and P cannot be told from the file.
        raise AdapterFileError(f"{path}: no 'layers.{{i}}.attention.gate' tensors: cannot tell which layers the "
                               f"prompt rows belong to")
    if query.dim() != 2 or query.shape[0] % len(layers) != 0 or query.shape[1] != model_config.dim:
        raise AdapterFileError(f"{path}: tensor 'adapter_query.weight' has shape {list(query.shape)}, expected "
                               f"[P·{len(layers)}, {model_config.dim}] for {len(layers)} gated layers")
    prompt_len = query.shape[0] // len(layers)
    tensors = {}
    # Block j of the prompt rows belongs to the j-th adapted layer from the bottom (the code walks the top
    # layers in order, taking one block each).
    for j, i in enumerate(layers):
        tensors[f"layers.{i}.adapter_prompt"] = query[j * prompt_len:(j + 1) * prompt_len].float()
        tensors[f"layers.{i}.adapter_gate"] = gates[i].float().reshape(-1)
    per_head = gates[layers[0]].numel() != 1
    return ({"prompt_len": prompt_len, "layers": layers, "gate_activation": "tanh", "gate_per_head": per_head},
            tensors)


def _read_peft(weights: str) -> tuple[dict, dict]:
    found = _by_layer(weights, _read_state_dict(weights), _PEFT_KEY)
    config_file = os.path.join(os.path.dirname(weights), "adapter_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            peft_config = json.load(f)
        peft_type = peft_config.get("peft_type")
        if peft_type not in (None, "ADAPTION_PROMPT"):
            raise AdapterFileError(f"{config_file}: peft_type is {peft_type!r}, fastadapter reads ADAPTION_PROMPT")
        if peft_config.get("adapter_layers") not in (None, len(found)):
            raise AdapterFileError(f"{weights}: adapter_config.json says adapter_layers="
                                   f"{peft_config['adapter_layers']} but the file holds {len(found)} layers")
    tensors, prompt_len = {}, None
    for i, parts in found.items():
        for part in ("prompt", "gate"):
            if part not in parts:
                raise AdapterFileError(f"{weights}: layer {i} has no adaption_{part} tensor")
        prompt = parts["prompt"]
        if prompt.dim() != 3 or prompt.shape[0] != 1:
            raise AdapterFileError(f"{weights}: layer {i} adaption_prompt has shape {list(prompt.shape)}, expected "
                                   f"[1, P, hidden]")
        prompt_len = prompt.shape[1]
        tensors[f"layers.{i}.adapter_prompt"] = prompt[0].float()
        tensors[f"layers.{i}.adapter_gate"] = parts["gate"].float().reshape(-1)
    return ({"prompt_len": prompt_len, "layers": list(found), "gate_activation": "none", "gate_per_head": False},
            tensors)


def _read_litgpt(path: str) -> tuple[dict, dict]:
    found = _by_layer(path, _read_state_dict(path), _LITGPT_KEY)
    tensors, prompt_len, per_head = {}, None, True
    for i, parts in found.items():
        for part in ("adapter_wte.weight", "gating_factor"):
            if part not in parts:
                raise AdapterFileError(f"{path}: tensor 'transformer.h.{i}.attn.{part}' is missing")
        prompt = parts["adapter_wte.weight"]
        if prompt.dim() != 2:
            raise AdapterFileError(f"{path}: 'transformer.h.{i}.attn.adapter_wte.weight' has shape "
                                   f"{list(prompt.shape)}, expected [P, n_embd]")
        prompt_len = prompt.shape[0]
        # [1, 1, H, 1] and the older [1, H, 1, 1] both hold one value per head, in head order.
        gate = parts["gating_factor"].float().reshape(-1)
        per_head = gate.numel() != 1
        tensors[f"layers.{i}.adapter_prompt"] = prompt.float()
        tensors[f"layers.{i}.adapter_gate"] = gate
    return ({"prompt_len": prompt_len, "layers": list(found), "gate_activation": "none", "gate_per_head": per_head},
            tensors)
