"""``fastadapter train``: fine-tune a LLaMA-Adapter on Alpaca-format data with sequence packing.

Runs on one process, or on several with ``torchrun --nproc-per-node N -m fastadapter.cli train ...`` (data
parallel: each rank takes its share of every global batch of ``--grad-accum × N`` packed rows).

Examples are formatted with the Alpaca template (:mod:`fastadapter.training.prompt`, ``--template alpaca``) or,
for conversation rows (``messages`` or ShareGPT ``conversations``), with the tokenizer's own chat template and the
loss on the assistant turns (:mod:`fastadapter.training.chat`, ``--template chat``); prompt the trained adapter
the same way with ``fastadapter generate --template alpaca|chat``. ``--config run.yaml`` holds any of the flags
(:mod:`fastadapter.commands._config_file`; flags on the command line override it).

SIGINT and SIGTERM: from the resume and the step-0 evaluation on, a signal makes the run finish its current step
(or evaluation row), save a checkpoint — at step 0 if no step was taken — and exit with status 128 + the signal.
While the model and the data are still loading there is no training state yet, only the seeded initial adapter
that a new run recreates exactly, and loading a large model takes minutes: a signal then stops the process at
once (SIGINT: ``fastadapter: interrupted``, status 130; SIGTERM: the default action) with nothing to save.
"""
from __future__ import annotations

import math
import os
import shlex

from ._paths import check_outputs
from ._paths import default_tokenizer as _default_tokenizer

#: What a run writes in its --out folder (fastadapter.training.run_folder, the trainer, --eval-prompts, --tensorboard).
RUN_FILES = ("metrics.jsonl", "run.json", "adapter.safetensors", "samples.jsonl", "checkpoints", "tensorboard")

HELP = ("fine-tune a LLaMA-Adapter on Alpaca or chat JSON/JSONL data (packed sequences, resumable, "
        "torchrun-ready)")

#: The paper adapts the top 30 of LLaMA-7B's 32 layers; a smaller model gets min(30, its layer count).
PAPER_ADAPTER_LAYERS = 30


