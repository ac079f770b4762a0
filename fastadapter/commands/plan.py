"""``fastadapter plan``: how many FLOPs, and how many GPU-hours, a LLaMA-Adapter fine-tuning run costs with and
without sequence packing (see :mod:`fastadapter.training.flops` for what is counted), and how much memory each
GPU needs — bf16 or quantized base, replicated or sharded by FSDP — for LLaMA 7B to 70B, with the cards
(24, 40, 80 GB) each fits on (see :mod:`fastadapter.training.memory_plan`)."""
from __future__ import annotations

import math
import os
import statistics

HELP = "FLOPs per epoch and GPU time of an adapter fine-tuning run, padded vs packed (A100/H100 estimate)"

#: The paper's run: LLaMA-7B on Stanford Alpaca (52,002 rows), 5 epochs, on 8 A100s.
PAPER_ROWS, PAPER_EPOCHS, PAPER_GPUS = 52_002, 5, 8
#: UTF-8 bytes per token of LLaMA's SentencePiece tokenizer on Alpaca-format English text (measured: 4.06 on
#: alpaca_tiny.json, 4.09 on alpaca_en_demo.json); used only when no --tokenizer can be found.
BYTES_PER_TOKEN = 4.0


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="a named config (llama-7b, llama-13b, llama-65b, llama2-7b, llama2-13b, llama2-70b, "
                             "llama3-8b, llama3-70b) or a checkpoint path (llama2.c .bin, Meta or HF folder)")
    parser.add_argument("--data", required=True, help="Alpaca-format .json/.jsonl whose lengths to use")
    parser.add_argument("--gpu", required=True, choices=("a100", "h100"), help="peak bf16: A100 312 TF, H100 989 TF")
    parser.add_argument("--gpus", type=int, default=PAPER_GPUS, help=f"GPUs (default {PAPER_GPUS}, the paper's)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed (default 0.4)")
    parser.add_argument("--tokenizer", help="tokenizer for exact lengths (default: the model folder's; without "
                                            f"one, lengths are estimated at {BYTES_PER_TOKEN} bytes per token)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="truncation and the paper's padded width")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="examples per GPU batch when padding to the longest of a batch (default 4, the paper's)")
    parser.add_argument("--prompt-len", type=int, default=10)
    parser.add_argument("--adapter-layers", type=int, default=30, help="top layers adapted (clamped to the model)")
    parser.add_argument("--rows", type=int, default=PAPER_ROWS,
                        help=f"rows of the planned run: the data's length distribution is scaled to this "
                             f"(default {PAPER_ROWS:,}, Alpaca)")
    parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help=f"default {PAPER_EPOCHS}, the paper's")
    memory = parser.add_argument_group("memory per GPU")
    memory.add_argument("--batch-tokens", type=int, default=4096,
                        help="tokens of one packed micro-batch per GPU (default 4096, as fastadapter train)")
    memory.add_argument("--fsdp", action="store_true",
                        help="the base sharded over the --gpus by FSDP (default: every GPU holds the whole base)")
    memory.add_argument("--quantize", choices=("int8", "int4"), help="the base's projections quantized")
    memory.add_argument("--activation-checkpointing", action="store_true",
                        help="keep only each adapted block's input for backward")


def _model_config(name_or_path: str):
    from ..training.flops import NAMED_CONFIGS

    if name_or_path.lower() in NAMED_CONFIGS:
        return NAMED_CONFIGS[name_or_path.lower()]
    if not os.path.exists(name_or_path):
        raise ValueError(f"--model {name_or_path!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) nor an "
                         f"existing checkpoint path")
    from ..loaders.checkpoints import detect_checkpoint_format, load_model

    format = detect_checkpoint_format(name_or_path)
    if format == "llama2c":
        from ..loaders.load_llama2c import read_llama2c_config
        return read_llama2c_config(name_or_path)[0]
    if format == "hf":
        from ..loaders.load_hf import read_hf_config
        return read_hf_config(name_or_path)
    return load_model(name_or_path).config  # Meta: the shape is in the (memory-mapped) shards


def _find_tokenizer(args) -> str | None:
    if args.tokenizer:
        return args.tokenizer
    if os.path.exists(args.model):
        folder = args.model if os.path.isdir(args.model) else os.path.dirname(os.path.abspath(args.model))
        for name in ("tokenizer.model", "tokenizer.bin"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def _lengths(args) -> tuple[list[int], str]:
    """Model-input lengths of the data's examples (truncated to --max-seq-len), and how they were obtained."""
    from ..training.data import load_examples, load_rows
    from ..training.prompt import format_prompt

    tokenizer_path = _find_tokenizer(args)
    if tokenizer_path:
        from ..tokenizers.tokenizer import load_tokenizer
        examples, _ = load_examples(args.data, load_tokenizer(tokenizer_path), args.max_seq_len)
        return [len(e) for e in examples], f"tokenised with {tokenizer_path}"
    lengths = []
    for row in load_rows(args.data):
        text = format_prompt(row["instruction"], row.get("input", "")) + row["output"]
        # + BOS + EOS - 1 (the model input is the sequence without its last token)
        lengths.append(min(args.max_seq_len, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN) + 1))
    return lengths, f"estimated at {BYTES_PER_TOKEN} bytes/token (no tokenizer; pass --tokenizer for exact counts)"


def _human(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops:,.0f} FLOP"


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 60:
        return f"{seconds:.2g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{hours:.2f} h"


