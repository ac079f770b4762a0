"""The LLaMA-Adapter fine-tuning recipe (``fastadapter train``): :func:`setup_model`, :func:`setup_adapter`,
:func:`setup_data` and :func:`train`, each taking :class:`FinetuneSettings`.

``train`` loads the base (plainly, or straight into FSDP shards), adds the adapter (V1 prompts and gates, or V2
bias and scale as well; image prompts with a vision tower), quantizes the base if asked, reads and splits the
data (Alpaca or chat rows, image rows or a ScienceQA folder), and runs the training loop
(:func:`fastadapter.training.trainer.train`) with a fingerprint of what the examples and the adapter were made
from, so that a resume with other ones is refused. Errors about a setting are
:class:`~fastadapter.setting_error.SettingError`, naming the settings by their names here (the CLI shows flags).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..setting_error import SettingError

#: The most training images whose features set the projection's standardisation (evenly spaced over the distinct
#: images; the statistics of a thousand images are as good as those of all, and cost one pass of the tower).
CALIBRATION_IMAGES = 1024


@dataclass
class FinetuneSettings:
    """Every setting of a fine-tuning run (``fastadapter train``'s flags, parsed; see its ``--help``).

    The loop's settings (``batch_tokens`` to ``progress``) are :class:`~fastadapter.training.trainer.TrainConfig`'s;
    ``dtype`` is resolved (``fp32``, ``bf16`` or ``fp16``); ``vision_layers`` is a list of layer numbers or None.
    """

    model: str
    data: str
    out: str
    tokenizer: Optional[str]
    dtype: str
    seed: int
    fsdp: bool
    activation_checkpointing: bool
    adapter: str  # "v1" or "v2"
    adapter_layers: int
    prompt_len: int
    gate_activation: str
    gate_shape: str  # "head" or "scalar"
    quantize: Optional[str]
    template: str
    chat_template: Optional[str]
    on_bad_row: str
    eval_fraction: float
    max_seq_len: Optional[int]
    vision_model: Optional[str]
    vision_layers: Optional[list[int]]
    vision_pooling: str
    fusion: str
    early_fusion_layers: int
    split: str
    batch_tokens: int
    grad_accum: int
    max_steps: Optional[int]
    epochs: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    eval_every: int
    save_every: int
    keep_checkpoints: int
    progress: bool
    return_memory_to_os: bool = False


@dataclass
class AdapterSetup:
    """What :func:`setup_adapter` made: the adapter's config, the module trained (the model, or the multimodal
    model around it), the final adapter's writer ``save(model, path)``, and the multimodal model (None: text)."""

    config: object
    trained: torch.nn.Module
    save: Callable
    multimodal: Optional[torch.nn.Module]


@dataclass
class DataSetup:
    """What :func:`setup_data` made: the tokenizer (and the path it was read from), the chat template (None:
    Alpaca), every example and their train / eval split, the packed-row collate function (None: the trainer's
    default) and the maximum sequence length."""

    tokenizer: object
    tokenizer_path: str
    chat_template: object
    examples: list
    train_examples: list
    eval_examples: list
    collate_fn: Optional[Callable]
    max_seq_len: int


@dataclass
class FinetuneResult:
    """How :func:`train` ended: the loop's :class:`~fastadapter.training.trainer.TrainResult`, the tokenizer's
    path, the final adapter's path and whether the adapter conditions on images."""

    result: object
    tokenizer_path: str
    adapter_path: str
    multimodal: bool


def _quiet(*args, **kwargs) -> None:
    return None


def setup_model(settings: FinetuneSettings, context):
    """The base model in ``settings.dtype``: loaded plainly, or with ``settings.fsdp`` straight into FSDP shards
    over ``context``'s ranks (the whole base is never materialised on one rank)."""
    from ..loaders.checkpoints import load_model
    from ..training.trainer import DTYPES

    if settings.fsdp:
        from ..training.load_sharded import load_sharded
        model = load_sharded(settings.model, context, dtype=DTYPES[settings.dtype])
    else:
        model = load_model(settings.model, dtype=DTYPES[settings.dtype])
    model.activation_checkpointing = settings.activation_checkpointing
    return model


