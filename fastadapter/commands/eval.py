"""``fastadapter eval --task scienceqa``: answer-letter accuracy of an adapter on a ScienceQA split, overall and by
subject, context modality and grade, written as JSON.

A multimodal adapter (trained with ``fastadapter train --vision-model``) needs its vision tower
(``--vision-model``; another tower is refused); ``--no-images`` scores the same adapter without the images (the
image's contribution is the difference). A text-only adapter scores the problems from their text.
"""
from __future__ import annotations

import json
import os
import sys

from ._device import add_device_arguments, resolve_device, resolve_dtype
from ._paths import check_outputs, write_atomically

HELP = "evaluate an adapter on a benchmark (ScienceQA: answer accuracy by subject, context and grade, as JSON)"

TASKS = ("scienceqa",)


def add_arguments(parser) -> None:
    parser.add_argument("--task", required=True, choices=TASKS, help="the benchmark")
    parser.add_argument("--model", required=True, help="llama2.c .bin, Meta folder, Hugging Face folder or GGUF file")
    parser.add_argument("--tokenizer", help="SentencePiece .model or llama2.c tokenizer.bin (default: a GGUF "
                                            "model's own, else tokenizer.model or tokenizer.bin in the model's "
                                            "folder)")
    parser.add_argument("--adapter", help="the adapter file (without: the base model)")
    parser.add_argument("--vision-model", metavar="DIR", help="the vision tower the adapter was trained with")
    parser.add_argument("--no-images", action="store_true",
                        help="score a multimodal adapter without the images (an ablation)")
    parser.add_argument("--data", required=True, help="ScienceQA folder (problems.json, pid_splits.json, images/)")
    parser.add_argument("--split", default="test", help="the split evaluated (pid_splits.json; default test)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems of the split")
    parser.add_argument("--out", help="write the JSON report here (default: print it); never one of the inputs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (atomically)")
    parser.add_argument("--max-seq-len", type=int, help="longest question + answer (default: the model's)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed row of options")
    parser.add_argument("--on-bad-row", choices=("skip", "error"), default="skip",
                        help="a malformed problem is reported by pid and skipped (default) or stops the evaluation")
    add_device_arguments(parser, dtype_help="the base model's and the tower's dtype")


def check_settings(args) -> None:
    """Raise ``ValueError`` naming the first flag out of range (before anything loads)."""
    for flag, value in (("--limit", args.limit), ("--max-seq-len", args.max_seq_len),
                        ("--batch-tokens", args.batch_tokens)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data: ScienceQA folder not found: {args.data}")
    if args.vision_model is not None and not os.path.isdir(args.vision_model):
        raise FileNotFoundError(f"--vision-model folder not found: {args.vision_model}")
    check_outputs({"--out": args.out}, {"--model": args.model, "--adapter": args.adapter, "--tokenizer": args.tokenizer,
                                        "--data": args.data, "--vision-model": args.vision_model},
                  overwrite=args.overwrite)


def run(args) -> int:
    check_settings(args)

    from ..adapters.adapter import load_adapter
    from ..loaders.checkpoints import load_model
    from ..tokenizers.tokenizer import check_vocabulary, load_tokenizer
    from ..training.data import DataReport
    from ..training.image_data import PixelCache
    from ..training.scienceqa import load_problems
    from ..training.scienceqa_eval import accuracy_report, predict
    from .train import _default_tokenizer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    report = DataReport()
    problems = load_problems(args.data, args.split, on_bad_row=args.on_bad_row, report=report)
    if args.limit is not None:
        problems = problems[:args.limit]
    model = load_model(args.model, dtype=dtype)
    scorer, pixels = model, None
    if args.adapter:
        from ..adapters.adapter_file import adapter_file_kind
        from ..vision import load_multimodal_adapter
        multimodal = adapter_file_kind(args.adapter) == "multimodal"
        if multimodal and not args.no_images:
            if args.vision_model is None:
                raise ValueError(f"{args.adapter} conditions on images: pass --vision-model DIR (the tower it was "
                                 f"trained with), or --no-images to score it without them")
            scorer = load_multimodal_adapter(model, args.adapter, args.vision_model)
            pixels = PixelCache(scorer.tower.preprocess)
        else:
            if not multimodal and args.vision_model is not None:
                raise ValueError(f"{args.adapter} is a text-only adapter (no image projection): --vision-model "
                                 f"does not apply")
            load_adapter(model, args.adapter)
    elif args.vision_model is not None:
        raise ValueError("--vision-model needs a multimodal --adapter (the projection of the image features)")
    scorer.to(device)
    tokenizer_path = args.tokenizer or _default_tokenizer(args.model)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocabulary(tokenizer, model.config.vocab_size, tokenizer_path, args.model)
    max_seq_len = args.max_seq_len or model.config.max_seq_len
    if max_seq_len > model.config.max_seq_len:
        raise ValueError(f"--max-seq-len ({max_seq_len}) exceeds the model's max_seq_len "
                         f"({model.config.max_seq_len}: its context, or its sliding attention window); give at most "
                         f"{model.config.max_seq_len}")
    predictions = predict(scorer, problems, tokenizer, max_seq_len=max_seq_len, batch_tokens=args.batch_tokens,
                          pixels=pixels, device=device)
    result = {"task": args.task, "data": os.path.abspath(args.data), "split": args.split,
              "adapter": args.adapter, "images": pixels is not None, "skipped_problems": len(report.bad_rows),
              **accuracy_report(problems, predictions)}
    text = json.dumps(result, indent=2)
    if args.out:
        def write(path: str) -> None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")

        write_atomically(args.out, write)
    else:
        print(text)
    subjects = ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in result["by_subject"].items())
    print(f"scienceqa {args.split}: accuracy {result['accuracy']:.1%} on {result['problems']} problems (chance "
          f"{result['chance']:.1%}); {subjects}" + (f"; report: {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0
