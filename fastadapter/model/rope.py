"""Rotary position embedding in Meta's layout: adjacent pairs ``(x[2i], x[2i+1])`` rotate together.

Hugging Face checkpoints permute the rows of ``wq``/``wk`` for their rotate-half layout; the Hugging Face loader
undoes that permutation, so one RoPE serves every checkpoint format.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import Llama3RopeScaling


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Optional[Llama3RopeScaling] = None,
                             device=None) -> torch.Tensor:
    """``[head_dim / 2]`` fp32 angular frequencies ``theta^(-2i / head_dim)``, with LLaMA-3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    # LLaMA-3.1: long wavelengths (low frequencies) are stretched by `factor`, short ones are kept, and the band
    # in between interpolates linearly in 1/wavelength so the spectrum stays continuous.
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((scaling.original_max_seq_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``positions.shape + [head_dim / 2]`` (fp32) for integer ``positions``."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs of ``x [..., S, H, D]`` by the angles ``cos, sin [..., S, D/2]``.

    Computed in fp32 and returned in ``x``'s dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., S, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
