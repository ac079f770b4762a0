"""``MultimodalLlama``: an adapted :class:`~fastadapter.LlamaModel` whose adaption prompts are conditioned on
images (LLaMA-Adapter's multimodal variant, arXiv 2303.16199 §3.3), and its adapter files.

    features  = tower(pixel_values)                 [M, len(layers) · C]   frozen, no_grad
    offset[n] = proj(features[image_index[n]])      [N, 1, dim]            zero for a sequence without an image
    proj(f)   = LayerNorm(W · (f − μ) / σ + b)      μ, σ: the features' statistics over the training images
    prompt of adapted layer l for sequence n = prompt[l] + offset[n]   (fused layers only)

The per-sequence prompts reach the fused op as ``prefix_k, prefix_v [N, P, Hkv, D]`` (packed or batched), each
behind the layer's zero-initialised gate: with the gates at zero the model is the base model whatever the
image. Trainable: the prompts, the gates and the projection; never the tower nor the base model.

Typical use::

    tower = VisionTower.from_folder("clip-vit-l14/")
    mm = add_vision(add_adapter(load_model(...), AdapterConfig(...)), tower)
    mm.calibrate(tower.preprocess(batch) for batch in training_image_batches)   # before training: μ, σ
    logits = mm(tokens, cu_seqlens=cu, pixel_values=tower.preprocess(images), image_index=index)
    save_multimodal_adapter(mm, "run/adapter.safetensors")
    mm = load_multimodal_adapter(load_model(...), "run/adapter.safetensors", "clip-vit-l14/")
    generate_with_images(mm, [tokens], [image], max_new_tokens=32)
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..adapters.adapter import (AdapterConfig, _check_base_model, _check_fits, adapted_layers, add_adapter,
                             base_model_description, write_adapter)
from ..adapters.adapter_file import VISION_PREFIX, AdapterFileError, read_adapter_file
from ..model.generation import generate
from ..model.llama import LlamaModel
from .projection import VisualProjection, VisualPromptConfig
from .tower import VisionTower, VisionTowerError

VISION_FORMAT_VERSION = 1


class MultimodalLlama(nn.Module):
    """An adapted LLaMA, a frozen vision tower and the learnable projection between them.

    Args:
        llama: a :class:`LlamaModel` with an adapter (:func:`fastadapter.add_adapter`).
        tower: the frozen :class:`VisionTower`.
        projection: the :class:`VisualProjection` (``tower.feature_dim`` → ``llama.config.dim``).
        config: which adapted layers receive the image (:class:`VisualPromptConfig`).
    """

    def __init__(self, llama: LlamaModel, tower: VisionTower, projection: VisualProjection,
                 config: Optional[VisualPromptConfig] = None):
        super().__init__()
        if not isinstance(llama, LlamaModel):
            raise TypeError(f"MultimodalLlama needs a fastadapter LlamaModel, got {type(llama).__name__}")
        if projection.feature_dim != tower.feature_dim or projection.dim != llama.config.dim:
            raise ValueError(f"the projection maps {projection.feature_dim} → {projection.dim}, the tower gives "
                             f"{tower.feature_dim} features and the model is {llama.config.dim} wide")
        self.llama, self.tower, self.projection = llama, tower, projection
        self.visual_config = config or VisualPromptConfig()
        self.fused_layers = self.visual_config.fused_layers(list(adapted_layers(llama)))

    @property
    def config(self):
        """The language model's :class:`LlamaConfig`."""
        return self.llama.config

    def train(self, mode: bool = True) -> "MultimodalLlama":
        super().train(mode)
        self.tower.train(mode)  # stays in eval mode: frozen
        return self

    def image_features(self, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        """``pixel_values [M, 3, H, W]`` (or None) → the tower's features ``[M, feature_dim]`` (no gradient)."""
        device = self.projection.linear.weight.device
        if pixel_values is None or pixel_values.shape[0] == 0:
            return torch.zeros(0, self.tower.feature_dim, device=device)
        return self.tower(pixel_values).to(device)

    def calibrate(self, pixel_batches: Iterable[torch.Tensor]) -> int:
        """Set the projection's feature statistics (:meth:`VisualProjection.calibrate`) from the tower's features
        of ``pixel_batches`` (``[M, 3, H, W]`` each: the training images, or a sample of them); call it once,
        before training. Returns the number of images."""
        return self.projection.calibrate(self.image_features(pixels) for pixels in pixel_batches)

    def prompt_offsets(self, pixel_values: Optional[torch.Tensor], image_index: torch.Tensor
                       ) -> dict[int, torch.Tensor]:
        """``{layer: [N, 1, dim]}`` for N sequences: sequence ``n`` gets image ``image_index[n]`` of
        ``pixel_values [M, 3, H, W]`` (-1: no image, the plain prompts)."""
        features = self.image_features(pixel_values)
        return self.projection.offsets(features, image_index, self.fused_layers)

    def forward(self, tokens: torch.Tensor, *, pixel_values: Optional[torch.Tensor] = None,
                image_index: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """The logits of :meth:`LlamaModel.forward` (same arguments) with image-conditioned prompts.

        Args:
            tokens: ``[B, S]``, or ``[1, T]`` packed with ``cu_seqlens``.
            pixel_values: ``[M, 3, H, W]``, the images of this call (:meth:`VisionTower.preprocess`).
            image_index: int64 ``[N]`` over the N sequences (rows, or packed sequences): the row of
                ``pixel_values`` of each one, -1 for none. None: no sequence has an image.
        """
        if image_index is None:
            if pixel_values is not None and pixel_values.shape[0]:
                raise ValueError("pixel_values were given without image_index (which sequence has which image)")
            return self.llama(tokens, **kwargs)
        cu_seqlens = kwargs.get("cu_seqlens")
        sequences = tokens.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if image_index.shape != (sequences,):
            raise ValueError(f"image_index must be [{sequences}] (one entry per sequence), got "
                             f"{tuple(image_index.shape)}")
        if bool((image_index < 0).all()):
            return self.llama(tokens, **kwargs)
        return self.llama(tokens, prompt_offsets=self.prompt_offsets(pixel_values, image_index), **kwargs)


def add_vision(model: LlamaModel, tower: VisionTower, config: Optional[VisualPromptConfig] = None
               ) -> MultimodalLlama:
    """Condition the adapted ``model`` on images from ``tower`` with a new (fp32, trainable) projection.

    ``model`` must already have its adapter (:func:`fastadapter.add_adapter`): its prompts and gates stay the
    trainable text part; the tower is frozen.
    """
    if not adapted_layers(model):
        raise ValueError("add_vision needs an adapted model: call fastadapter.add_adapter(model, config) first")
    device = model.tok_embeddings.weight.device
    projection = VisualProjection(tower.feature_dim, model.config.dim, device=device)
    tower.to(device)
    return MultimodalLlama(model, tower, projection, config)


def vision_description(mm: MultimodalLlama) -> dict:
    """The ``"vision"`` object of a multimodal adapter file."""
    return {"format_version": VISION_FORMAT_VERSION, "tower": mm.tower.identity(),
            "feature_dim": mm.projection.feature_dim, "dim": mm.projection.dim,
            "projection": "layernorm(linear(standardise))", **mm.visual_config.to_dict()}


def save_multimodal_adapter(mm: MultimodalLlama, path: str | os.PathLike) -> None:
    """Write the prompts, gates and the image projection of ``mm`` (fp32) to the safetensors file ``path``,
    with the tower's identity, the feature layers and the fusion in the metadata."""
    model = mm.llama
    projection = {f"{VISION_PREFIX}projection.{name}": p for name, p in mm.projection.state_dict().items()}
    write_adapter(path, adapted_layers(model), base_model_description(model), extra_tensors=projection,
                  vision=vision_description(mm))


def check_tower(path: str, vision: dict, tower: VisionTower) -> None:
    """Raise :class:`VisionTowerError` unless ``tower`` is the tower the adapter at ``path`` was trained with
    (its ``vision`` description): model type, widths and weights fingerprint."""
    saved, have = vision["tower"], tower.identity()
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if saved.get(key) != have[key]:
            raise VisionTowerError.naming("{path}: this adapter was trained with a vision tower of {key}={saved}, "
                                          "but {source} has {key}={have}; pass the {vision_model} it was trained "
                                          "with", path=path, key=key, saved=saved.get(key), source=tower.source,
                                          have=have[key])
    if saved.get("fingerprint") != have["fingerprint"]:
        raise VisionTowerError.naming("{path}: this adapter was trained with another vision tower of the same shape "
                                      "(weights fingerprint {saved}…, {source} has {have}…); pass the {vision_model} "
                                      "it was trained with", path=path, saved=str(saved.get("fingerprint"))[:12],
                                      source=tower.source, have=have["fingerprint"][:12])


def read_vision_description(path: str) -> Optional[dict]:
    """The ``"vision"`` description of the adapter file at ``path``, or None for a text-only adapter."""
    _, meta = read_adapter_file(path)
    return meta.get("vision")


def load_multimodal_adapter(model: LlamaModel, path: str | os.PathLike, vision_model: str | os.PathLike | VisionTower,
                            ) -> MultimodalLlama:
    """Load a multimodal adapter file onto ``model`` (in place: its adapter is replaced) with its tower.

    Args:
        model: the base model the adapter was trained on.
        path: a file written by :func:`save_multimodal_adapter`.
        vision_model: the vision tower's folder (loaded with the file's feature layers and pooling), or a
            loaded :class:`VisionTower` (its layers are set to the file's).

    Raises:
        AdapterFileError: not a multimodal adapter (no image projection), another base model, or tensors that
            do not fit.
        VisionTowerError: a vision tower other than the one the adapter was trained with.
    """
    path = os.fspath(path)
    tensors, meta = read_adapter_file(path)
    vision = meta.get("vision")
    if vision is None:
        raise AdapterFileError.naming("{path}: this adapter has no image projection (it was trained without "
                                      "{vision_model}); load it with fastadapter.load_adapter, without an image",
                                      path=path)
    if vision.get("format_version") != VISION_FORMAT_VERSION:
        raise AdapterFileError(f"{path}: vision format_version {vision.get('format_version')!r} is not supported "
                               f"(this fastadapter reads {VISION_FORMAT_VERSION})")
    _check_base_model(base_model_description(model), path, meta["base_model"], "the model")
    saved_tower = vision["tower"]
    if isinstance(vision_model, VisionTower):
        tower = vision_model
        check_tower(path, vision, tower)
        tower.layers, tower.pooling = list(saved_tower["layers"]), saved_tower["pooling"]
    else:
        tower = VisionTower.from_folder(vision_model, layers=saved_tower["layers"], pooling=saved_tower["pooling"],
                                        dtype=model.tok_embeddings.weight.dtype)
        check_tower(path, vision, tower)
    c = meta["config"]
    config = AdapterConfig(prompt_len=c["prompt_len"], layers=list(c["layers"]),
                           gate_activation=c["gate_activation"], gate_per_head=c["gate_per_head"])
    _check_fits(base_model_description(model), path, config, tensors)
    add_adapter(model, config)
    with torch.no_grad():
        for i, adapter in adapted_layers(model).items():
            adapter.prompt.copy_(tensors[f"layers.{i}.adapter_prompt"])
            adapter.gate.copy_(tensors[f"layers.{i}.adapter_gate"])
    visual_config = VisualPromptConfig(fusion=vision["fusion"], early_layers=int(vision["early_layers"]))
    mm = add_vision(model, tower, visual_config)
    state = {name[len(VISION_PREFIX + "projection."):]: t for name, t in tensors.items()
             if name.startswith(VISION_PREFIX + "projection.")}
    if "feature_mean" not in state and "feature_std" not in state:
        # Written before the projection standardised its input: the identity statistics compute what it trained.
        state.update({name: t for name, t in mm.projection.state_dict().items() if name.startswith("feature_")})
    expected = {name: tuple(p.shape) for name, p in mm.projection.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if got != expected:
        raise AdapterFileError(f"{path}: the image projection holds {got}, the model and tower need {expected}")
    mm.projection.load_state_dict(state)
    return mm


def generate_with_images(mm: MultimodalLlama, prompts: Sequence[Sequence[int]], images: Sequence, **kwargs
                         ) -> list[list[int]]:
    """:func:`fastadapter.generate` with one image (a PIL image or ``[H, W, 3]`` uint8 array, or None) per
    prompt; the image conditions every adapted layer's prompt (as in training) for the whole continuation."""
    if len(images) != len(prompts):
        raise ValueError(f"generate_with_images needs one image (or None) per prompt: {len(prompts)} prompts, "
                         f"{len(images)} images")
    present = [image for image in images if image is not None]
    index, next_row = [], 0
    for image in images:
        index.append(-1 if image is None else next_row)
        next_row += image is not None
    device = mm.llama.tok_embeddings.weight.device
    if not present:
        return generate(mm.llama, prompts, **kwargs)
    with torch.no_grad():
        offsets = mm.prompt_offsets(mm.tower.preprocess(present), torch.tensor(index, device=device))
    return generate(mm.llama, prompts, prompt_offsets=offsets, **kwargs)
