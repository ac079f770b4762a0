"""``export_adapter``: a fastadapter adapter file written in the layout of another project, so that an adapter
trained with ``fastadapter train`` loads there (the inverse of :mod:`.adapter_formats`).

* ``peft``: a PEFT ``adaption_prompt`` folder (``adapter_config.json``, ``adapter_model.safetensors`` with
  ``base_model.model.model.layers.{i}.self_attn.adaption_prompt [1, P, hidden]`` and ``…adaption_gate [1]``).
  PEFT adapts the top ``adapter_layers`` layers with one raw gate per layer: the adapter needs a scalar gate
  (``--gate-shape scalar``) on the top layers.
* ``litgpt``: a ``.pth`` state dict with ``transformer.h.{i}.attn.adapter_wte.weight [P, n_embd]`` and
  ``…attn.gating_factor [1, 1, H, 1]`` (raw, one per head; a scalar gate is repeated over the heads).
* ``v1``: the original LLaMA-Adapter's ``.pth``: ``adapter_query.weight [P·L, dim]`` (top L layers, bottom block
  first) and ``layers.{i}.attention.gate [1, H, 1, 1]`` (tanh gate, as its training code).

Gate activations are converted exactly: a tanh-trained gate g exports to the raw-gate tools as tanh(g); a raw
gate g exports to v1 (tanh) as atanh(g), which needs |g| < 1.
"""
from __future__ import annotations

import json
import os

import torch

from .adapter_file import AdapterFileError, adapter_file_kind, read_adapter_file

from ..atomic_file import write_atomically
from ..setting_error import SettingError

EXPORT_FORMATS = ("peft", "litgpt", "v1")
#: The files of a PEFT ``adaption_prompt`` folder.
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
#: The ``model_type`` values PEFT's ``adaption_prompt`` adapts (peft/tuners/adaption_prompt/config.py).
PEFT_ADAPTION_PROMPT_FAMILIES = ("llama", "mistral")


def _raw_gate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.tanh(gate) if activation == "tanh" else gate


def export_adapter(adapter_path: str, out: str, to: str, *, base_model_name: str = "") -> list[str]:
    """Write the fastadapter adapter at ``adapter_path`` as format ``to`` (:data:`EXPORT_FORMATS`) at ``out``
    (a folder for ``peft``, a ``.pth`` file otherwise); returns the files written.

    Every file is written atomically (:func:`~fastadapter.atomic_file.write_atomically`); the caller checks that
    ``out`` is not the adapter (``fastadapter export`` does, with :func:`fastadapter.commands._paths.check_outputs`).

    Raises:
        AdapterFileError: the adapter cannot be expressed in that format (the message says what to train with),
            or ``peft`` for a base model family PEFT's adaption prompt does not load (the message names the formats
            that do work).
    """
    if to not in EXPORT_FORMATS:
        raise SettingError("{to} must be one of {formats}, got {value!r}", formats=", ".join(EXPORT_FORMATS), value=to)
    if adapter_file_kind(adapter_path) == "v2":
        raise AdapterFileError.naming("{path}: a LLaMA-Adapter V2 adapter (bias, scale and norms of every layer); "
                                      "PEFT, litgpt and v1 have no place for those: export a {adapter} v1 run",
                                      path=adapter_path)
    tensors, meta = read_adapter_file(adapter_path)
    config, base = meta["config"], meta["base_model"]
    layers, n_layers, n_heads = list(config["layers"]), int(base["n_layers"]), int(base["n_heads"])
    activation, per_head = config["gate_activation"], bool(config["gate_per_head"])
    top = list(range(n_layers - len(layers), n_layers))
    if layers != top and to in ("peft", "v1"):
        raise AdapterFileError.naming("{path}: adapts layers {layers}, but {format} adapts the top layers only "
                                      "({top}); train with {adapter_layers} N", path=adapter_path, layers=layers,
                                      format=to, top=top)
    prompts = {i: tensors[f"layers.{i}.adapter_prompt"].float().contiguous() for i in layers}
    gates = {i: tensors[f"layers.{i}.adapter_gate"].float().reshape(-1) for i in layers}
    family = base.get("family")
    if to == "peft" and family is not None and family not in PEFT_ADAPTION_PROMPT_FAMILIES:
        raise AdapterFileError.naming("{path}: its base model is a {family!r} model, and PEFT's adaption prompt "
                                      "loads only {families} models (PEFT refuses it: \"Unsupported model type for "
                                      "adaption prompt\"); export {to} litgpt or {to} v1, or use the fastadapter file "
                                      "itself (fastadapter generate, or fastadapter.integrations.transformers."
                                      "load_adapter on the Hugging Face model)", path=adapter_path, family=family,
                                      families=" and ".join(PEFT_ADAPTION_PROMPT_FAMILIES))
    if to == "peft":
        if per_head:
            raise AdapterFileError.naming("{path}: has one gate per head; PEFT's adaption prompt has one gate per "
                                          "layer: train with {gate_shape} scalar (and {gate_activation} none for "
                                          "PEFT's own training behaviour)", path=adapter_path)
        from safetensors.torch import save_file
        os.makedirs(out, exist_ok=True)
        state = {}
        for i in layers:
            prefix = f"base_model.model.model.layers.{i}.self_attn"
            state[f"{prefix}.adaption_prompt"] = prompts[i][None].contiguous()
            state[f"{prefix}.adaption_gate"] = _raw_gate(gates[i], activation).contiguous()
        weights, config_file = (os.path.join(out, name) for name in PEFT_FILES)
        write_atomically(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        peft_config = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": config["prompt_len"],
                       "adapter_layers": len(layers), "target_modules": "self_attn",
                       "base_model_name_or_path": base_model_name, "inference_mode": True}

        def write_config(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(peft_config, f, indent=2)

        write_atomically(config_file, write_config)
        return [config_file, weights]
    if to == "litgpt":
        state = {}
        for i in layers:
            gate = _raw_gate(gates[i], activation)
            state[f"transformer.h.{i}.attn.adapter_wte.weight"] = prompts[i]
            state[f"transformer.h.{i}.attn.gating_factor"] = gate.expand(n_heads).reshape(1, 1, n_heads, 1).clone()
    else:
        state = {"adapter_query.weight": torch.cat([prompts[i] for i in layers])}
        for i in layers:
            gate = gates[i].expand(n_heads).clone()
            if activation == "none":
                if bool((gate.abs() >= 1).any()):
                    raise AdapterFileError(f"{adapter_path}: layer {i} has a raw gate of magnitude >= 1, which "
                                           f"LLaMA-Adapter v1's tanh gate cannot express")
                gate = torch.atanh(gate)
            state[f"layers.{i}.attention.gate"] = gate.reshape(1, n_heads, 1, 1)
    write_atomically(out, lambda tmp: torch.save(state, tmp))
    return [out]