def setup_adapter(model, settings: FinetuneSettings, context, say: Callable = _quiet) -> AdapterSetup:
    """Add the adapter to ``model`` (in place) and move it to ``context.device``: V1 or V2 on the top
    ``adapter_layers`` layers, the base quantized with ``settings.quantize``, and image prompts when
    ``settings.vision_model`` is given."""
    from ..adapters.adapter import AdapterConfig, add_adapter, save_adapter
    from ..training.trainer import DTYPES

    n_layers = model.config.n_layers
    layers = min(settings.adapter_layers, n_layers)
    if layers <= 0:
        raise SettingError("{adapter_layers} must be positive, got {value}", value=settings.adapter_layers)
    adapter_config = AdapterConfig(prompt_len=settings.prompt_len, layers=layers,
                                   gate_activation=settings.gate_activation,
                                   gate_per_head=settings.gate_shape == "head")
    if settings.adapter == "v2":
        from ..adapters.adapter_v2 import add_adapter_v2, save_adapter_v2
        add_adapter_v2(model, adapter_config)
        save_fn = save_adapter_v2  # the run's final adapter file is a V2 file
    else:
        add_adapter(model, adapter_config)  # under FSDP: on every rank (replicated), the same seeded values
        save_fn = save_adapter
    if not settings.fsdp:
        model.to(context.device)
    if settings.quantize:  # on the device: torchao packs the weights for the kernels of the device they run on
        from ..model.quantize import quantize_base
        quantize_base(model, settings.quantize)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model: {settings.model} ({n_layers} layers, dim {model.config.dim}); adapter {settings.adapter}: top "
        f"{layers} layers, prompt {settings.prompt_len}, {trainable:,} trainable parameters")
    if settings.fsdp:
        from ..training.fsdp import resident_base_bytes
        local, total = resident_base_bytes(model)
        say(f"fsdp: the base is sharded over {context.world_size} ranks: {local / 2**20:,.1f} MiB of its "
            f"{total / 2**20:,.1f} MiB on rank 0")
    if settings.quantize:
        from ..model.quantize import base_weight_bytes
        say(f"quantize: {settings.quantize} base projections, {base_weight_bytes(model) / 2**20:,.2f} MiB")
    if not settings.vision_model:
        return AdapterSetup(adapter_config, model, save_fn, None)
    from ..vision import VisionTower, VisualPromptConfig, add_vision, save_multimodal_adapter
    tower = VisionTower.from_folder(settings.vision_model, layers=settings.vision_layers,
                                    pooling=settings.vision_pooling, dtype=DTYPES[settings.dtype])
    mm = add_vision(model, tower, VisualPromptConfig(fusion=settings.fusion, early_layers=settings.early_fusion_layers))
    mm.to(context.device)
    say(f"vision: {settings.vision_model} (C={tower.hidden_size}, layers {tower.layers}, {settings.vision_pooling}); "
        f"images reach adapted layers {mm.fused_layers}; "
        f"{sum(p.numel() for p in mm.parameters() if p.requires_grad):,} trainable parameters with the projection")
    return AdapterSetup(adapter_config, mm, save_multimodal_adapter, mm)


def default_max_seq_len(settings: FinetuneSettings, model_config) -> int:
    """``settings.max_seq_len``, or min(512, the model's); a :class:`SettingError` past the model's context or
    when a packed row (``batch_tokens``) cannot hold the longest example."""
    max_seq_len = settings.max_seq_len or min(512, model_config.max_seq_len)
    if max_seq_len > model_config.max_seq_len:
        # Past it, positions leave what the model was trained on, or a sliding window would cut (the loaders cap
        # max_seq_len at the window, where full causal attention is still exact).
        raise SettingError("{max_seq_len} ({value}) exceeds the model's max_seq_len ({model_max}: its context, or "
                           "its sliding attention window); give at most {model_max}", value=max_seq_len,
                           model_max=model_config.max_seq_len)
    if settings.batch_tokens < max_seq_len:
        raise SettingError("{batch_tokens} ({batch_value}) must be >= {max_seq_len} ({value}, the default for this "
                           "model): a packed row must hold the longest example", batch_value=settings.batch_tokens,
                           value=max_seq_len)
    return max_seq_len


