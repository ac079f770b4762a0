"""``LayerAdapter``: the learnable part of one adapted layer — the adaption prompt and its zero-init gate."""
from __future__ import annotations

import torch
from torch import nn


class LayerAdapter(nn.Module):
    """The adaption prompt ``[P, dim]`` of one layer and its gate (``[Hq]`` or ``[1]``, zero-initialised).

    The prompt lives in the model's input space and is projected by the layer's frozen ``wk``/``wv`` into the
    prefix keys and values of zero-init attention (no RoPE: the prompt has no position). Both parameters stay
    fp32 whatever the dtype of the base model, so that small updates are not lost to rounding.
    """

    def __init__(self, prompt_len: int, dim: int, n_heads: int, *, gate_per_head: bool = True,
                 gate_activation: str = "tanh", device=None):
        super().__init__()
        if prompt_len <= 0:
            raise ValueError(f"prompt_len must be positive, got {prompt_len}")
        if gate_activation not in ("tanh", "none"):
            raise ValueError(f"gate_activation must be 'tanh' or 'none', got {gate_activation!r}")
        self.gate_activation = gate_activation
        # N(0, 1), as the embedding that holds the prompt in the original code, PEFT and litgpt.
        self.prompt = nn.Parameter(torch.randn(prompt_len, dim, device=device))
        self.gate = nn.Parameter(torch.zeros(n_heads if gate_per_head else 1, device=device))

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[0]

    def prefix_kv(self, wk: nn.Linear, wv: nn.Linear, n_kv_heads: int, head_dim: int,
                  dtype: torch.dtype | None = None,
                  offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt projected by the layer's ``wk`` and ``wv``: ``prefix_k, prefix_v [1, P, Hkv, D]``; with
        ``offset [N, P or 1, dim]`` (a per-sequence addition, e.g. an image's projected features), the N prompts
        ``prompt + offset[n]``: ``[N, P, Hkv, D]``.

        ``dtype``: the compute dtype the prompt is cast to (the hidden states'); by default the projections'
        weight dtype. A quantized base needs the former: its weights' storage dtype may be an integer type."""
        prompt = self.prompt if offset is None else self.prompt + offset
        prompt = prompt.to(dtype or wk.weight.dtype)
        shape = (prompt.shape[0] if offset is not None else 1, self.prompt_len, n_kv_heads, head_dim)
        return wk(prompt).view(shape), wv(prompt).view(shape)

    def extra_repr(self) -> str:
        return (f"prompt_len={self.prompt_len}, dim={self.prompt.shape[1]}, gate={tuple(self.gate.shape)}, "
                f"gate_activation={self.gate_activation!r}")
