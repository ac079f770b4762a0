"""Weight-only quantization of a frozen base through torchao: ``int8`` and ``int4`` (NF4).

Only the base's projections are quantized — every ``nn.Linear`` inside ``model.layers`` (``wq``, ``wk``, ``wv``,
``wo``, ``w1``, ``w2``, ``w3``); the token embedding, the norms and the output head keep their dtype, the adapter
(prompts, gates) stays fp32, and zero-init attention runs on the same q/k/v as before, whatever computes them.
The weights are dequantized inside each projection, so activations and their gradients keep the compute dtype
and the adapter's gradient flows through the quantized layers above it.

* ``int8``: torchao's ``Int8WeightOnlyConfig`` — symmetric per-output-row int8 codes and an fp32 scale per row
  (about 1/2 of bf16's bytes). CPU and CUDA.
* ``int4``: torchao's ``NF4Tensor`` (QLoRA's 4-bit NormalFloat): two 4-bit codes per byte, one scale per block of
  64 values, the scales themselves quantized to int8 per block of 256 (fewer for a small model) (about 1/4 of bf16's bytes; 4.13 bits a
  weight). CPU and CUDA, with autograd through the projection. Chosen over torchao's ``Int4WeightOnlyConfig``
  because, in torchao 0.18, that one has no CPU path (its ``plain`` format needs the CUDA-only ``mslk`` package,
  ``plain_int32`` has no CPU kernel, ``tile_packed_to_4d`` needs CUDA) and no backward to its input; and over
  bitsandbytes' NF4 because that is the same format, CUDA only, and a second library — torchao's is also what
  litgpt's published ``nf4`` figure measures.

Reference: :func:`dequantized_copy` gives the plain model that a quantized one computes (its weights are the
dequantized codes), so a quantized model can be checked against ordinary ``nn.Linear`` arithmetic.
"""
from __future__ import annotations

import copy
import math
from typing import Iterator

import torch
from torch import nn

from ..setting_error import SettingError

SCHEMES = ("int8", "int4")
#: NF4 (int4) block sizes: values per scale, and scales per double-quantization block.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def _torchao():
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ImportError("quantizing the base (quantize int8 or int4) needs torchao: pip install "
                          "'fastadapter[quantize]' (or pip install torchao)") from exc


def base_projections(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` of ``model.layers`` (the projections that get quantized)."""
    for name, module in model.layers.named_modules(prefix="layers"):
        if isinstance(module, nn.Linear):
            yield name, module


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is one of torchao's quantized tensor subclasses (a tensor subclass made of inner
    tensors; FSDP's ``DTensor`` shards are not quantized weights)."""
    from torch.distributed.tensor import DTensor

    return not isinstance(weight, DTensor) and _inner_tensors(weight) != []


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return []
    names, _ = flatten()
    return [getattr(tensor, name) for name in names]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` holds: for a quantized tensor subclass, the sum over its inner tensors (codes, scales,
    zero points), measured from them; for a plain tensor, ``numel × element_size``."""
    inner = _inner_tensors(tensor)
    if not inner:
        return tensor.numel() * tensor.element_size()
    return sum(tensor_bytes(t) for t in inner)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the base projections (:func:`base_projections`), quantized or not."""
    return sum(tensor_bytes(module.weight) for _, module in base_projections(model))


def nf4_scaler_block(numel: int) -> int:
    """Scales per double-quantization block for a weight of ``numel`` values: :data:`NF4_SCALER_BLOCK` (QLoRA's
    256) when its ``numel / 64`` scales divide into such blocks (every LLaMA-7B..70B projection), else the largest
    power of two that divides them (small models)."""
    return math.gcd(numel // NF4_BLOCK, NF4_SCALER_BLOCK)


def quantize_base(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize the frozen base projections of a :class:`~fastadapter.model.llama.LlamaModel` in place.

    Call it on the device the model will run on (after ``model.to(device)``), before or after
    :func:`fastadapter.add_adapter`.

    Args:
        model: a LlamaModel whose projections are frozen (``requires_grad=False``), in any float dtype.
        scheme: ``"int8"`` or ``"int4"`` (see the module docstring).

    Raises:
        ValueError: an unknown scheme, a trainable or already quantized projection, or (int4) a projection
            whose size is not a multiple of the NF4 blocks (64 values, 256 scales); the message names it.
        ImportError: torchao is not installed.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; expected one of {', '.join(SCHEMES)}")
    _torchao()
    projections = list(base_projections(model))
    if not projections:
        raise TypeError(f"quantize_base needs a fastadapter LlamaModel (nn.Linear projections in .layers), got "
                        f"{type(model).__name__}")
    for name, module in projections:
        if module.weight.requires_grad:
            raise ValueError(f"{name}.weight requires a gradient; only a frozen base is quantized (call "
                             f"fastadapter.add_adapter or model.requires_grad_(False) first)")
        if is_quantized(module.weight):
            raise ValueError(f"{name}.weight is already quantized")
        if scheme == "int4" and module.weight.numel() % NF4_BLOCK:
            raise SettingError("int4 (NF4) quantizes blocks of {block} values with one scale each: {name}.weight "
                               "{shape} has {values} values, not a multiple of {block}; use {quantize} int8 for this "
                               "model", block=NF4_BLOCK, name=name, shape=list(module.weight.shape),
                               values=module.weight.numel())
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        names = {id(module) for _, module in projections}
        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False),
                  filter_fn=lambda module, fqn: id(module) in names)
    else:
        from torchao.quantization import to_nf4

        for _, module in projections:
            weight = module.weight.detach().contiguous()
            module.weight = nn.Parameter(to_nf4(weight, NF4_BLOCK, nf4_scaler_block(weight.numel())),
                                         requires_grad=False)
    model.quantization = scheme
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The reference of a quantized model: a deep copy whose projections are plain ``nn.Linear`` weights holding
    the dequantized values (in the dtype the quantized tensors report)."""
    memo = {}
    for _, module in base_projections(model):
        weight = module.weight
        if is_quantized(weight):
            plain = weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()
            memo[id(weight)] = nn.Parameter(plain.to(weight.dtype), requires_grad=False)
    reference = copy.deepcopy(model, memo)  # the quantized weights replaced by their plain values
    reference.quantization = None
    return reference
