"""LLaMA-Adapter V2 (arXiv 2304.15010) on a :class:`LlamaModel`: ``add_adapter_v2``, ``save_adapter_v2``,
``load_adapter_v2``.

On top of V1's prompts and zero-init gates (one gate per head of every adapted layer, as V2's code), V2 unfreezes

* **bias and scale of every linear layer** of every block (``wq wk wv wo w1 w2 w3``): ``y = s ⊙ (W x + b)``, the
  paper's formula, with ``b [out] = 0`` and ``s [out] = 1`` at the start, so that the model starts as the base
  model (:class:`BiasScaleLinear`; a base bias such as Qwen2's q/k/v bias stays frozen inside ``W x``);
* **the RMSNorm weights** (``attention_norm``, ``ffn_norm`` of every block and the final ``norm``), kept fp32;
  Qwen3's q/k norms stay frozen, and models whose norms are not LLaMA's RMSNorm (Gemma2/3, Olmo) are refused.

With the paper's settings on LLaMA-7B (P = 10 on the top 30 of 32 layers, gates per head) that is
1,229,760 (V1) + 2,719,744 (bias and scale: 2 · (4·4096 + 2·11008 + 4096) · 32, 0.04 % of the 6.74 B weights, the
paper's figure) + 266,240 (norms: (2·32 + 1) · 4096) = 4,215,744 trainable parameters.

The released V2 code is not read: ``llama_adapter_v2_chat65b`` scales the *input* of each linear
(``W (s ⊙ x) + b``, ``wq_scale [in]``) and ``llama_adapter_v2_multimodal7b`` trains a bias on ``wq``/``wo`` only
(plus LoRA), so neither file holds the paper's ``s ⊙ (W x + b)`` of this module.

Files: a safetensors file whose ``fastadapter_v2`` metadata holds V1's description (config and base-model
fingerprint); tensors ``layers.{i}.adapter_prompt``/``adapter_gate`` (adapted layers),
``layers.{i}.attention.wq.v2_bias``/``v2_scale`` (every linear), ``layers.{i}.attention_norm.weight``,
``layers.{i}.ffn_norm.weight`` and ``norm.weight``.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import nn

from .. import linear as fast_linear
from ..setting_error import SettingError
from .adapter import AdapterConfig, _check_base_model, adapted_layers, add_adapter, base_model_description
from .adapter_file import V2_METADATA_KEY as METADATA_KEY, AdapterFileError, adapter_file_kind
from ..model.llama import LlamaModel
from ..model.norms import RMSNorm

LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3")
NORMS = ("attention_norm", "ffn_norm")


class BiasScaleLinear(nn.Module):
    """``y = s ⊙ (W x + b)``: a frozen linear's weight (and base bias) with V2's learnable ``v2_bias [out]``
    (zeros) and ``v2_scale [out]`` (ones), fp32. ``x [..., in]`` → ``[..., out]`` in ``x``'s compute dtype."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.v2_bias = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.v2_scale = nn.Parameter(torch.ones(self.out_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fast_linear.linear(x, self.weight, self.bias)
        return (y + self.v2_bias.to(y.dtype)) * self.v2_scale.to(y.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same in fp32, written as the paper's formula (for tests)."""
        w = self.weight.float()
        b0 = 0 if self.bias is None else self.bias.float()
        return self.v2_scale * (x.float() @ w.t() + b0 + self.v2_bias)


class TrainableRMSNorm(RMSNorm):
    """An RMSNorm whose fp32 weight is trained (V2's unfrozen norms); the weight is cast to the input's dtype."""

    def __init__(self, base: RMSNorm):
        nn.Module.__init__(self)
        self.eps = base.eps
        self.weight = nn.Parameter(base.weight.detach().float(), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_kernel_scale(x) is not None:  # fp32 on the CPU: the row kernels, the weight's gradient too
            return super().forward(x)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.to(x.dtype)


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def _make_trainable_norm(parent: nn.Module, name: str) -> None:
    norm = getattr(parent, name)
    if isinstance(norm, TrainableRMSNorm):  # a second call keeps the norm's current weight, trainable again
        norm.weight.requires_grad_(True)
    else:
        setattr(parent, name, TrainableRMSNorm(norm))


def add_adapter_v2(model: LlamaModel, config: Optional[AdapterConfig] = None) -> LlamaModel:
    """Give ``model`` LLaMA-Adapter V2 (in place): V1's prompts and gates (:func:`fastadapter.add_adapter`),
    bias and scale on every linear of every block, trainable norms. The model computes exactly what the base
    model computes until training moves a parameter.

    Returns:
        ``model``; its trainable parameters are the adapter's, the ``v2_bias``/``v2_scale`` of every linear and
        the norm weights (all fp32).
    """
    if model.config.norm != "rmsnorm":
        raise SettingError("LLaMA-Adapter V2 trains the weights of LLaMA's RMSNorms (x / rms(x) · w); this model's "
                           "norms are {norm!r} (Gemma's · (1 + w), Olmo's weightless layer norm): use LLaMA-Adapter "
                           "V1 ({adapter} v1) on it", norm=model.config.norm)
    add_adapter(model, config)  # freezes every base weight
    for block in model.layers:
        for name in LINEARS:
            linear = _get(block, name)
            if isinstance(linear, BiasScaleLinear):  # a second call: bias and scale start again at 0 and 1
                linear.v2_bias = nn.Parameter(torch.zeros_like(linear.v2_bias))
                linear.v2_scale = nn.Parameter(torch.ones_like(linear.v2_scale))
            else:
                _set(block, name, BiasScaleLinear(linear))
        for name in NORMS:
            _make_trainable_norm(block, name)
    _make_trainable_norm(model, "norm")
    model.adapter_version = 2
    return model


def v2_parameters(model: LlamaModel) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of everything a V2 adapter file stores (see the module docstring)."""
    tensors = {}
    for i, adapter in adapted_layers(model).items():
        tensors[f"layers.{i}.adapter_prompt"] = adapter.prompt
        tensors[f"layers.{i}.adapter_gate"] = adapter.gate
    for i, block in enumerate(model.layers):
        for name in LINEARS:
            linear = _get(block, name)
            if not isinstance(linear, BiasScaleLinear):
                raise ValueError("the model has no LLaMA-Adapter V2: call add_adapter_v2 first")
            tensors[f"layers.{i}.{name}.v2_bias"] = linear.v2_bias
            tensors[f"layers.{i}.{name}.v2_scale"] = linear.v2_scale
        for name in NORMS:
            tensors[f"layers.{i}.{name}.weight"] = getattr(block, name).weight
    tensors["norm.weight"] = model.norm.weight
    return tensors


def save_adapter_v2(model: LlamaModel, path: Union[str, os.PathLike]) -> None:
    """Write the V2 adapter of ``model`` (every trained tensor, fp32) to the safetensors file ``path``."""
    from safetensors.torch import save_file

    adapters = adapted_layers(model)
    if not adapters:
        raise ValueError("the model has no adapter to save: call add_adapter_v2 first")
    first = next(iter(adapters.values()))
    config = AdapterConfig(prompt_len=first.prompt_len, layers=list(adapters), gate_activation=first.gate_activation,
                           gate_per_head=first.gate.numel() != 1)
    payload = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in v2_parameters(model).items()}
    description = {"format_version": 1, "config": config.to_dict(model.config.n_layers),
                   "base_model": {k: v for k, v in base_model_description(model).items() if k != "exact_fingerprint"}}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(payload, tmp, metadata={METADATA_KEY: json.dumps(description)})
    os.replace(tmp, path)


def is_v2_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a V2 adapter file written by :func:`save_adapter_v2`."""
    return adapter_file_kind(path) == "v2"


def load_adapter_v2(model: LlamaModel, path: Union[str, os.PathLike]) -> LlamaModel:
    """Give ``model`` the V2 adapter in ``path`` (in place).

    Raises:
        AdapterFileError: not a V2 file, made for another base model (fingerprint or shape), or a tensor
            missing or of the wrong shape (named).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not is_v2_file(path):
        raise AdapterFileError(f"{path}: not a LLaMA-Adapter V2 file of fastadapter (no {METADATA_KEY!r} metadata)")
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    base = meta["base_model"]
    ours = base_model_description(model)
    _check_base_model(ours, path, base, "the model")
    c = meta["config"]
    add_adapter_v2(model, AdapterConfig(prompt_len=c["prompt_len"], layers=list(c["layers"]),
                                        gate_activation=c["gate_activation"], gate_per_head=c["gate_per_head"]))
    with torch.no_grad():
        for name, target in v2_parameters(model).items():
            if name not in tensors:
                raise AdapterFileError(f"{path}: tensor {name!r} is missing (expected shape {list(target.shape)})")
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise AdapterFileError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, the model "
                                       f"needs {list(target.shape)}")
            if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
                raise AdapterFileError(f"{path}: tensor {name!r} holds NaN or infinite values; the adapter is "
                                       f"corrupt (or was saved after training diverged)")
            target.copy_(tensors[name])
    return model
