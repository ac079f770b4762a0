"""The fastadapter adapter file: a small safetensors file holding only what fine-tuning learned.

Layout (format_version 1):

* tensors, all fp32: ``layers.{i}.adapter_prompt [P, dim]`` and ``layers.{i}.adapter_gate [Hq] or [1]`` for
  every adapted layer ``i``;
* safetensors metadata key ``"fastadapter"``: JSON ::

      {"format_version": 1,
       "config": {"prompt_len": P, "layers": [i, ...], "gate_activation": "tanh" | "none",
                  "gate_per_head": bool},
       "base_model": {"fingerprint": str, "dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
                      "vocab_size": int, "family": str}}

``family`` (optional: files written before it existed lack it) is the base model's Hugging Face ``model_type``
(``llama`` for llama2.c and Meta checkpoints); ``fastadapter export`` refuses a target that cannot load that family.
Every tensor is finite: a file holding NaN or infinity (a diverged run, a corrupt file) is refused at read.

A multimodal adapter (:mod:`fastadapter.vision`) also holds its image projection, tensors named
``vision.{name}`` (fp32), and a ``"vision"`` object in the description (the vision tower's identity, feature
layers and fusion; :mod:`fastadapter.vision.multimodal` checks it).

The base-model fingerprint lets ``load_adapter`` refuse an adapter trained on another model. It hashes the
dimensions and three rows of the token embedding rounded to bf16, which is cheap (no pass over the weights), the
same whichever loader (llama2.c, Meta, Hugging Face) built the model, and the same for the model in fp32 and in bf16
(rounded from the same weights): an adapter trained in bf16 loads into the fp32 model and back. A file whose
fingerprint hashes the rows exactly as the model holds them (:func:`exact_base_model_fingerprint`) is accepted
too.

For LLaMA-7B with the paper's defaults the file holds 1,229,760 fp32 values: 4.9 MB.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Mapping

import torch

from ..setting_error import NamesSettings

FORMAT_VERSION = 1
#: The safetensors metadata key under which the JSON description is stored.
METADATA_KEY = "fastadapter"
#: The key of a LLaMA-Adapter V2 file's description (:mod:`.adapter_v2`).
V2_METADATA_KEY = "fastadapter_v2"
#: What :func:`adapter_file_kind` answers.
ADAPTER_FILE_KINDS = ("v1", "v2", "multimodal", "other")
#: Name prefix of the image projection's tensors in a multimodal adapter.
VISION_PREFIX = "vision."
_TENSOR_NAME = re.compile(r"^layers\.(\d+)\.(adapter_prompt|adapter_gate)$")
_CONFIG_KEYS = ("prompt_len", "layers", "gate_activation", "gate_per_head")
_BASE_MODEL_KEYS = ("fingerprint", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
#: Keys of the base model description that older files lack.
_OPTIONAL_BASE_MODEL_KEYS = ("family",)


class AdapterFileError(NamesSettings, ValueError):
    """An adapter file that cannot be read or does not fit: the message names the file and what is wrong (and the
    setting to change, when one would help: :meth:`~fastadapter.setting_error.NamesSettings.naming`)."""


def base_model_fingerprint(token_embedding: torch.Tensor, n_layers: int, n_heads: int, n_kv_heads: int) -> str:
    """A short identity of a base model, the same in fp32 and bf16: sha256 of its dimensions and the bytes of
    embedding rows 0, 1 and V−1 rounded to bf16, as fp32 (hex string).

    Args:
        token_embedding: ``[V, dim]``, the model's token embedding (any float dtype, any real device).
        n_layers, n_heads, n_kv_heads: the model's transformer dimensions.
    """
    return _fingerprint(token_embedding, n_layers, n_heads, n_kv_heads, torch.bfloat16)


def exact_base_model_fingerprint(token_embedding: torch.Tensor, n_layers: int, n_heads: int,
                                 n_kv_heads: int) -> str:
    """:func:`base_model_fingerprint` of the rows exactly as ``token_embedding`` holds them, not rounded. A check
    accepts either, so a file that hashes the exact rows still loads into the model (and dtype) it was made from."""
    return _fingerprint(token_embedding, n_layers, n_heads, n_kv_heads, None)


def fingerprint_matches(saved: str, description: Mapping) -> bool:
    """Whether an adapter file's fingerprint ``saved`` names the model of ``description``
    (``base_model_description``: its ``fingerprint`` and, where the model was at hand, ``exact_fingerprint``)."""
    return saved in (description["fingerprint"], description.get("exact_fingerprint"))


def _fingerprint(token_embedding: torch.Tensor, n_layers: int, n_heads: int, n_kv_heads: int,
                 rounded_to) -> str:
    if token_embedding.dim() != 2:
        raise ValueError(f"token_embedding must be [vocab_size, dim], got shape {tuple(token_embedding.shape)}")
    if token_embedding.is_meta:
        raise ValueError("cannot fingerprint a model on the meta device: load its weights first")
    vocab_size, dim = token_embedding.shape
    rows = sorted({0, min(1, vocab_size - 1), vocab_size - 1})
    picked = token_embedding.detach()[rows].to("cpu")
    if rounded_to is not None:
        picked = picked.to(rounded_to)
    picked = picked.to(torch.float32).contiguous()
    digest = hashlib.sha256()
    digest.update(f"vocab={vocab_size};dim={dim};layers={n_layers};heads={n_heads};kv_heads={n_kv_heads};"
                  .encode())
    digest.update(picked.numpy().astype("<f4").tobytes())  # little-endian whatever the host
    return digest.hexdigest()


def _check_description(path: str, config: Mapping, base_model: Mapping) -> None:
    """Raise :class:`AdapterFileError` unless ``config`` and ``base_model`` have every key with a sane type."""
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise AdapterFileError(f"{path}: adapter config lacks {missing}; expected keys {list(_CONFIG_KEYS)}")
    missing = [k for k in _BASE_MODEL_KEYS if k not in base_model]
    if missing:
        raise AdapterFileError(f"{path}: base_model description lacks {missing}; expected keys "
                               f"{list(_BASE_MODEL_KEYS)}")
    layers = config["layers"]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise AdapterFileError(f"{path}: config 'layers' must be an explicit list of layer indices, got {layers!r}")
    if not isinstance(config["prompt_len"], int) or config["prompt_len"] < 0:
        raise AdapterFileError(f"{path}: config 'prompt_len' must be a non-negative int, got "
                               f"{config['prompt_len']!r}")
    if config["gate_activation"] not in ("tanh", "none"):
        raise AdapterFileError(f"{path}: gate_activation must be 'tanh' or 'none', got "
                               f"{config['gate_activation']!r}")


def _check_tensors(path: str, tensors: Mapping[str, torch.Tensor], config: Mapping, base_model: Mapping,
                   vision: bool = False) -> None:
    """Raise :class:`AdapterFileError` unless ``tensors`` are exactly the prompts and gates ``config`` says
    (and, with ``vision``, any ``vision.*`` tensors of the image projection)."""
    if vision:
        tensors = {name: t for name, t in tensors.items() if not name.startswith(VISION_PREFIX)}
    layers = list(config["layers"])
    prompt_shape = (int(config["prompt_len"]), int(base_model["dim"]))
    gate_shape = (int(base_model["n_heads"]),) if config["gate_per_head"] else (1,)
    expected = {}
    for i in layers:
        if i >= int(base_model["n_layers"]):
            raise AdapterFileError(f"{path}: adapted layer {i} does not exist in a model of "
                                   f"{base_model['n_layers']} layers")
        expected[f"layers.{i}.adapter_prompt"] = prompt_shape
        expected[f"layers.{i}.adapter_gate"] = gate_shape
    for name in tensors:
        if name not in expected:
            raise AdapterFileError(f"{path}: unexpected tensor {name!r}; an adapter of layers {layers} holds "
                                   f"layers.{{i}}.adapter_prompt and layers.{{i}}.adapter_gate only")
    for name, shape in expected.items():
        if name not in tensors:
            raise AdapterFileError(f"{path}: tensor {name!r} is missing (expected shape {list(shape)})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise AdapterFileError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")


def write_adapter_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config_dict: Mapping,
                       base_model_dict: Mapping, vision: Mapping | None = None) -> None:
    """Write an adapter file atomically (a temporary file in the same folder, then ``os.replace``).

    Args:
        path: destination ``.safetensors`` file.
        tensors: ``{"layers.{i}.adapter_prompt": [P, dim], "layers.{i}.adapter_gate": [Hq] or [1]}``; stored fp32.
        config_dict: ``{"prompt_len", "layers" (explicit index list), "gate_activation", "gate_per_head"}``.
        base_model_dict: ``{"fingerprint", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"}``.
        vision: the multimodal description (JSON-serialisable); it allows ``vision.*`` tensors.

    Raises:
        AdapterFileError: tensors that do not match the description (the message names the tensor and shape).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    for name in tensors:
        if vision is not None and name.startswith(VISION_PREFIX):
            continue
        if not _TENSOR_NAME.match(name):
            raise AdapterFileError(f"{path}: tensor name {name!r} is not layers.{{i}}.adapter_prompt or "
                                   f"layers.{{i}}.adapter_gate")
    config = dict(config_dict)
    if "layers" in config:  # accept a tuple or a range; store a JSON list
        config["layers"] = [int(i) for i in config["layers"]]
    _check_description(path, config, base_model_dict)
    _check_tensors(path, tensors, config, base_model_dict, vision is not None)
    description = {"format_version": FORMAT_VERSION,
                   "config": {k: config[k] for k in _CONFIG_KEYS},
                   "base_model": {k: base_model_dict[k] for k in _BASE_MODEL_KEYS + _OPTIONAL_BASE_MODEL_KEYS
                                  if k in base_model_dict}}
    if vision is not None:
        description["vision"] = dict(vision)
    # safetensors refuses views sharing storage and non-contiguous tensors: give it fresh fp32 CPU copies.
    payload = {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in tensors.items()}

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # The adapter gets the mode of every other file the run writes (0666 less the umask, as the checkpoints and
    # metrics), not safetensors' (and tempfile.mkstemp's) 0600: the mode of a file created 0666 here.
    tmp = os.path.join(folder, f".adapter-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777
        save_file(payload, tmp, metadata={METADATA_KEY: json.dumps(description)})
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_file_kind(path: str | os.PathLike) -> str:
    """Which kind of adapter ``path`` holds, from its safetensors metadata alone (no tensor is read):

    * ``"v2"``: a LLaMA-Adapter V2 file of fastadapter (:func:`~.adapter_v2.load_adapter_v2` reads it);
    * ``"multimodal"``: a fastadapter file with an image projection (:mod:`fastadapter.vision` reads it);
    * ``"v1"``: a fastadapter file of prompts and gates (:func:`read_adapter_file`);
    * ``"other"``: anything else: a PEFT folder, a litgpt or original LLaMA-Adapter file, or no readable file
      (:func:`~.adapter.load_adapter` reads the formats it knows, and names what is wrong with the rest).
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path) or not path.endswith(".safetensors"):
        return "other"
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError:
        return "other"
    if V2_METADATA_KEY in metadata:
        return "v2"
    if METADATA_KEY not in metadata:
        return "other"
    try:
        description = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        return "v1"  # read_adapter_file says what is wrong with it
    return "multimodal" if isinstance(description, dict) and "vision" in description else "v1"


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and check an adapter file written by :func:`write_adapter_file`.

    Returns:
        ``(tensors, meta)``: fp32 tensors by name, and the parsed JSON description
        (``{"format_version", "config", "base_model"}``, and ``"vision"`` for a multimodal adapter).

    Raises:
        FileNotFoundError: no such file.
        AdapterFileError: not a safetensors file, no fastadapter description, an unsupported version, or tensors
            that do not match the description; the message names the file and what is wrong.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise AdapterFileError(f"{path}: no {METADATA_KEY!r} metadata; this is not a fastadapter adapter file "
                               f"(PEFT, litgpt and original LLaMA-Adapter files are read by load_adapter)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format_version {version!r} is not supported (this fastadapter reads "
                               f"version {FORMAT_VERSION})")
    config, base_model = meta.get("config"), meta.get("base_model")
    if not isinstance(config, dict) or not isinstance(base_model, dict):
        raise AdapterFileError(f"{path}: the description must hold 'config' and 'base_model' objects")
    _check_description(path, config, base_model)
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise AdapterFileError(f"{path}: tensor {name!r} is {t.dtype}, expected torch.float32")
        if not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{path}: tensor {name!r} holds NaN or infinite values; the adapter is corrupt "
                                   f"(or was saved after training diverged): use an earlier checkpoint's adapter")
    if "vision" in meta and not isinstance(meta["vision"], dict):
        raise AdapterFileError(f"{path}: the 'vision' description must be an object, got {meta['vision']!r}")
    _check_tensors(path, tensors, config, base_model, "vision" in meta)
    return tensors, meta
