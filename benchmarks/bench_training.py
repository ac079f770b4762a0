"""A LLaMA-Adapter training step on real Alpaca rows: fastadapter (packed sequences) against PEFT's
``adaption_prompt`` on a Hugging Face ``LlamaForCausalLM`` of the same shape, padded as PEFT users pad.

One random LLaMA (LLaMA's 32000-token vocabulary, head_dim 64, no weights downloaded) is built in Hugging Face,
wrapped by PEFT on every layer (gates set non-zero), and the same weights and adapter are loaded into
fastadapter's model. The data are real Alpaca rows tokenised with LLaMA's tokenizer (Alpaca prompt, loss on the
response only, truncated to 512 tokens). A step processes the same examples for every provider, with gradient
accumulation over micro-batches of about the same real-token budget, then an AdamW step on the adapter:

* ``fastadapter-packed``: examples packed into rows of at most ``batch_tokens`` tokens (varlen, no padding),
  the loss of fastadapter's training loop (logits computed at response tokens only);
* ``peft-pad-longest``: PEFT on micro-batches of ``batch_size`` examples padded to the longest of each;
* ``peft-pad-512``: PEFT on the same micro-batches padded to 512 (the original LLaMA-Adapter recipe).

PEFT computes logits at every position, as ``LlamaForCausalLM(..., labels=...)`` does in a PEFT training loop.

``tokens_per_s`` counts real (non-padding) tokens only; ``peak_mem_mb`` is the peak allocation of one step.
Before timing, the summed token loss of every provider is checked against fastadapter's (``loss_rel_err``): the
benchmark must not time things that compute different results, and a provider off by more than ``LOSS_RTOL``
gives a ``skipped`` row instead of times.

    python -m benchmarks.bench_training --quick
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastadapter.training.loss import token_loss_sum

from . import shared_data
from .memory import peak_memory_bytes
from .timing import measure, summarize

MAX_SEQ_LEN = 512
#: A provider whose summed token loss differs from fastadapter's by more than this (relative) is not timed. Both
#: models run in fp32: the committed runs agree to ~3e-8, a wrong gate or a dropped prompt changes it by percents.
LOSS_RTOL = 1e-4


@dataclass(frozen=True)
class TrainingConfig:
    """A LLaMA of ``n_layers`` × ``dim`` adapted on every layer with a ``prompt_len`` prompt; a step over
    ``examples`` Alpaca rows in micro-batches of ``batch_size`` examples (PEFT) or ``batch_tokens`` tokens
    (packed)."""

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    examples: int
    batch_size: int
    batch_tokens: int
    vocab_size: int = 32000
    prompt_len: int = 10

    @property
    def label(self) -> str:
        return (f"dim{self.dim}-L{self.n_layers}-H{self.n_heads}-P{self.prompt_len}-alpaca{self.examples}"
                f"-b{self.batch_size}/{self.batch_tokens}tok")


#: Modules this suite needs beyond torch (the runner skips it, with the reason, when one does not import).
REQUIRES = ("transformers", "peft")


def config_for(preset: str) -> TrainingConfig:
    """Small LLaMA shapes whose step takes seconds on a CPU (head_dim 64, LLaMA's vocabulary).

    ``default`` is the README main job's training step (the whole job takes about 5 minutes on 2 cores): 8 Alpaca
    rows in two micro-batches through dim 256 × 4 layers (the suite took over 220 CPU-seconds with 16 rows). ``full`` is the larger
    model (dim 512 × 8 layers, 32 rows): its suite alone takes ~5.5 minutes on a 2-core CPU (a PEFT step padded
    to 512 takes ~25 s). ``quick`` is a shorter step of the default model (``--quick`` leaves the suite out, but
    ``--quick --suites training`` runs it).
    """
    if preset == "smoke":
        return TrainingConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=176, examples=2, batch_size=2,
                              batch_tokens=512)
    if preset == "quick":
        return TrainingConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=704, examples=4, batch_size=4,
                              batch_tokens=1024)
    if preset == "default":
        return TrainingConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=704, examples=8, batch_size=4,
                              batch_tokens=1024)
    if preset == "full":
        return TrainingConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1408, examples=32, batch_size=8,
                              batch_tokens=2048)
    raise ValueError(f"unknown preset {preset!r}; expected 'smoke', 'quick', 'default' or 'full'")


def alpaca_examples(count: int):
    """The first ``count`` rows of ``alpaca_tiny.json`` tokenised with LLaMA's SentencePiece tokenizer."""
    from fastadapter.tokenizers.tokenizer import load_tokenizer
    from fastadapter.training.data import load_rows, tokenize_rows

    folder = shared_data.require("alpaca_tiny.json", "llama_tokenizer.model")
    rows = load_rows(folder / "alpaca_tiny.json")[:count]
    return tokenize_rows(rows, load_tokenizer(folder / "llama_tokenizer.model"), MAX_SEQ_LEN)


def build_models(config: TrainingConfig, device, folder: str):
    """``(peft_model, fastadapter_model)``: the same random LLaMA and adapter in Hugging Face + PEFT and in
    fastadapter, in training mode."""
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastadapter

    hf_config = LlamaConfig(hidden_size=config.dim, intermediate_size=config.hidden_dim,
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_heads, vocab_size=config.vocab_size,
                            max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(hf_config)
    base.save_pretrained(os.path.join(folder, "base"))  # before PEFT wraps the attention modules
    peft_model = get_peft_model(base, AdaptionPromptConfig(adapter_len=config.prompt_len,
                                                           adapter_layers=config.n_layers, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if name.endswith("adaption_gate"):  # zero-initialised: the prompt would not change the output
                parameter.uniform_(0.3, 0.9)
    peft_model.save_pretrained(os.path.join(folder, "adapter"))
    ours = fastadapter.load_model(os.path.join(folder, "base"))
    fastadapter.load_adapter(ours, os.path.join(folder, "adapter"))
    return peft_model.to(device).train(), ours.to(device).train()


def _hf_micro_batches(examples, batch_size: int, pad_to, device) -> list[tuple]:
    """``(input_ids, attention_mask, labels)`` per micro-batch, right-padded (``pad_to`` None: to the longest)."""
    from fastadapter.training.packing import pad_examples

    batches = []
    for i in range(0, len(examples), batch_size):
        padded = pad_examples(examples[i:i + batch_size], pad_to=pad_to)
        mask = torch.zeros_like(padded.tokens)
        for row, length in enumerate(padded.lengths):
            mask[row, :length] = 1
        batches.append((padded.tokens.to(device), mask.to(device), padded.labels.to(device)))
    return batches


def _packed_micro_batches(examples, batch_tokens: int, device) -> list:
    from fastadapter.training.packing import collate_packed, pack_examples

    rows = pack_examples([len(e) for e in examples], batch_tokens)
    return [collate_packed([examples[i] for i in row]).to(device) for row in rows]


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the positions whose label is not -100 (labels are already the next tokens)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def step_functions(peft_model, ours, examples, config: TrainingConfig, device) -> dict[str, Callable[[], float]]:
    """``{provider: step()}``; each step runs forward + backward over every micro-batch, then AdamW, and returns
    the summed token loss."""
    loss_tokens = sum(e.loss_tokens for e in examples)

    def optimizer_for(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def packed_step(batches=_packed_micro_batches(examples, config.batch_tokens, device),
                    optimizer=optimizer_for(ours)):
        total = 0.0
        for batch in batches:
            loss = token_loss_sum(ours, batch)  # what fastadapter's training loop runs
            (loss / loss_tokens).backward()
            total += float(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def peft_step_for(pad_to):
        batches = _hf_micro_batches(examples, config.batch_size, pad_to, device)
        optimizer = optimizer_for(peft_model)

        def step():
            total = 0.0
            for input_ids, mask, labels in batches:
                logits = peft_model(input_ids=input_ids, attention_mask=mask).logits
                loss = _token_loss(logits, labels)
                (loss / loss_tokens).backward()
                total += float(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total
        return step

    # PEFT padded to the longest first: the runner's speed-up column divides by the first provider.
    return {"peft-pad-longest": peft_step_for(None), "peft-pad-512": peft_step_for(MAX_SEQ_LEN),
            "fastadapter-packed": packed_step}


@torch.no_grad()
def _losses(steps_models, examples, config, device) -> dict[str, float]:
    """The summed token loss of each provider's micro-batches, without a step (for the correctness check)."""
    peft_model, ours = steps_models
    losses = {"fastadapter-packed": sum(float(token_loss_sum(ours, b))
                                        for b in _packed_micro_batches(examples, config.batch_tokens, device))}
    for name, pad_to in (("peft-pad-longest", None), ("peft-pad-512", MAX_SEQ_LEN)):
        losses[name] = sum(float(_token_loss(peft_model(input_ids=i, attention_mask=m).logits, lab))
                           for i, m, lab in _hf_micro_batches(examples, config.batch_size, pad_to, device))
    return losses


def run(quick: bool, device: str, *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="training"``, mode ``train_step``, one per provider, with ``tokens_per_s`` (real tokens),
    ``peak_mem_mb``, ``padding_fraction`` and ``loss_rel_err`` (against fastadapter-packed)."""
    preset = preset or ("quick" if quick else "full" if full else "default")
    warmup, repeats = {"smoke": (0, 1), "quick": (1, 3), "default": (1, 3)}.get(preset, (1, 5))
    return run_config(config_for(preset), device, warmup=warmup,
                      repeats=repeats, log=log)


def run_config(config: TrainingConfig, device: str, *, warmup: int = 1, repeats: int = 5,
               log: Callable[[str], None] = print) -> list[dict]:
    """The rows of :func:`run` for one model and step."""
    examples = alpaca_examples(config.examples)
    real_tokens = sum(len(e) for e in examples)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")  # transformers' deprecation notices
        peft_model, ours = build_models(config, device, folder)
        losses = _losses((peft_model, ours), examples, config, device)
        reference = losses["fastadapter-packed"]
        errors = {name: abs(loss - reference) / abs(reference) for name, loss in losses.items()}
        log(f"  training: {config.label}: {real_tokens} real tokens; summed token loss "
            + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items()))
        all_steps = step_functions(peft_model, ours, examples, config, device)
        steps = {name: step for name, step in all_steps.items() if not errors[name] > LOSS_RTOL}
        computed = {"fastadapter-packed": real_tokens,
                    "peft-pad-longest": sum(b[0].numel() for b in _hf_micro_batches(examples, config.batch_size,
                                                                                    None, device)),
                    "peft-pad-512": MAX_SEQ_LEN * len(examples)}
        times = interleaved_times(steps, warmup, repeats, device)
        rows = []
        for provider in all_steps:
            row = {"suite": "training", "provider": provider, "mode": "train_step", "config": config.label}
            if provider not in steps:
                reason = (f"wrong result, not timed: summed token loss {losses[provider]:.6f} vs fastadapter-packed's "
                          f"{reference:.6f} (relative error {errors[provider]:.1e} > {LOSS_RTOL:.0e})")
                log(f"  training: {provider}: {reason}")
                rows.append({**row, "median_ms": None, "skipped": reason, "loss_rel_err": errors[provider]})
                continue
            timing = summarize(times[provider])
            rows.append({**row, **timing, "tokens_per_s": real_tokens / (timing["median_ms"] / 1e3),
                         "peak_mem_mb": peak_memory_bytes(steps[provider], device) / 2**20,
                         "padding_fraction": 1 - real_tokens / computed[provider],
                         "loss_rel_err": errors[provider]})
    return rows


def interleaved_times(steps: dict[str, Callable[[], float]], warmup: int, repeats: int, device
                      ) -> dict[str, list[float]]:
    """Run times (ms) of every provider's step, the providers alternating run by run: on a shared machine the
    load changes over seconds, and alternation gives every provider the same conditions."""
    for step in steps.values():
        measure(step, warmup=warmup, repeats=1, device=device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(measure(step, warmup=0, repeats=1, device=device)["median_ms"])
    return times


def _ratios(rows: list[dict]) -> str:
    fast = next(r for r in rows if r["provider"] == "fastadapter-packed")
    lines = []
    for row in rows:
        if row is fast or row.get("skipped"):
            continue
        lines.append(f"fastadapter-packed vs {row['provider']} ({row['padding_fraction']:.0%} padding): real tokens/s "
                     f"x{fast['tokens_per_s'] / row['tokens_per_s']:.2f}, peak memory "
                     f"x{fast['peak_mem_mb'] / row['peak_mem_mb']:.2f}, loss relative error {row['loss_rel_err']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="LLaMA-Adapter training step: fastadapter packed vs PEFT padded")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from .report import format_table
    rows = run(args.quick, args.device, full=args.full)
    print(format_table(rows))
    print(_ratios(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