def add_arguments(parser) -> None:
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--model", required=True, help="llama2.c .bin, Meta folder, Hugging Face folder or GGUF file")
    io.add_argument("--tokenizer", help="tokenizer.json (Hugging Face), SentencePiece .model or llama2.c "
                         "tokenizer.bin (default: a GGUF model's own, else the first of these in the model's folder)")
    io.add_argument("--config", metavar="RUN.yaml",
                    help="a YAML mapping of any of these flags (model: DIR, lr: 0.01, ...); flags given on the "
                         "command line override it")
    io.add_argument("--data", required=True,
                    help=".json (array) or .jsonl: Alpaca rows (instruction, input, output) or, with --template "
                         "chat, conversations (messages with roles, or ShareGPT conversations)")
    io.add_argument("--template", choices=("alpaca", "chat"), default="alpaca",
                    help="alpaca: the Alpaca prompt, loss on the response; chat: the tokenizer's chat template, "
                         "loss on the assistant turns (needs a tokenizer.json with a chat template)")
    io.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the tokenizer's")
    io.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, adapter.safetensors")
    io.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                    help="continue from a checkpoint file or folder; alone: the newest checkpoint in --out")
    io.add_argument("--overwrite", action="store_true",
                    help="delete the run already in --out (checkpoints, metrics, adapter) and start afresh; "
                         "without it a new run refuses a used --out")
    io.add_argument("--on-bad-row", choices=("skip", "error"), default="skip",
                    help="a malformed data row is reported by index and skipped (default) or stops the run")
    io.add_argument("--eval-fraction", type=float, default=0.05, help="share of the rows held out for eval loss")

    length = parser.add_argument_group("length of the run")
    length.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    length.add_argument("--epochs", type=int, default=1, help="passes over the data when --max-steps is not given")
    length.add_argument("--batch-tokens", type=int, default=4096,
                        help="tokens per packed row (one micro-batch of one rank); must be >= --max-seq-len")
    length.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank per optimizer step")
    length.add_argument("--max-seq-len", type=int,
                        help="truncate examples to this many tokens (default: min(512, the model's max_seq_len))")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=2e-2,
                       help="peak learning rate of AdamW on the adapter (default 2e-2, for short runs of small models; "
                            "the paper's LLaMA-7B run used 9e-3 x global batch / 256)")
    optim.add_argument("--warmup", type=int, default=10, help="linear warmup steps before the cosine decay")
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to this fraction of --lr")
    optim.add_argument("--weight-decay", type=float, default=0.02, help="AdamW weight decay of the prompts")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    optim.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="base weights and autocast dtype; adapter parameters stay fp32 (default auto: bf16 on a "
                            "GPU of sm_80 or later, else fp32)")
    optim.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute the adapted blocks' activations in backward (less memory, more compute)")
    optim.add_argument("--seed", type=int, default=0, help="seed of the adapter initialisation, split and shuffling")

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--adapter", choices=("v1", "v2"), default="v1",
                         help="v1: prompts and zero-init gates (LLaMA-Adapter); v2: also bias and scale of every "
                              "linear layer and the norms (LLaMA-Adapter V2, arXiv 2304.15010)")
    adapter.add_argument("--prompt-len", type=int, default=10, help="learnable prompt tokens per adapted layer")
    adapter.add_argument("--adapter-layers", type=int, default=PAPER_ADAPTER_LAYERS,
                         help="adapt the top N layers; N is clamped to the model's layer count (default 30, the "
                              "paper's setting for LLaMA-7B: all 5 layers of stories260K)")
    adapter.add_argument("--gate-activation", choices=("tanh", "none"), default="tanh",
                         help="tanh(gate) as the paper's training code, or the raw gate as PEFT/litgpt")
    adapter.add_argument("--gate-shape", choices=("head", "scalar"), default="head",
                         help="one gate per query head (the paper) or one per layer (PEFT's and litgpt's layout: "
                              "use scalar with --gate-activation none to export to them)")

    memory = parser.add_argument_group("past one GPU's memory")
    memory.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the frozen base over the ranks with FSDP2 (fully_shard per "
                             "transformer block, loaded shard by shard); the adapter is replicated")
    memory.add_argument("--quantize", choices=("int8", "int4"),
                        help="weight-only quantization of the frozen base's projections through torchao: int8 "
                             "(per-row scales) or int4 (NF4: 4-bit codes, blockwise scales); the adapter stays fp32")

    vision = parser.add_argument_group("images (multimodal LLaMA-Adapter)")
    vision.add_argument("--vision-model", metavar="DIR",
                        help="a local Hugging Face vision model folder (CLIPVisionModel and its preprocessor config): "
                             "its frozen multi-scale image features, projected, are added to the adaption prompts; "
                             "--data is then a ScienceQA folder (problems.json, pid_splits.json, images/) or an "
                             "Alpaca JSON/JSONL whose rows may add an 'image' path")
    vision.add_argument("--vision-layers", metavar="I,J,...",
                        help="1-based encoder layers whose CLS token forms the image feature (default: 4 evenly "
                             "spaced layers, the last included)")
    vision.add_argument("--vision-pooling", choices=("cls", "mean"), default="cls",
                        help="a layer's global token: CLS (CLIP) or the mean over tokens")
    vision.add_argument("--fusion", choices=("all", "early"), default="all",
                        help="add the image to every adapted layer's prompt (LLaMA-Adapter), or only to the lowest "
                             "--early-fusion-layers adapted layers (LLaMA-Adapter V2's early fusion)")
    vision.add_argument("--early-fusion-layers", type=int, default=1,
                        help="with --fusion early: how many of the lowest adapted layers see the image")
    vision.add_argument("--split", default="train", help="the ScienceQA split trained on (pid_splits.json)")

    run = parser.add_argument_group("bookkeeping")
    run.add_argument("--eval-every", type=int, default=20, help="eval loss every N steps (also at 0 and the end)")
    run.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (also at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    run.add_argument("--device", help="cpu, cuda (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--return-memory-to-os", action="store_true",
                     help="on a CPU, give each step's large freed buffers back to the system: a lower peak RSS for "
                          "a slower step (docs/training.md)")
    run.add_argument("--eval-prompts", metavar="FILE",
                     help="prompts (one per line, or JSON lines with 'prompt' / 'instruction' / 'messages') "
                          "generated greedily at every evaluation into OUT/samples.jsonl")
    run.add_argument("--eval-max-new-tokens", type=int, default=64, help="tokens generated per --eval-prompts prompt")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write the metrics as TensorBoard scalars to OUT/tensorboard (needs tensorboard)")


#: The largest --seed: torch's generators take 64-bit seeds.
MAX_SEED = 2**63 - 1


def check_settings(args) -> None:
    """Raise ``ValueError`` naming the first flag whose value is out of range (before anything loads)."""
    def finite(flag: str, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")

    for flag, value in (("--lr", args.lr), ("--min-lr-ratio", args.min_lr_ratio),
                        ("--weight-decay", args.weight_decay), ("--grad-clip", args.grad_clip),
                        ("--eval-fraction", args.eval_fraction)):
        finite(flag, value)
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must lie in [0, 1] (the cosine decays to this fraction of --lr), got "
                         f"{args.min_lr_ratio}")
    if not 0.0 <= args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must lie in [0, 1), got {args.eval_fraction}")
    for flag, value in (("--weight-decay", args.weight_decay), ("--grad-clip", args.grad_clip),
                        ("--warmup", args.warmup), ("--eval-every", args.eval_every),
                        ("--save-every", args.save_every), ("--keep-checkpoints", args.keep_checkpoints)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    for flag, value in (("--max-steps", args.max_steps), ("--epochs", args.epochs),
                        ("--batch-tokens", args.batch_tokens), ("--grad-accum", args.grad_accum),
                        ("--prompt-len", args.prompt_len), ("--adapter-layers", args.adapter_layers)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_seq_len is not None:
        if args.max_seq_len < 2:
            raise ValueError(f"--max-seq-len must be at least 2 (a prompt token and a response token), got "
                             f"{args.max_seq_len}")
        if args.batch_tokens < args.max_seq_len:
            raise ValueError(f"--batch-tokens ({args.batch_tokens}) must be >= --max-seq-len ({args.max_seq_len}): "
                             f"a packed row must hold the longest example")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must lie in [0, 2**63 - 1], got {args.seed}")
    if os.path.isfile(args.out):
        raise ValueError(f"--out {args.out} is a file; expected a folder for the run (metrics.jsonl, "
                         f"checkpoints/, adapter.safetensors)")
    # The run folder's files (the RunFolder decides whether an existing run may be replaced: --overwrite).
    check_outputs({"--out": args.out, **{f"--out/{name}": os.path.join(args.out, name) for name in RUN_FILES}},
                  {"--model": args.model, "--tokenizer": args.tokenizer, "--data": args.data,
                   "--vision-model": getattr(args, "vision_model", None), "--chat-template": args.chat_template,
                   "--eval-prompts": args.eval_prompts, "--config": getattr(args, "config", None)},
                  overwrite=True, folders=("--out", "--out/checkpoints", "--out/tensorboard"))
    if args.overwrite and args.resume is not None:
        raise ValueError("--overwrite starts a new run; it cannot be combined with --resume")
    if args.chat_template is not None and args.template != "chat":
        raise ValueError("--chat-template is the template of --template chat; add --template chat")
    for flag, path in (("--chat-template", args.chat_template), ("--eval-prompts", args.eval_prompts)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} file not found: {path}")
    if args.eval_max_new_tokens <= 0:
        raise ValueError(f"--eval-max-new-tokens must be positive, got {args.eval_max_new_tokens}")
    if args.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if args.fsdp and args.quantize:
        raise ValueError(f"--fsdp and --quantize {args.quantize} cannot be combined: torchao's quantized weights are "
                         f"not sharded by FSDP here; shard a bf16 base (--fsdp --dtype bf16) or quantize a base that "
                         f"fits on one GPU")
    if args.quantize and args.adapter == "v2":
        raise ValueError(f"--quantize {args.quantize} is not combined with --adapter v2: LLaMA-Adapter V2 wraps every "
                         f"base projection in a learnable bias and scale, and the quantized projections are not "
                         f"wrapped; train --adapter v1 on a quantized base, or --adapter v2 on an unquantized one")
    check_vision_settings(args)


def parse_layer_list(text: str | None, flag: str) -> list[int] | None:
    """``"3,6,9"`` → ``[3, 6, 9]``; None stays None; ``ValueError`` naming ``flag`` otherwise."""
    if text is None:
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated layer numbers such as 3,6,9,12, got {text!r}") from None
    if not layers:
        raise ValueError(f"{flag} must name at least one layer, got {text!r}")
    return layers


def check_vision_settings(args) -> None:
    """The image flags: values in range, and --vision-model given exactly when the data has images."""
    if getattr(args, "vision_model", None) is None:
        for flag, given in (("--vision-layers", getattr(args, "vision_layers", None) is not None),
                            ("--fusion", getattr(args, "fusion", "all") != "all")):
            if given:
                raise ValueError(f"{flag} configures the image features: it needs --vision-model")
        from ..training.image_data import has_images
        if os.path.exists(args.data) and has_images(args.data):
            raise ValueError(f"--data {args.data} holds images (a ScienceQA folder or rows with 'image'): pass "
                             f"--vision-model DIR, the vision tower that encodes them")
        return
    if not os.path.isdir(args.vision_model):
        raise FileNotFoundError(f"--vision-model folder not found: {args.vision_model}")
    for flag, given in (("--fsdp", args.fsdp), ("--adapter v2", args.adapter == "v2"),
                        ("--template chat", args.template == "chat")):
        if given:
            raise ValueError(f"--vision-model trains a LLaMA-Adapter V1 with image prompts on Alpaca-style rows; "
                             f"{flag} is not combined with it")
    parse_layer_list(args.vision_layers, "--vision-layers")
    if args.early_fusion_layers <= 0:
        raise ValueError(f"--early-fusion-layers must be positive, got {args.early_fusion_layers}")

def _load_resumed(path: str) -> dict:
    """The checkpoint to resume; when it cannot be read, the error names the older checkpoints beside it."""
    from ..training.checkpoint import list_checkpoints, load_checkpoint

    try:
        return load_checkpoint(path)
    except ValueError as exc:
        older = [p for _, p in list_checkpoints(os.path.dirname(os.path.abspath(path)))
                 if os.path.abspath(p) != os.path.abspath(path)]
        if not older:
            raise
        raise ValueError(f"{exc}; resume from an older checkpoint instead: --resume {older[-1]}") from exc


def run(args) -> int:
    check_settings(args)  # before torch is even imported

    from ..training.checkpoint import resolve_resume
    from ..training.data import file_fingerprint
    from ..training.distributed import init_from_environment
    from ..training.run_folder import RunFolder

    # A bad setting, a missing data file or checkpoint, a used or locked --out fail before the model loads.
    problems = os.path.join(args.data, "problems.json")  # a ScienceQA folder: its problems are the data file
    data_file = file_fingerprint(problems if os.path.isfile(problems) else args.data)
    resume = None if args.resume is None else resolve_resume(args.resume or args.out, args.out)
    context = init_from_environment(args.device)
    folder = None
    if context.is_main:
        state = None if resume is None else _load_resumed(resume)
        folder = RunFolder.open(args.out, resume_state=state, resume_path=resume, overwrite=args.overwrite)
    try:
        return _train(args, context, folder, resume, data_file)
    finally:
        if folder is not None:
            folder.release()


def finetune_settings(args, device):
    """The recipe's settings from the parsed flags (``--dtype`` resolved on ``device``)."""
    from ..recipes.adapter_finetune import FinetuneSettings

    return FinetuneSettings(
        model=args.model, data=args.data, out=args.out, tokenizer=args.tokenizer,
        dtype=dtype_name(args.dtype, device), seed=args.seed, fsdp=args.fsdp,
        activation_checkpointing=args.activation_checkpointing, adapter=args.adapter,
        adapter_layers=args.adapter_layers, prompt_len=args.prompt_len, gate_activation=args.gate_activation,
        gate_shape=args.gate_shape, quantize=args.quantize, template=args.template, chat_template=args.chat_template,
        on_bad_row=args.on_bad_row, eval_fraction=args.eval_fraction, max_seq_len=args.max_seq_len,
        vision_model=args.vision_model, vision_layers=parse_layer_list(args.vision_layers, "--vision-layers"),
        vision_pooling=args.vision_pooling, fusion=args.fusion, early_fusion_layers=args.early_fusion_layers,
        split=args.split, batch_tokens=args.batch_tokens, grad_accum=args.grad_accum, max_steps=args.max_steps,
        epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
        return_memory_to_os=args.return_memory_to_os)


def _train(args, context, folder, resume, data_file) -> int:
    from ..recipes import adapter_finetune

    say = print if context.is_main else (lambda *a, **k: None)
    if args.fsdp and not context.active:
        raise ValueError("--fsdp shards the base over the ranks of a torchrun job, and this is one process: "
                         "launch with torchrun --nproc-per-node N -m fastadapter.cli train --fsdp ... (N >= 2)")
    settings = finetune_settings(args, context.device)
    done = adapter_finetune.train(settings, context, data_file=data_file, run_folder=folder, resume=resume,
                                  hooks=lambda tokenizer, chat_template: _run_hooks(args, context, tokenizer,
                                                                                    chat_template),
                                  final_adapter_writer=_final_adapter_writer, say=say)
    result = done.result
    if result.interrupted_by is not None:
        say(f"interrupted by signal {result.interrupted_by} at step {result.steps}: checkpoint saved in "
            f"{os.path.join(args.out, 'checkpoints')}; continue with --resume")
        return 128 + int(result.interrupted_by)
    first = "n/a" if result.initial_eval_loss is None else f"{result.initial_eval_loss:.4f}"
    last = "n/a" if result.eval_loss is None else f"{result.eval_loss:.4f}"
    say(f"done: {result.steps} steps, train loss {result.loss:.4f}, eval loss {first} -> {last}; adapter: "
        f"{done.adapter_path}")
    image = f" --vision-model {shlex.quote(args.vision_model)} --image IMAGE" if done.multimodal else ""
    say(f"try it: fastadapter generate --model {shlex.quote(args.model)} --tokenizer "
        f"{shlex.quote(done.tokenizer_path)} --adapter {shlex.quote(done.adapter_path)}{image} --template "
        f"{args.template} --prompt '...'")
    return 0


def _final_adapter_writer(save_fn, out: str):
    """``save_fn`` (``fn(model, path)``, the final adapter's writer) whose full disk (or quota) says that the run's
    last checkpoint, saved just before, is intact and how to finish from it."""
    import errno

    def write(model, path: str) -> None:
        try:
            save_fn(model, path)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            from ..training.checkpoint import list_checkpoints
            saved = list_checkpoints(os.path.join(out, "checkpoints"))
            where = (f"the run's last checkpoint {saved[-1][1]} is intact: free some space, then rerun the same "
                     f"command with --resume {shlex.quote(saved[-1][1])} to write the adapter" if saved else
                     "no checkpoint was saved")
            raise OSError(exc.errno, f"{os.strerror(exc.errno)} while writing the final adapter; {where}",
                          path) from exc

    return write


def dtype_name(name: str, device) -> str:
    """``--dtype`` resolved on ``device`` (``auto``: bf16 on a GPU of sm_80 or later, else fp32) as its name."""
    import torch

    from ._device import resolve_dtype
    dtype = resolve_dtype(name, device)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _run_hooks(args, context, tokenizer, chat_template) -> dict:
    """The trainer's ``eval_hook`` (``--eval-prompts``) and ``metrics_hook`` (``--tensorboard``), rank 0 only;
    ``_close`` lists what to close at the end."""
    hooks: dict = {"_close": []}
    if not context.is_main:
        return hooks
    if args.eval_prompts:
        from ..training.samples import SampleWriter, read_prompts
        writer = SampleWriter(os.path.join(args.out, "samples.jsonl"), read_prompts(args.eval_prompts),
                              tokenizer, template=args.template, chat_template=chat_template,
                              max_new_tokens=args.eval_max_new_tokens)
        hooks["eval_hook"] = writer
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        board = SummaryWriter(os.path.join(args.out, "tensorboard"))

        def metrics_hook(record: dict) -> None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, record["step"])
            board.flush()

        hooks["metrics_hook"] = metrics_hook
        hooks["_close"].append(board.close)
    return hooks