def calibrate_projection(mm, examples, pixels, *, max_images: int = CALIBRATION_IMAGES, chunk: int = 64) -> int:
    """Standardise ``mm``'s image features over the distinct images of ``examples`` (at most ``max_images`` of
    them, evenly spaced; ``pixels``: paths → pixel values); returns how many, 0 when fewer than 2 (left as is).
    Deterministic in the examples, so a resumed run recomputes the statistics of the run it continues."""
    paths = list(dict.fromkeys(e.image for e in examples if getattr(e, "image", None) is not None))
    if len(paths) < 2:
        return 0
    stride = -(-len(paths) // max_images)
    paths = paths[::stride]
    return mm.calibrate(pixels(paths[i:i + chunk]) for i in range(0, len(paths), chunk))


def setup_data(settings: FinetuneSettings, model, adapter: AdapterSetup, say: Callable = _quiet) -> DataSetup:
    """The tokenizer and the examples of ``settings.data``, split into training and eval examples: Alpaca or
    chat rows, or (multimodal) image rows or a ScienceQA folder, whose images standardise the projection."""
    from ..tokenizers.tokenizer import check_vocabulary, find_tokenizer, load_tokenizer
    from ..training.data import load_examples, split_examples
    from ..training.packing import padding_report

    max_seq_len = default_max_seq_len(settings, model.config)
    tokenizer_path = settings.tokenizer or find_tokenizer(settings.model)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocabulary(tokenizer, model.config.vocab_size, tokenizer_path, settings.model)
    chat_template = None
    if settings.template == "chat":
        from ..training.chat import chat_template_of
        chat_template = chat_template_of(tokenizer, settings.chat_template)
    collate_fn = None
    mm = adapter.multimodal
    if mm is not None:
        from ..training.image_data import PixelCache, collate_images, load_image_instruction_examples
        from ..training.scienceqa import load_scienceqa_examples
        if os.path.isdir(settings.data):
            examples, report = load_scienceqa_examples(settings.data, tokenizer, max_seq_len, split=settings.split,
                                                       on_bad_row=settings.on_bad_row)
        else:
            examples, report = load_image_instruction_examples(settings.data, tokenizer, max_seq_len,
                                                               on_bad_row=settings.on_bad_row)
        pixels = PixelCache(mm.tower.preprocess)
        collate_fn = lambda rows: collate_images(rows, pixels)  # noqa: E731
        say(f"images: {sum(e.image is not None for e in examples)} of {len(examples)} examples have one")
    else:
        examples, report = load_examples(settings.data, tokenizer, max_seq_len, on_bad_row=settings.on_bad_row,
                                         template=settings.template, chat_template=chat_template)
    say(f"data: {settings.data}: {report.summary()}")
    train_examples, eval_examples = split_examples(examples, settings.eval_fraction, settings.seed)
    if mm is not None:
        calibrated = calibrate_projection(mm, train_examples, pixels)
        say(f"vision: image features standardised over {calibrated} training images" if calibrated else
            "vision: fewer than 2 training images: the image features are not standardised")
    waste = padding_report([len(e) for e in train_examples], max_seq_len=max_seq_len, batch_size=8,
                           batch_tokens=settings.batch_tokens)
    say(f"packing: {waste['real_tokens']:,} real tokens in {waste['packed_rows']} rows "
        f"({waste['packed_fill']:.0%} full, no padding); padding would be "
        f"{waste['pad_to_max_len']['padding_fraction']:.0%} of the tokens padded to {max_seq_len}, "
        f"{waste['pad_to_longest']['padding_fraction']:.0%} padded to the longest of batches of 8")
    return DataSetup(tokenizer, tokenizer_path, chat_template, examples, train_examples, eval_examples, collate_fn,
                     max_seq_len)


def run_fingerprint(settings: FinetuneSettings, data_file: dict, adapter: AdapterSetup, data: DataSetup,
                    n_layers: int) -> dict:
    """What the examples and the adapter come from (``TrainConfig.fingerprint``): a resume of a checkpoint
    made from other ones is refused. ``data_file``: :func:`~fastadapter.training.data.file_fingerprint` of the
    data file."""
    fingerprint = {"data": data_file, "max_seq_len": data.max_seq_len, "eval_fraction": settings.eval_fraction,
                   "on_bad_row": settings.on_bad_row, "prompt_len": settings.prompt_len,
                   "adapter_layers": adapter.config.layer_indices(n_layers),
                   "gate_activation": settings.gate_activation, "gate_shape": settings.gate_shape,
                   "adapter": settings.adapter, "template": settings.template, "quantize": settings.quantize}
    if adapter.multimodal is not None:
        from ..training.image_data import images_digest
        from ..vision.multimodal import vision_description
        fingerprint.update({"vision": vision_description(adapter.multimodal), "split": settings.split,
                            "images": images_digest(data.examples)})
    return fingerprint


def train(settings: FinetuneSettings, context, *, data_file: dict, run_folder=None, resume: Optional[str] = None,
          hooks: Optional[Callable[[object, object], dict]] = None, final_adapter_writer: Optional[Callable] = None,
          say: Callable = _quiet) -> FinetuneResult:
    """Run the recipe: :func:`setup_model`, :func:`setup_adapter`, :func:`setup_data`, then the training loop.

    Args:
        context: the :class:`~fastadapter.training.distributed.DistributedContext` of this process.
        data_file: :func:`~fastadapter.training.data.file_fingerprint` of the data file (taken before the model
            loads, so that a missing file fails fast).
        run_folder: the :class:`~fastadapter.training.run_folder.RunFolder` rank 0 holds (None on other ranks).
        resume: the checkpoint to continue.
        hooks: ``hooks(tokenizer, chat_template)`` → the loop's ``eval_hook`` / ``metrics_hook`` and a ``_close``
            list of what to close at the end.
        final_adapter_writer: wraps the final adapter's writer (``writer(save, out) -> save``).
        say: prints progress lines (rank 0).
    """
    from ..training.trainer import TrainConfig, train as train_loop

    torch.manual_seed(settings.seed)
    model = setup_model(settings, context)
    adapter = setup_adapter(model, settings, context, say)
    data = setup_data(settings, model, adapter, say)
    config = TrainConfig(out=settings.out, batch_tokens=settings.batch_tokens, grad_accum=settings.grad_accum,
                         max_steps=settings.max_steps, epochs=settings.epochs, lr=settings.lr,
                         warmup_steps=settings.warmup_steps, min_lr_ratio=settings.min_lr_ratio,
                         weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, dtype=settings.dtype,
                         eval_every=settings.eval_every, save_every=settings.save_every,
                         keep_checkpoints=settings.keep_checkpoints, seed=settings.seed, progress=settings.progress,
                         return_memory_to_os=settings.return_memory_to_os,
                         fingerprint=run_fingerprint(settings, data_file, adapter, data, model.config.n_layers))
    save_fn = adapter.save if final_adapter_writer is None else final_adapter_writer(adapter.save, settings.out)
    extra = {} if data.collate_fn is None else {"collate_fn": data.collate_fn}
    run_hooks = {"_close": []} if hooks is None else hooks(data.tokenizer, data.chat_template)
    closers = run_hooks.pop("_close", [])
    if resume:
        say(f"resuming from {resume}")
    try:
        result = train_loop(adapter.trained, data.train_examples, data.eval_examples, config, resume=resume,
                            context=context, save_adapter_fn=save_fn, run_folder=run_folder, **run_hooks, **extra)
    finally:
        for close in closers:
            close()
    return FinetuneResult(result, data.tokenizer_path, os.path.join(settings.out, "adapter.safetensors"),
                          adapter.multimodal is not None)
