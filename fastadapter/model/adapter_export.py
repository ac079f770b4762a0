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

from .adapter_file import AdapterFileError, read_adapter_file

EXPORT_FORMATS = ("peft", "litgpt", "v1")


def _raw_gate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.tanh(gate) if activation == "tanh" else gate


def export_adapter(adapter_path: str, out: str, to: str, *, base_model_name: str = "") -> list[str]:
    """Write the fastadapter adapter at ``adapter_path`` as format ``to`` (:data:`EXPORT_FORMATS`) at ``out``
    (a folder for ``peft``, a ``.pth`` file otherwise); returns the files written.

    Raises:
        AdapterFileError: the adapter cannot be expressed in that format (the message says what to train with).
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"--to must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    from .adapter_v2 import is_v2_file
    if is_v2_file(adapter_path):
        raise AdapterFileError(f"{adapter_path}: a LLaMA-Adapter V2 adapter (bias, scale and norms of every layer); "
                               f"PEFT, litgpt and v1 have no place for those: export a --adapter v1 run")
    tensors, meta = read_adapter_file(adapter_path)
    config, base = meta["config"], meta["base_model"]
    layers, n_layers, n_heads = list(config["layers"]), int(base["n_layers"]), int(base["n_heads"])
    activation, per_head = config["gate_activation"], bool(config["gate_per_head"])
    top = list(range(n_layers - len(layers), n_layers))
    if layers != top and to in ("peft", "v1"):
        raise AdapterFileError(f"{adapter_path}: adapts layers {layers}, but {to} adapts the top layers only "
                               f"({top}); train with --adapter-layers N")
    prompts = {i: tensors[f"layers.{i}.adapter_prompt"].float().contiguous() for i in layers}
    gates = {i: tensors[f"layers.{i}.adapter_gate"].float().reshape(-1) for i in layers}
    if to == "peft":
        if per_head:
            raise AdapterFileError(f"{adapter_path}: has one gate per head; PEFT's adaption prompt has one gate per "
                                   f"layer: train with --gate-shape scalar (and --gate-activation none for PEFT's "
                                   f"own training behaviour)")
        from safetensors.torch import save_file
        os.makedirs(out, exist_ok=True)
        state = {}
        for i in layers:
            prefix = f"base_model.model.model.layers.{i}.self_attn"
            state[f"{prefix}.adaption_prompt"] = prompts[i][None].contiguous()
            state[f"{prefix}.adaption_gate"] = _raw_gate(gates[i], activation).contiguous()
        weights = os.path.join(out, "adapter_model.safetensors")
        save_file(state, weights, metadata={"format": "pt"})
        config_file = os.path.join(out, "adapter_config.json")
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump({"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": config["prompt_len"],
                       "adapter_layers": len(layers), "target_modules": "self_attn",
                       "base_model_name_or_path": base_model_name, "inference_mode": True}, f, indent=2)
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
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    torch.save(state, out)
    return [out]
