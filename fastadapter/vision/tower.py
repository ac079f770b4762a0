"""``VisionTower``: a frozen image encoder from a local Hugging Face folder and its multi-scale global features.

The folder is what ``save_pretrained`` writes: ``config.json`` + weights of a ``CLIPVisionModel`` (or of a whole
``CLIPModel``, whose vision half is taken), or of any vision model ``transformers.AutoModel`` loads whose
``hidden_states`` are ``[M, tokens, C]`` per layer; and the ``preprocessor_config.json`` of its image
processor, which :meth:`VisionTower.preprocess` runs (the ecosystem's resizing, cropping and normalisation, not
a rewrite). Nothing is downloaded: the folder must be local.

The multi-scale global feature of an image is the CLS token (``pooling="cls"``, CLIP) or the mean token
(``"mean"``, towers without a CLS token) of several encoder layers, concatenated: ``[M, len(layers) · C]``. The
tower's weights never train: they are frozen at load, the forward runs under ``torch.no_grad()`` and the tower
stays in eval mode.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Optional, Sequence

import torch
from torch import nn

from ..setting_error import NamesSettings

POOLINGS = ("cls", "mean")
#: The number of layers whose global token the default feature concatenates (spread evenly, the last included).
DEFAULT_SCALES = 4


class VisionTowerError(NamesSettings, ValueError):
    """A vision folder that cannot be loaded, or a tower that does not match what an adapter was trained with."""


def default_feature_layers(n_layers: int, scales: int = DEFAULT_SCALES) -> list[int]:
    """``scales`` evenly spaced encoder layers of a tower of ``n_layers`` layers, 1-based, the last included
    (the paper's multi-scale global features): 12 layers, 4 scales → ``[3, 6, 9, 12]``."""
    if n_layers <= 0 or scales <= 0:
        raise ValueError(f"need n_layers > 0 and scales > 0, got {n_layers} and {scales}")
    scales = min(scales, n_layers)
    return sorted({round(n_layers * (i + 1) / scales) for i in range(scales)})


def _load_model(folder: str):
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(folder, local_files_only=True)
    return AutoModel.from_pretrained(folder, local_files_only=True)


class VisionTower(nn.Module):
    """A frozen vision encoder and its image processor.

    Args:
        model: a transformers vision model (``forward(pixel_values, output_hidden_states=True)``).
        processor: its image processor (``processor(images=..., return_tensors="pt")["pixel_values"]``).
        layers: the 1-based encoder layers whose global token forms the feature (default
            :func:`default_feature_layers`).
        pooling: ``"cls"`` (token 0) or ``"mean"`` (the mean over tokens).
        source: where the tower was loaded from (for messages).
    """

    def __init__(self, model: nn.Module, processor, *, layers: Optional[Sequence[int]] = None,
                 pooling: str = "cls", source: str = "<in memory>"):
        super().__init__()
        config = model.config
        self.hidden_size = int(config.hidden_size)
        self.n_layers = int(config.num_hidden_layers)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        layers = default_feature_layers(self.n_layers) if layers is None else [int(i) for i in layers]
        if not layers or len(set(layers)) != len(layers) or min(layers) < 1 or max(layers) > self.n_layers:
            raise ValueError(f"vision feature layers must be distinct layer numbers in [1, {self.n_layers}] "
                             f"(1-based: the output of encoder layer i), got {list(layers)}")
        self.layers = list(layers)
        self.pooling = pooling
        self.source = source
        self.model = model
        self.processor = processor
        model.requires_grad_(False)
        model.eval()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, layers: Optional[Sequence[int]] = None,
                    pooling: str = "cls", dtype: Optional[torch.dtype] = None) -> "VisionTower":
        """Load the tower and its image processor from a local Hugging Face folder.

        Raises:
            FileNotFoundError: no folder at ``folder``.
            VisionTowerError: the folder lacks ``config.json`` or ``preprocessor_config.json``, or transformers
                cannot load it (the message says why).
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"vision model folder not found: {folder}")
        for name in ("config.json", "preprocessor_config.json"):
            if not os.path.isfile(os.path.join(folder, name)):
                raise VisionTowerError(f"{folder}: no {name}; a vision model folder is what save_pretrained writes "
                                       f"for the model (config.json and weights) and its image processor "
                                       f"(preprocessor_config.json)")
        names = os.listdir(folder)
        if not any(name.endswith(".safetensors") for name in names):
            pickles = sorted(name for name in names if name.endswith((".bin", ".pt", ".pth", ".ckpt")))
            found = f"only {', '.join(pickles)}, PyTorch pickle weights" if pickles else "no weights"
            raise VisionTowerError(f"{folder}: {found}; fastadapter loads vision towers from safetensors weights "
                                   f"only (unpickling a file can run any code it holds): save the model with "
                                   f"save_pretrained(folder, safe_serialization=True)")
        try:
            from transformers import AutoImageProcessor
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise VisionTowerError(f"a vision tower needs transformers ({exc}); pip install 'fastadapter[vision]'") \
                from exc
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the "no torchvision: PIL backend" notice
        hf_logging.disable_progress_bar()  # and the weight-loading bar
        try:
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            model = _load_model(folder)
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            raise VisionTowerError(f"{folder}: transformers cannot load this vision model ({exc})") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if not hasattr(model.config, "hidden_size") or not hasattr(model.config, "num_hidden_layers"):
            raise VisionTowerError(f"{folder}: {type(model).__name__} has no hidden_size / num_hidden_layers; "
                                   f"expected a vision encoder such as CLIPVisionModel")
        if dtype is not None:
            model.to(dtype)
        return cls(model, processor, layers=layers, pooling=pooling, source=folder)

    @property
    def feature_dim(self) -> int:
        """``len(layers) · C``: the width of :meth:`forward`'s features."""
        return len(self.layers) * self.hidden_size

    def train(self, mode: bool = True) -> "VisionTower":
        """The tower stays in eval mode (it is frozen); ``train()`` only records the flag."""
        self.training = mode
        self.model.eval()
        return self

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """Images (PIL images, or ``[H, W, 3]`` uint8 arrays) → ``pixel_values [M, 3, H', W']`` fp32, by the
        folder's image processor."""
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        images = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [M, 3, H, W]`` → multi-scale global features ``[M, len(layers) · C]`` (fp32, no
        gradient): the pooled token of each feature layer, each layer-normalised (no affine: the layers' scales
        differ), concatenated in layer order."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [M, 3, H, W], got shape {tuple(pixel_values.shape)}")
        weight = next(self.model.parameters())
        out = self.model(pixel_values=pixel_values.to(weight.device, weight.dtype), output_hidden_states=True)
        hidden = out.hidden_states  # [embeddings, layer 1, ..., layer n]
        pooled = [(hidden[i][:, 0] if self.pooling == "cls" else hidden[i].mean(dim=1)).float() for i in self.layers]
        return torch.cat([torch.nn.functional.layer_norm(p, p.shape[-1:]) for p in pooled], dim=-1)

    def identity(self) -> dict:
        """What an adapter trained on this tower records (``load`` refuses another tower): the model type, its
        widths, the feature layers and pooling, and a fingerprint of its weights (sha256 of the dimensions and
        the first 64 values of every parameter)."""
        digest = hashlib.sha256()
        digest.update(f"{type(self.model.config).__name__};{self.hidden_size};{self.n_layers}".encode())
        for name, p in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().flatten()[:64].to("cpu", torch.float32).numpy().astype("<f4").tobytes())
        return {"model_type": getattr(self.model.config, "model_type", type(self.model).__name__),
                "hidden_size": self.hidden_size, "num_hidden_layers": self.n_layers, "layers": list(self.layers),
                "pooling": self.pooling, "fingerprint": digest.hexdigest()}

    def extra_repr(self) -> str:
        return f"source={self.source!r}, layers={self.layers}, pooling={self.pooling!r}, C={self.hidden_size}"
