"""Rotary position embedding in Meta's layout: adjacent pairs ``(x[2i], x[2i+1])`` rotate together.

Hugging Face checkpoints permute the rows of ``wq``/``wk`` for their rotate-half layout; the Hugging Face loader
undoes that permutation, so one RoPE serves every checkpoint format.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import Llama3RopeScaling, LinearRopeScaling, RopeScaling, YarnRopeScaling


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None,
                             device=None) -> torch.Tensor:
    """``[head_dim / 2]`` fp32 angular frequencies ``theta^(-2i / head_dim)``, with ``scaling`` applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return inv_freq / scaling.factor
    if isinstance(scaling, YarnRopeScaling):
        return _yarn_inverse_frequencies(inv_freq, head_dim, theta, scaling)
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


def _yarn_inverse_frequencies(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: YarnRopeScaling
                              ) -> torch.Tensor:
    """YaRN: interpolated (``inv_freq / factor``) for dimensions that turn fewer than ``beta_slow`` times over the
    original context, extrapolated (kept) above ``beta_fast`` turns, a linear ramp over the dimensions between."""
    def dimension_turning(turns: float) -> float:  # the (fractional) dimension whose frequency makes `turns` turns
        return head_dim * math.log(scaling.original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_turning(scaling.beta_fast), dimension_turning(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low))
    keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / scaling.factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(scaling: Optional[RopeScaling]) -> float:
    """The factor ``cos`` and ``sin`` are multiplied by (YaRN's ``attention_factor``; 1 for the others)."""
    return scaling.attention_factor if isinstance(scaling, YarnRopeScaling) else 1.0


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``positions.shape + [head_dim / 2]`` (fp32) for integer ``positions``."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs of ``x [..., S, H, D]`` by the angles ``cos, sin [..., S, D/2]``.

    Each pair is one complex number times ``cos + i·sin`` (Meta's own formulation): one complex product forward
    and one backward (autograd multiplies the gradient by the conjugate), where the real-arithmetic
    :func:`apply_rope_reference` takes six products and sums each way (8x slower forward + backward on
    SmolLM2's q, 659 tokens). Computed in fp32 and returned in ``x``'s dtype.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [..., S, H, D/2]
    turns = torch.complex(cos, sin).unsqueeze(-2)  # broadcast over heads
    return torch.view_as_real(pairs * turns).flatten(-2).to(x.dtype)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` in real arithmetic: ``(even·cos − odd·sin, even·sin + odd·cos)`` per pair."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., S, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
