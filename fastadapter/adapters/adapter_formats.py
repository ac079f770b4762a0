"""Adapters made by other projects, read into fastadapter's layout (``layers.{i}.adapter_prompt [P, dim]``,
``layers.{i}.adapter_gate [Hq] or [1]``) with the gate activation that makes the model compute the same thing.

* ``llama_adapter_v1`` (the original LLaMA-Adapter): ``adapter_query.weight [P·L, dim]`` for the top L layers of
  the model (block j belongs to layer ``n_layers - L + j``) and ``layers.{i}.attention.gate [1, H, 1, 1]``, fp32.
  The official extraction saves the gate of *every* layer (the lower, unused ones stay zero), older files only
  those of the adapted layers, so L is found as :func:`_v1_adapted_layers` explains. One gate per head, tanh by
  default (the original training code); the original v1 inference code uses the raw gate, which callers get with
  ``gate_activation="none"`` (see :func:`read_foreign_adapter`).
* ``peft`` (``adaption_prompt``): ``…layers.{i}.self_attn.adaption_prompt [1, P, hidden]`` and
  ``…adaption_gate [1]``; raw scalar gate.
* ``litgpt``: ``transformer.h.{i}.attn.adapter_wte.weight [P, n_embd]`` and ``…attn.gating_factor [1, 1, H, 1]``
  (older versions: ``[1, H, 1, 1]``); raw gate, one per head. See "litgpt >= 0.5.5" below.

Every one of them projects the prompt with the layer's frozen key/value projections, without RoPE, and adds the
gated, separately softmaxed prefix attention to the word attention: the computation of zero-init attention.

The gate activation of a v1 import. The original LLaMA-Adapter v1 *training* code gates the prefix with
``tanh(gate)``, its *inference* code (``llama/model.py`` of the release) multiplies by the raw gate. fastadapter
imports v1 checkpoints with ``tanh`` by default, the function the gates were trained under, so the adapter computes
what training optimised; ``gate_activation="none"`` reproduces what the released inference code prints. Which one
was used, and why, is in the ``gate_activation_reason`` of :func:`read_foreign_adapter`'s config (also logged on
the ``fastadapter`` logger, and kept by ``load_adapter`` as ``model.adapter_source``).

litgpt >= 0.5.5. litgpt 0.5.5 (commit fabf765, "Drop interleave placement in QKV matrix") changed its fused
``qkv`` weight from per-group interleaved rows ``[q_0..q_{r-1}, k, v]`` per kv group to three blocks
``[all q heads; all k heads; all v heads]``, but ``litgpt/adapter.py`` (up to 0.5.13 at least) still reads the
prompt's ``qkv`` output as the interleaved layout: for kv group g of G (``r = n_head / G`` query heads per group)
its prefix keys come from head-size block ``g·(r+2) + r`` of that output and its values from block
``g·(r+2) + r + 1`` (:func:`litgpt_prefix_blocks`), where the keys and values really are blocks ``n_head + g`` and
``n_head + G + g``. The values agree only for the last group (g = G − 1), the keys only where
``g·(r+1) = r·(G−1)``; both agree only for multi-query attention (G = 1). So on every model with several kv groups
(LLaMA-7B's MHA included) the prefix keys and values of essentially every head are the prompt projected through
query rows or another head's rows. fastadapter projects the prompt with the true key/value weights (the paper,
litgpt < 0.5.5). An adapter trained with litgpt >= 0.5.5 therefore runs here with the prefix attention the paper
defines, not the one it was trained against: wherever a gate is non-zero its heads attend to other keys and
values than in litgpt, and the outputs differ from litgpt's (zero gates give the base model in both; multi-query
models compute exactly what litgpt computes). Its learned effect is not reproduced; the file does not record
litgpt's version, so a litgpt import on a model with several kv groups warns, naming the heads.
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from typing import Optional

import torch

from .adapter_file import METADATA_KEY, AdapterFileError
from ..model.config import LlamaConfig

FORMATS = ("fastadapter", "llama_adapter_v1", "peft", "litgpt")

_log = logging.getLogger("fastadapter")

#: Why each format's gates get their default activation (the ``gate_activation_reason`` of an import).
_DEFAULT_ACTIVATION_REASONS = {
    "llama_adapter_v1": ("tanh(gate), as the original LLaMA-Adapter v1 training code that learned these gates "
                         "(its inference code multiplies by the raw gate instead: pass gate_activation='none' to "
                         "reproduce what that code computes)"),
    "peft": "the raw gate, as PEFT's adaption_prompt computes it",
    "litgpt": "the raw gate, as litgpt's adapter computes it",
}

_V1_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.attention\.gate$")
# The names of the official v1 releases ("llama_adapter_len10_layer30_release.pth") say P and L.
_V1_NAME = re.compile(r"len(\d+)_layer(\d+)")
# The paper's recipe (and AdapterConfig's defaults): P = 10 on the top 30 layers.
_PAPER_PROMPT_LEN, _PAPER_LAYERS = 10, 30
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


def read_foreign_adapter(path: str, format: str, model_config: LlamaConfig, *, prompt_len: Optional[int] = None,
                         gate_activation: Optional[str] = None) -> tuple[dict, dict, str]:
    """``(config_dict, tensors, weights_file)`` in fastadapter's layout for an adapter of another project.

    ``config_dict`` has ``prompt_len``, ``layers`` (explicit indices), ``gate_activation``, ``gate_per_head``;
    ``weights_file`` is the file the tensors came from (inside the folder for PEFT), for error messages.

    Args:
        model_config: the target model's ``dim``, ``n_layers`` and ``n_heads`` (a :class:`LlamaConfig` or any
            object with these attributes).
        prompt_len: P, when the caller knows it. A ``llama_adapter_v1`` file holds only the P·L prompt rows of
            its L layers, so P is then inferred when not given (see :func:`_v1_adapted_layers`); the other
            formats store P, and a different value here is an error.
        gate_activation: ``"tanh"`` or ``"none"``, overriding the activation of the format. By default
            ``llama_adapter_v1`` gives ``"tanh"``, as the original training code (``γ = tanh(gate)``), while the
            original v1 *inference* code multiplies by the raw gate: pass ``"none"`` to reproduce what that code
            computes with a released checkpoint. PEFT and litgpt use the raw gate (``"none"``).

    ``config_dict["gate_activation_reason"]`` says which activation was used and why (also logged at INFO on the
    ``fastadapter`` logger). A litgpt adapter on a model with several kv groups warns: see the module docstring.
    """
    if gate_activation not in (None, "tanh", "none"):
        raise ValueError(f"gate_activation must be 'tanh' or 'none', got {gate_activation!r}")
    if prompt_len is not None and (not isinstance(prompt_len, int) or prompt_len <= 0):
        raise ValueError(f"prompt_len must be a positive int, got {prompt_len!r}")
    if format == "llama_adapter_v1":
        config_dict, tensors = _read_llama_adapter_v1(path, model_config, prompt_len)
        weights = path
    elif format == "peft":
        weights = _peft_weights_file(path) if os.path.isdir(path) else path
        config_dict, tensors = _read_peft(weights)
    elif format == "litgpt":
        weights = path
        config_dict, tensors = _read_litgpt(path)
    else:
        raise ValueError(f"unknown adapter format {format!r}; expected one of {FORMATS}")
    if prompt_len is not None and config_dict["prompt_len"] != prompt_len:
        raise AdapterFileError(f"{weights}: the prompts have P={config_dict['prompt_len']} rows, but "
                               f"prompt_len={prompt_len} was asked for")
    if gate_activation is not None:
        config_dict["gate_activation"] = gate_activation
        config_dict["gate_activation_reason"] = f"{_activation_words(gate_activation)}, as the caller asked"
    else:
        config_dict["gate_activation_reason"] = _DEFAULT_ACTIVATION_REASONS[format]
    _log.info("%s: %s adapter, gates applied as %s", weights, format, config_dict["gate_activation_reason"])
    if format == "litgpt":
        _warn_litgpt_prefix_rows(weights, model_config)
    return config_dict, tensors, weights


def _activation_words(activation: str) -> str:
    return "tanh(gate)" if activation == "tanh" else "the raw gate"


def litgpt_prefix_blocks(n_heads: int, n_kv_heads: int) -> tuple[list[int], list[int]]:
    """The head-size blocks of the fused ``qkv`` output that litgpt >= 0.5.5's adapter takes as the prefix keys
    and values of each kv group: ``(key_blocks [G], value_blocks [G])``.

    litgpt's fused output is ``n_heads + 2·G`` blocks of ``head_size`` (queries, then keys, then values); the true
    key and value blocks of group g are ``n_heads + g`` and ``n_heads + G + g``. ``litgpt/adapter.py`` views the
    output as ``[G, r + 2, head_size]`` (``r = n_heads / G``), the interleaved layout of litgpt < 0.5.5, and takes
    slots r and r + 1 of each group (see this module's docstring).
    """
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads must be a positive multiple of n_kv_heads, got {n_heads} and {n_kv_heads}")
    per_group = n_heads // n_kv_heads
    keys = [g * (per_group + 2) + per_group for g in range(n_kv_heads)]
    return keys, [block + 1 for block in keys]


def litgpt_mismatched_heads(n_heads: int, n_kv_heads: int) -> tuple[list[int], list[int]]:
    """``(heads with wrong keys, heads with wrong values)``: the query heads whose prefix keys, resp. values,
    litgpt >= 0.5.5 projects through other rows than the true key/value weights (both empty only for multi-query
    attention)."""
    keys, values = litgpt_prefix_blocks(n_heads, n_kv_heads)
    per_group = n_heads // n_kv_heads

    def heads(groups):
        return [h for g in groups for h in range(g * per_group, (g + 1) * per_group)]

    return (heads(g for g in range(n_kv_heads) if keys[g] != n_heads + g),
            heads(g for g in range(n_kv_heads) if values[g] != n_heads + n_kv_heads + g))


def _warn_litgpt_prefix_rows(path: str, model_config) -> None:
    n_heads = model_config.n_heads
    n_kv_heads = getattr(model_config, "n_kv_heads", None) or n_heads
    wrong_keys, wrong_values = litgpt_mismatched_heads(n_heads, n_kv_heads)
    if not wrong_keys and not wrong_values:
        return
    warnings.warn(f"{path}: litgpt >= 0.5.5 projects the adaption prompt's keys and values through the wrong rows "
                  f"of its fused qkv weight (its adapter still reads the interleaved layout litgpt 0.5.5 dropped); "
                  f"fastadapter uses the layer's true key/value weights, as the paper and litgpt < 0.5.5. If this "
                  f"adapter was trained with litgpt >= 0.5.5, litgpt's prefix keys differ from these on heads "
                  f"{_ranges(wrong_keys) or 'none'} and its prefix values on heads {_ranges(wrong_values) or 'none'} "
                  f"of this model: wherever those heads' gates are non-zero the outputs differ from litgpt's and the "
                  f"learned effect is not reproduced (adapters of litgpt < 0.5.5 are exact)",
                  UserWarning, stacklevel=4)


def _by_layer(path: str, state: dict, pattern: re.Pattern) -> dict[int, dict[str, torch.Tensor]]:
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = pattern.search(key)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if not found:
        raise AdapterFileError(f"{path}: no adapter tensors found")
    return dict(sorted(found.items()))


def _read_llama_adapter_v1(path: str, model_config: LlamaConfig, prompt_len: Optional[int] = None
                           ) -> tuple[dict, dict]:
    state = _read_state_dict(path)
    query_key = next((k for k in state if k.endswith("adapter_query.weight")), None)
    if query_key is None:
        raise AdapterFileError(f"{path}: tensor 'adapter_query.weight' [P·L, dim] is missing")
    query = state[query_key]
    if query.dim() != 2 or query.shape[0] == 0 or query.shape[1] != model_config.dim:
        raise AdapterFileError(f"{path}: tensor 'adapter_query.weight' has shape {list(query.shape)}, expected "
                               f"[P·L, {model_config.dim}]")
    gates = {}
    for key, tensor in state.items():
        match = _V1_GATE.search(key)
        if match:
            gates[int(match.group(1))] = tensor
    if not gates:
        # The very first v1 checkpoints had no gate tensors in the file; the adapted layers are then the top
        # L = rows / P ones, and P cannot be told from the file.
        raise AdapterFileError(f"{path}: no 'layers.{{i}}.attention.gate' tensors: cannot tell which layers the "
                               f"prompt rows belong to")
    n_layers = model_config.n_layers
    if max(gates) >= n_layers:
        raise AdapterFileError(f"{path}: tensor 'layers.{max(gates)}.attention.gate' is for layer {max(gates)}, but "
                               f"the model has {n_layers} layers")
    layers = _v1_adapted_layers(path, query.shape[0], gates, n_layers, prompt_len)
    prompt_len = query.shape[0] // len(layers)
    tensors = {}
    # Block j of the prompt rows belongs to the j-th adapted layer from the bottom (the code walks the top
    # layers in order, taking one block each); the gates of the other layers are unused.
    for j, i in enumerate(layers):
        tensors[f"layers.{i}.adapter_prompt"] = query[j * prompt_len:(j + 1) * prompt_len].float()
        tensors[f"layers.{i}.adapter_gate"] = gates[i].float().reshape(-1)
    per_head = gates[layers[0]].numel() != 1
    return ({"prompt_len": prompt_len, "layers": layers, "gate_activation": "tanh", "gate_per_head": per_head},
            tensors)


def _v1_adapted_layers(path: str, rows: int, gates: dict[int, torch.Tensor], n_layers: int,
                       prompt_len: Optional[int]) -> list[int]:
    """The adapted layers (ascending) of a v1 checkpoint whose ``adapter_query.weight`` has ``rows`` = P·L rows
    and whose gates ``{layer: [1, H, 1, 1]}`` are ``gates``, for a model of ``n_layers`` layers.

    The original code adapts the top L layers. Its official extraction saves the gates of all layers (the lower
    ones unused and zero), older files only the adapted layers' gates, so the number of gates is not L. In order:

    1. ``prompt_len`` given: L = rows / P; the gated layers when there are L of them, else the top L.
    2. The zero gates: the L (dividing rows) for which the gated layers below the top L are exactly those whose
       gate is all zero — the official layout once trained, and files with only the adapted layers' gates.
    3. Gates only for the adapted layers: L = the number of gates (also when they are not the top layers).
    4. The file name of the official releases, ``…len{P}_layer{L}…``.
    5. The paper's recipe, P = 10 or the top ``min(n_layers, 30)`` layers, when only one of them fits (warns).

    Any L must divide ``rows`` and have a gate for each of its layers; otherwise an :class:`AdapterFileError`
    lists what the file holds and the (P, L) pairs that would fit.
    """
    gated = sorted(gates)
    zero = sorted(i for i in gated if not gates[i].any())

    def top(n: int) -> list[int]:
        return list(range(n_layers - n, n_layers))

    def fits(n: int) -> bool:
        return 0 < n <= n_layers and rows % n == 0 and set(top(n)) <= set(gates)

    found = (f"adapter_query.weight has {rows} rows (P·L), gates for layers {_ranges(gated)} (all zero: "
             f"{_ranges(zero) or 'none'}), the model has {n_layers} layers")
    if prompt_len is not None:
        n = rows // prompt_len
        if rows % prompt_len == 0 and n == len(gated):
            return gated
        if rows % prompt_len == 0 and fits(n):
            return top(n)
        raise AdapterFileError(f"{path}: prompt_len={prompt_len} does not fit: {found}; the top L = rows / P "
                               f"layers must all have a gate")
    for n in range(1, n_layers + 1):
        if fits(n) and [i for i in gated if i < n_layers - n] == zero:
            return top(n)
    if rows % len(gated) == 0:
        return gated
    match = _V1_NAME.search(os.path.basename(path))
    if match and int(match.group(1)) * int(match.group(2)) == rows and fits(int(match.group(2))):
        return top(int(match.group(2)))
    recipe = {n for n in (rows // _PAPER_PROMPT_LEN if rows % _PAPER_PROMPT_LEN == 0 else 0,
                          min(n_layers, _PAPER_LAYERS)) if fits(n)}
    if len(recipe) == 1:
        n = recipe.pop()
        warnings.warn(f"{path}: guessed P={rows // n} on the top {n} layers from the paper's recipe ({found}); "
                      f"pass prompt_len (read_foreign_adapter) if that is wrong", stacklevel=5)
        return top(n)
    pairs = [f"P={rows // n}, L={n}" for n in range(1, n_layers + 1) if fits(n)]
    raise AdapterFileError(f"{path}: cannot tell the prompt length P and the adapted layers L: {found}; the "
                           f"lower layers' gates are not exactly the zero ones; "
                           f"{'candidates: ' + '; '.join(pairs) if pairs else 'no top L layers fit'}. Pass "
                           f"prompt_len (read_foreign_adapter) to choose")


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


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
