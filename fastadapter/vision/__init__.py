"""Multimodal LLaMA-Adapter: a frozen vision tower whose multi-scale global image features, projected to the
model width, are added to the adaption prompts (arXiv 2303.16199 §3.3).

* :mod:`.tower` — :class:`VisionTower`, a frozen encoder and its image processor from a local HF folder;
* :mod:`.projection` — :class:`VisualProjection` and :class:`VisualPromptConfig` (which layers, fusion);
* :mod:`.multimodal` — :class:`MultimodalLlama`, adapter files with the projection, generation with images.
"""
from .multimodal import (MultimodalLlama, add_vision, check_tower, generate_with_images, load_multimodal_adapter,
                         read_vision_description, save_multimodal_adapter)
from .projection import FUSIONS, VisualProjection, VisualPromptConfig
from .tower import VisionTower, VisionTowerError, default_feature_layers

__all__ = ["VisionTower", "VisionTowerError", "default_feature_layers", "VisualProjection", "VisualPromptConfig",
           "FUSIONS", "MultimodalLlama", "add_vision", "save_multimodal_adapter", "load_multimodal_adapter",
           "read_vision_description", "check_tower", "generate_with_images"]