def check_settings(args) -> None:
    """Raise ``ValueError`` naming the first flag whose value is out of range."""
    for flag, value in (("--gpus", args.gpus), ("--max-seq-len", args.max_seq_len),
                        ("--batch-size", args.batch_size), ("--prompt-len", args.prompt_len),
                        ("--adapter-layers", args.adapter_layers), ("--rows", args.rows), ("--epochs", args.epochs),
                        ("--batch-tokens", args.batch_tokens)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.fsdp and args.quantize:
        raise ValueError(f"--fsdp and --quantize {args.quantize} cannot be combined (as in fastadapter train)")
    if not (math.isfinite(args.mfu) and 0 < args.mfu <= 1):
        raise ValueError(f"--mfu must lie in (0, 1] (the share of the GPU's peak FLOP rate), got {args.mfu}")


def run(args) -> int:
    check_settings(args)
    from ..training.flops import epoch_flops, padded_lengths, training_hours

    config = _model_config(args.model)
    layers = min(args.adapter_layers, config.n_layers)
    lengths, source = _lengths(args)
    trainable = layers * (args.prompt_len * config.dim + config.n_heads)
    print(f"model: {args.model} ({config.n_layers} layers, dim {config.dim}, {config.n_heads} heads, "
          f"{config.n_kv_heads} kv heads, vocab {config.vocab_size}); adapter: top {layers} layers, prompt "
          f"{args.prompt_len} ({trainable:,} trainable parameters)")
    print(f"data: {args.data}: {len(lengths):,} examples, {source}; tokens per example: mean "
          f"{statistics.mean(lengths):.1f}, median {statistics.median(lengths):.0f}, max {max(lengths)} "
          f"(truncated to {args.max_seq_len})")
    scale = args.rows / len(lengths) * args.epochs
    print(f"planned run: {args.rows:,} rows (the data's lengths scaled) x {args.epochs} epochs on {args.gpus} x "
          f"{args.gpu.upper()} at {args.mfu:.0%} MFU")
    schemes = [(f"padded to {args.max_seq_len} (paper)", padded_lengths(lengths, pad_to=args.max_seq_len)),
               (f"padded to longest of {args.batch_size}", padded_lengths(lengths, batch_size=args.batch_size)),
               ("packed (fastadapter)", lengths)]
    real = sum(lengths)
    header = (f"{'batching':<28} {'padding':>8} {'fwd/epoch':>14} {'bwd/epoch':>14} {'total/epoch':>14} "
              f"{'planned run':>14} {'time':>9}")
    print(header)
    print("-" * len(header))
    hours = {}
    for name, computed in schemes:
        flops = epoch_flops(config, computed, adapter_layers=layers, prompt_len=args.prompt_len)
        run_flops = flops.total * scale
        hours[name] = training_hours(run_flops, gpu=args.gpu, gpus=args.gpus, mfu=args.mfu)
        print(f"{name:<28} {1 - real / sum(computed):>8.1%} {_human(flops.forward):>14} {_human(flops.backward):>14} "
              f"{_human(flops.total):>14} {_human(run_flops):>14} {_duration(hours[name]):>9}")
    names = [name for name, _ in schemes]
    print(f"packing does the run in {_duration(hours[names[2]])} instead of {_duration(hours[names[0]])} "
          f"({hours[names[0]] / hours[names[2]]:.1f}x less compute than padding to {args.max_seq_len}, "
          f"{hours[names[1]] / hours[names[2]]:.1f}x less than padding to the longest of a batch)")
    from ..training.memory_plan import PLAN_MODELS
    print_memory_plan(args, None if args.model.lower() in PLAN_MODELS else args.model, config)
    return 0


def print_memory_plan(args, own_name: str | None, own_config) -> None:
    """The per-GPU memory table: the planned model (when it is not one of the tabulated bases) and LLaMA 7B,
    13B, 65B and Llama-2 70B, under the run's --batch-tokens, --gpus, --fsdp, --quantize."""
    from ..training.flops import NAMED_CONFIGS
    from ..training.memory_plan import CARDS_GIB, GIB, PLAN_MODELS, estimate_memory, fitting_cards

    base = {None: "bf16", "int8": "int8 projections", "int4": "int4 (NF4) projections"}[args.quantize]
    layout = (f"sharded by FSDP over {args.gpus} GPUs" if args.fsdp else
              f"replicated on each of {args.gpus} GPUs (data parallel)" if args.gpus > 1 else "on one GPU")
    print(f"memory per GPU: base in {base}, {layout}; micro-batch of {args.batch_tokens:,} tokens, top "
          f"{args.adapter_layers} layers adapted, prompt {args.prompt_len}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''} (GiB)")
    header = (f"{'model':<12} {'base':>7} {'gathered':>9} {'adapter':>8} {'activations':>12} {'logits':>7} "
              f"{'overhead':>9} {'total':>7}  fits on")
    print(header)
    print("-" * (len(header) + 12))
    rows = ([(own_name, own_config)] if own_name else []) + [(name, NAMED_CONFIGS[name]) for name in PLAN_MODELS]
    for name, config in rows:
        m = estimate_memory(config, batch_tokens=args.batch_tokens, adapter_layers=args.adapter_layers,
                            prompt_len=args.prompt_len, gpus=args.gpus, fsdp=args.fsdp, quantize=args.quantize,
                            activation_checkpointing=args.activation_checkpointing)
        cards = fitting_cards(m.total)
        fits = ", ".join(f"{c} GB" for c in cards) if cards else f"none of {', '.join(map(str, CARDS_GIB))} GB"
        label = os.path.basename(os.path.normpath(name)) if name == own_name else name
        print(f"{label[:12]:<12} {m.base / GIB:>7.2f} {m.gathered / GIB:>9.2f} {m.adapter / GIB:>8.3f} "
              f"{m.activations / GIB:>12.2f} {m.logits / GIB:>7.2f} {m.overhead / GIB:>9.2f} {m.total / GIB:>7.2f}"
              f"  {fits}")
