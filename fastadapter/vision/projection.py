"""``VisualProjection``: image features → the per-sequence additions to the adaption prompts.

LLaMA-Adapter (arXiv 2303.16199, §3.3) projects the concatenated multi-scale global features of an image to the
model width and adds the result element-wise to every adaption prompt: prompt token ``p`` of adapted layer ``l``
becomes ``prompt[l][p] + proj(feature)`` for that sample. Our projection (the paper leaves its form open) is

    proj(f) = LayerNorm(W · (f − μ) / σ + b)   W: [dim, len(layers) · C], LayerNorm over dim with learnable affine

``μ, σ`` (fixed buffers, saved with the projection) are each feature's mean and standard deviation over the
training images (:meth:`VisualProjection.calibrate`; ``fastadapter train --vision-model`` calls it before the
first step; uncalibrated they are 0 and 1). A frozen tower's global token is mostly image-independent: the CLS
token of a random tiny CLIP varies between images by ~4% of its norm, and anisotropic pretrained embeddings have
the same kind of large shared component. Without the standardisation the projection sees images that differ by a
few percent, its LayerNorm output is a shared vector with ~1% of image-dependent signal, and training learns the
answer prior instead of reading the image (issue 12: 21.8% on four options, always the same letter); with it the
image-dependent part of every feature is at unit scale from the first step. The norm puts the visual offset on
the scale of the prompts (N(0, 1) per element at initialisation) whatever the tower's feature scale, so one
learning rate suits both; the features themselves are layer-normalised per scale by
:class:`~fastadapter.vision.tower.VisionTower`. The gates stay the layers' own zero-initialised gates, so at
initialisation the image changes nothing.

``fusion="all"`` adds the visual offset to every adapted layer (LLaMA-Adapter); ``fusion="early"`` only to the
lowest ``early_layers`` adapted layers, the layers above keeping their language-only prompts (LLaMA-Adapter V2's
early fusion of visual knowledge).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

FUSIONS = ("all", "early")
#: Added to each feature's variance over the calibration images before the square root (a feature constant over
#: them is centred, not blown up).
CALIBRATION_EPS = 1e-6


@dataclass(frozen=True)
class VisualPromptConfig:
    """How images condition the prompts.

    Attributes:
        fusion: ``"all"`` (every adapted layer) or ``"early"`` (the lowest ``early_layers`` adapted layers).
        early_layers: with ``fusion="early"``, how many of the lowest adapted layers get the visual offset.
    """

    fusion: str = "all"
    early_layers: int = 1

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not isinstance(self.early_layers, int) or self.early_layers <= 0:
            raise ValueError(f"early_layers must be a positive int, got {self.early_layers!r}")

    def fused_layers(self, adapted: Sequence[int]) -> list[int]:
        """The adapted layers (ascending indices) that receive the visual offset."""
        adapted = sorted(adapted)
        if not adapted:
            raise ValueError("the model has no adapted layer to condition on images: call add_adapter first")
        if self.fusion == "all":
            return adapted
        if self.early_layers > len(adapted):
            raise ValueError(f"early fusion into the lowest {self.early_layers} adapted layers, but the model "
                             f"adapts only {len(adapted)} layers ({adapted})")
        return adapted[:self.early_layers]

    def to_dict(self) -> dict:
        return asdict(self)


class VisualProjection(nn.Module):
    """``LayerNorm(Linear((features − μ) / σ))``: ``[M, feature_dim]`` → ``[M, dim]`` (fp32 parameters, trainable;
    ``μ, σ``: fixed buffers ``feature_mean``, ``feature_std`` set by :meth:`calibrate`).

    Args:
        feature_dim: the tower's feature width (``len(layers) · C``).
        dim: the language model's width.
    """

    def __init__(self, feature_dim: int, dim: int, *, device=None):
        super().__init__()
        if feature_dim <= 0 or dim <= 0:
            raise ValueError(f"need feature_dim > 0 and dim > 0, got {feature_dim} and {dim}")
        self.linear = nn.Linear(feature_dim, dim, device=device)
        self.norm = nn.LayerNorm(dim, device=device)
        # Identity until calibrate(): an adapter file written before the standardisation loads as it was trained.
        self.register_buffer("feature_mean", torch.zeros(feature_dim, device=device))
        self.register_buffer("feature_std", torch.ones(feature_dim, device=device))

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor | Iterable[torch.Tensor]) -> int:
        """Set ``feature_mean`` and ``feature_std`` to each feature's mean and standard deviation over images.

        Args:
            features: ``[M, feature_dim]`` or an iterable of such chunks (the tower's features of the training
                images, or of a sample of them), M ≥ 2 in all.

        Returns:
            The number of images the statistics come from.
        """
        chunks = [features] if isinstance(features, torch.Tensor) else list(features)
        for chunk in chunks:
            if chunk.dim() != 2 or chunk.shape[1] != self.feature_dim:
                raise ValueError(f"features must be [M, {self.feature_dim}], got {tuple(chunk.shape)}")
        count = sum(chunk.shape[0] for chunk in chunks)
        if count < 2:
            raise ValueError(f"calibrating the image projection needs the features of at least 2 images, got "
                             f"{count}")
        stacked = torch.cat([chunk.detach().to(self.feature_mean.device, torch.float64) for chunk in chunks])
        mean, var = stacked.mean(0), stacked.var(0, unbiased=False)
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_((var + CALIBRATION_EPS).sqrt().float())
        return count

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`calibrate` set the feature statistics (they are not the identity)."""
        return not (bool((self.feature_mean == 0).all()) and bool((self.feature_std == 1).all()))

    @property
    def feature_dim(self) -> int:
        return self.linear.in_features

    @property
    def dim(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features [M, feature_dim]`` → ``[M, dim]`` fp32."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be [M, {self.feature_dim}], got {tuple(features.shape)}")
        standardised = (features.float() - self.feature_mean) / self.feature_std
        return self.norm(self.linear(standardised))

    def offsets(self, features: torch.Tensor, image_index: torch.Tensor, layers: Sequence[int]
                ) -> dict[int, torch.Tensor]:
        """The ``prompt_offsets`` of :meth:`fastadapter.LlamaModel.forward` for N sequences.

        Args:
            features: ``[M, feature_dim]``, one row per image (M may be 0).
            image_index: int64 ``[N]``: the image of sequence ``n`` (a row of ``features``), or -1 for a sequence
                without an image (its offset is zero: the plain prompts).
            layers: the layer indices that receive the offset.

        Returns:
            ``{layer: [N, 1, dim]}`` (the same offset for every prompt token of every listed layer).
        """
        if image_index.dim() != 1 or image_index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"image_index must be an int64 tensor [N], got {image_index.dtype} "
                             f"{tuple(image_index.shape)}")
        m = features.shape[0]
        if image_index.numel() and (int(image_index.min()) < -1 or int(image_index.max()) >= m):
            raise ValueError(f"image_index must hold -1 (no image) or a row of the {m} images, got values from "
                             f"{int(image_index.min())} to {int(image_index.max())}")
        projected = self(features) if m else features.new_zeros(0, self.dim, dtype=torch.float32)
        table = torch.cat([projected.new_zeros(1, self.dim), projected])  # row 0: no image
        offset = table[image_index.long().to(table.device) + 1][:, None]  # [N, 1, dim]
        return {layer: offset for layer in layers}
