"""The optimizer of a run: AdamW over the adapter's parameters (the base model is frozen)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .train_config import TrainConfig


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every trainable parameter, in a fixed order; raises when there is none."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: call fastadapter.add_adapter(model, config) first")
    for name, p in params:
        if p.dtype != torch.float32:
            raise ValueError(f"trainable parameter {name} is {p.dtype}; adapter parameters must stay fp32")
    return params


def build_optimizer(params: Sequence[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the adapter, with weight decay on the prompts only (matrices), fused when the device has a
    fused kernel (one launch for every parameter instead of several per parameter)."""
    groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), foreach=True)
