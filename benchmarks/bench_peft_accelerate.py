"""PEFT ``adaption_prompt`` before and after ``fastadapter.integrations.peft.accelerate``: one training step.

The same randomly initialised LLaMA (no weights downloaded; LLaMA's 32000-token vocabulary, head_dim 64) wrapped
by PEFT's ``adaption_prompt`` on every layer, gates set non-zero. One model object is timed twice: as PEFT runs
it (``peft``), then after ``accelerate`` (``peft+fastadapter``), which swaps the forward of its
``AdaptedAttention`` layers and nothing else. Before timing, the loss and the adapter gradients of the two are
compared (``max_grad_rel_err`` in the rows): a benchmark must not time something that computes otherwise.

Modes:

* ``train_step``: forward with labels, backward, AdamW step on the adapter parameters, ``zero_grad``;
* ``forward``: inference forward (``torch.no_grad``).

* ``prefill`` and ``decode_per_token``: ``generate()`` (greedy, KV cache) on a left-padded batch of 8 prompts of
  mixed lengths (1/4 to all of ``seqlen``, capped at 256): the prefill is one ``generate(max_new_tokens=1)``, the
  per-token time ``(generate(N) - prefill) / (N - 1)`` for the whole batch. Before timing, both providers must
  generate the same tokens. ``attention_share`` is the fraction of that time spent inside the decoder layers'
  attention modules (hooks around them, separate runs), and the ``peft`` rows' ``attention_free_bound``
  ``1 / (1 - share)`` is the most that replacing the attention alone can gain over PEFT (Amdahl's law: the
  embeddings, MLPs, output head and ``generate``'s own work stay Hugging Face's).

Batches of the training step: ``dense`` (no padding: the fused causal path) and ``padded`` (right padding: one
ragged call over the real tokens and one over the padding queries per layer, see
``fastadapter/integrations/_attention_mask.py``). The rows say which fastadapter backend ran (``backend``).

    python -m benchmarks.bench_peft_accelerate --quick --output benchmarks/results/peft-accelerate-quick.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .memory import peak_memory_bytes
from .timing import measure, per_step_summary, summarize


@dataclass(frozen=True)
class StepConfig:
    """A LLaMA of ``n_layers`` × ``dim`` (``n_heads`` query heads over ``n_kv_heads``), every layer adapted with
    a ``prompt_len`` prompt; a batch of ``batch`` sequences of ``seqlen`` tokens."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    batch: int
    seqlen: int
    vocab_size: int = 32000
    prompt_len: int = 10

    @property
    def label(self) -> str:
        return (f"B{self.batch}-S{self.seqlen}-dim{self.dim}-L{self.n_layers}-H{self.n_heads}/{self.n_kv_heads}"
                f"-P{self.prompt_len}")


#: Modules this suite needs beyond torch (the runner skips it, with the reason, when one does not import).
REQUIRES = ("transformers", "peft", "fastadapter.integrations.peft")


def config_for(preset: str) -> StepConfig:
    """LLaMA shapes (head_dim 64, 32000-token vocabulary) that take at most seconds per step on a CPU.

    Sequences are long for the width (512 to 1024 tokens; the original recipe pads to 512) so that the decoder
    layers, where the attention changes, take a fair share of the step: in LLaMA-7B the 32000-way output
    projection is ~2% of the FLOPs, here it is ~2/3 of them in ``quick`` (dim 256) and ~1/3 in ``default``
    (dim 512), which bounds the speed-up a change of attention can show at these sizes.

    ``full`` widens the model to dim 1024 (~1/4 of the FLOPs in the output projection) at the same batch and
    sequence: ~3.2× the FLOPs of ``default``, whose suite takes ~70 s on a 2-core CPU, so ~4 minutes. (At batch 4,
    ~13× the default, it would take ~15 minutes and push ``--full`` past its 30-minute budget.)
    """
    if preset == "smoke":
        return StepConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=176, batch=1, seqlen=64)
    if preset == "quick":
        return StepConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=704, batch=1, seqlen=128)
    if preset == "default":
        return StepConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1408, batch=1, seqlen=1024)
    if preset == "full":
        return StepConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=16, hidden_dim=2816, batch=1, seqlen=1024)
    raise ValueError(f"unknown preset {preset!r}; expected 'smoke', 'quick', 'default' or 'full'")


def build_peft_model(config: StepConfig, device):
    """PEFT's adaption_prompt model on a random ``LlamaForCausalLM`` of ``config``, gates in [0.3, 0.9]."""
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(hidden_size=config.dim, intermediate_size=config.hidden_dim,
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_kv_heads, vocab_size=config.vocab_size,
                            max_position_embeddings=max(2048, config.seqlen), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(hf_config), AdaptionPromptConfig(
        adapter_len=config.prompt_len, adapter_layers=config.n_layers, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("adaption_gate"):  # zero-initialised: the prompt would not change the output
                parameter.uniform_(0.3, 0.9)
    return model.to(device).train()


def make_batch(config: StepConfig, padded: bool, device) -> dict:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, S]``; padded: rows of 1/2..1 of S, right-padded."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, config.vocab_size, (config.batch, config.seqlen), generator=generator)
    mask = torch.ones_like(tokens)
    if padded:
        lengths = torch.linspace(config.seqlen // 2, config.seqlen, config.batch).long()
        mask = (torch.arange(config.seqlen)[None] < lengths[:, None]).long()
    labels = tokens.masked_fill(mask == 0, -100)
    return {"input_ids": tokens.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _adapter_gradients(model, batch: dict) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def _providers():
    from fastadapter.integrations.peft import accelerate, restore
    return {"peft": restore, "peft+fastadapter": accelerate}


def interleaved_times(fn: Callable[[], object], model, warmup: int, repeats: int, device
                      ) -> dict[str, tuple[list[float], list[float]]]:
    """``{provider: (wall ms, process CPU ms)}`` of the runs of ``fn``, the providers alternating run by run.

    On a shared machine the load changes over seconds: alternation gives both providers the same conditions.
    The CPU time of this process (all its threads) is kept too: unlike wall time it does not count the time
    other processes held the cores, so it stays comparable when the machine is busy.
    """
    providers = _providers()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in providers}
    for name, switch in providers.items():
        switch(model)
        measure(fn, warmup=warmup, repeats=1, device=device)  # warm-up runs, then one run thrown away
    for _ in range(repeats):
        for name, switch in providers.items():
            switch(model)
            cpu_start = time.process_time()
            wall_ms = measure(fn, warmup=0, repeats=1, device=device)["median_ms"]
            times[name][0].append(wall_ms)
            times[name][1].append(1e3 * (time.process_time() - cpu_start))
    return times


def run(quick: bool, device: str, *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="peft_accelerate"``, providers ``peft`` (the baseline) and ``peft+fastadapter``, modes
    ``train_step`` and ``forward``, batches ``dense`` and ``padded`` (in ``config``), with ``tokens_per_s``,
    ``cpu_median_ms`` (process CPU time), ``peak_mem_mb`` (train step) and ``max_grad_rel_err`` (accelerated
    against PEFT); then the ``prefill`` and ``decode_per_token`` rows of :func:`run_generation`."""
    preset = preset or ("quick" if quick else "full" if full else "default")
    warmup, repeats = {"smoke": (0, 1), "quick": (0, 2)}.get(preset, (2, 5))
    config = config_for(preset)
    rows = run_config(config, device, warmup=warmup, repeats=repeats, log=log)
    # The per-token time is (generate(N) - prefill) / (N - 1), a difference of two timings: the more tokens, the
    # less the prefill's noise weighs in it (--full, where the suite runs by default, generates 48).
    new_tokens = {"smoke": 3, "quick": 8, "default": 16}.get(preset, 48)
    return rows + run_generation(config, device, new_tokens=new_tokens, warmup=warmup, repeats=repeats, log=log)


def _backends_used(fn: Callable[[], object]) -> str:
    """The fastadapter backends the op chose while ``fn()`` ran (``"-"`` when it never ran)."""
    import fastadapter.attention as attention
    chosen = set()
    real = attention.select_backend

    def recording(*args, **kwargs):
        backend = real(*args, **kwargs)
        chosen.add(backend.name)
        return backend

    attention.select_backend = recording
    try:
        fn()
    finally:
        attention.select_backend = real
    return ",".join(sorted(chosen)) or "-"


def left_padded_prompts(config: StepConfig, device, batch: int = 8) -> dict:
    """``input_ids``, ``attention_mask`` ``[batch, S]`` of ``batch`` prompts of lengths S/4 .. S (S = ``seqlen``
    capped at 256), left-padded as ``generate()`` wants them."""
    longest = min(config.seqlen, 256)
    lengths = torch.linspace(max(longest // 4, 1), longest, batch).long()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, config.vocab_size, (batch, longest), generator=generator)
    mask = (torch.arange(longest)[None] >= (longest - lengths)[:, None]).long()
    return {"input_ids": tokens.masked_fill(mask == 0, 0).to(device), "attention_mask": mask.to(device)}


def attention_seconds(model, fn: Callable[[], object], device) -> tuple[float, float]:
    """``(seconds inside the decoder layers' attention modules, seconds of the whole call)`` of one ``fn()``.

    The attention module of a PEFT-adapted layer is PEFT's ``AdaptedAttention`` (the base attention, then the
    prompt's); after ``accelerate`` it is the fused forward. What lies outside (embeddings, norms, MLPs, the output
    head, generate's own work) is the same for both providers, so ``1 / (1 - share)`` of PEFT's time bounds the
    speed-up that any change of the attention alone can reach (Amdahl's law)."""
    layers = model.get_base_model().model.layers
    spent = [0.0]
    starts: dict[int, float] = {}

    def before(module, args, kwargs):
        _synchronize(device)
        starts[id(module)] = time.perf_counter()

    def after(module, args, kwargs, output):
        _synchronize(device)
        spent[0] += time.perf_counter() - starts.pop(id(module))

    handles = [h for layer in layers for h in (
        layer.self_attn.register_forward_pre_hook(before, with_kwargs=True),
        layer.self_attn.register_forward_hook(after, with_kwargs=True))]
    try:
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return spent[0], total


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def attention_shares(model, generate: Callable[[int], object], new_tokens: int, device, repeats: int = 3
                     ) -> tuple[float, float]:
    """``(prefill share, per-token share)`` of the time spent in the attention modules (:func:`attention_seconds`),
    medians of ``repeats`` paired prefill / whole-generation runs."""
    prefill, per_token = [], []
    for _ in range(max(1, repeats)):
        a1, t1 = attention_seconds(model, lambda: generate(1), device)
        an, tn = attention_seconds(model, lambda: generate(new_tokens), device)
        prefill.append(a1 / t1)
        per_token.append(max(an - a1, 0.0) / max(tn - t1, 1e-9))
    return statistics.median(prefill), statistics.median(per_token)


def run_generation(config: StepConfig, device: str, *, new_tokens: int = 16, warmup: int = 2, repeats: int = 5,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Rows of ``generate()`` on :func:`left_padded_prompts`: modes ``prefill`` (``tokens_per_s`` over the prompt
    tokens) and ``decode_per_token`` (ms per generated token of the whole batch), providers as :func:`run_config`,
    after checking that both generate the same tokens."""
    providers = _providers()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_peft_model(config, device).eval()
        prompts = left_padded_prompts(config, device)
        settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

        @torch.no_grad()
        def generate(n: int):
            return model.generate(**prompts, max_new_tokens=n, min_new_tokens=n, **settings)

        outputs = {}
        for name, switch in providers.items():
            switch(model)
            outputs[name] = generate(new_tokens)
        if not torch.equal(outputs["peft"], outputs["peft+fastadapter"]):
            raise AssertionError("peft and peft+fastadapter generated different tokens: not timed")
        providers["peft+fastadapter"](model)
        backend = _backends_used(lambda: generate(2))
        label = f"{config.label}-gen8x{prompts['input_ids'].shape[1]}+{new_tokens}"
        log(f"  peft_accelerate: {label}: same tokens from both; fastadapter backend {backend}")
        prefill = interleaved_times(lambda: generate(1), model, warmup, repeats, device)
        whole = interleaved_times(lambda: generate(new_tokens), model, warmup, repeats, device)
        shares = {}
        for name, switch in providers.items():
            switch(model)
            shares[name] = attention_shares(model, generate, new_tokens, device, repeats=min(repeats, 3))
        prompt_tokens = int(prompts["attention_mask"].sum())
        for provider in providers:
            first = summarize(prefill[provider][0])
            per_token = per_step_summary(prefill[provider][0], whole[provider][0], new_tokens - 1)
            common = {"suite": "peft_accelerate", "provider": provider, "config": label,
                      "backend": backend if provider != "peft" else "-"}
            # What an attention that took no time at all would give over PEFT (the peft rows' attention share).
            bound = {"attention_free_bound": 1 / (1 - shares[provider][0])} if provider == "peft" else {}
            rows.append({**common, "mode": "prefill", **first, "attention_share": shares[provider][0], **bound,
                         "cpu_median_ms": statistics.median(prefill[provider][1]),
                         "tokens_per_s": prompt_tokens / (first["median_ms"] / 1e3)})
            cpu_per_token = (statistics.median(whole[provider][1]) - statistics.median(prefill[provider][1])) / max(
                new_tokens - 1, 1)
            bound = {"attention_free_bound": 1 / (1 - shares[provider][1])} if provider == "peft" else {}
            rows.append({**common, "mode": "decode_per_token", **per_token, "cpu_median_ms": cpu_per_token,
                         "attention_share": shares[provider][1], **bound,
                         "tokens_per_s": prompts["input_ids"].shape[0] / (per_token["median_ms"] / 1e3)})
        providers["peft"](model)
    return rows


def run_config(config: StepConfig, device: str, *, warmup: int = 2, repeats: int = 5,
               log: Callable[[str], None] = print, batches: tuple[str, ...] = ("dense", "padded"),
               modes: tuple[str, ...] = ("train_step", "forward")) -> list[dict]:
    """The rows of :func:`run` for one model and batch shape (``batches`` and ``modes``: a subset of them)."""
    providers = _providers()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices, once per call
        model = build_peft_model(config, device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for batch_kind in batches:
            batch = make_batch(config, batch_kind == "padded", device)
            tokens = int(batch["attention_mask"].sum())

            def train_step():
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            @torch.no_grad()
            def forward():
                model(**batch)

            providers["peft"](model)
            loss_ref, grads_ref = _adapter_gradients(model, batch)
            providers["peft+fastadapter"](model)
            loss_acc, grads_acc = _adapter_gradients(model, batch)
            err = max(float((grads_acc[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in grads_ref.items())
            log(f"  peft_accelerate: {config.label} {batch_kind}: loss {loss_ref:.6f} vs {loss_acc:.6f}, "
                f"max relative gradient error {err:.2e}")
            label = f"{config.label}-{batch_kind}"
            backend = _backends_used(forward)
            for mode, fn in ((m, {"train_step": train_step, "forward": forward}[m]) for m in modes):
                log(f"  peft_accelerate: {label} {mode}")
                times = interleaved_times(fn, model, warmup, repeats, device)
                for provider, (wall_ms, cpu_ms) in times.items():
                    timing = summarize(wall_ms)
                    row = {"suite": "peft_accelerate", "provider": provider, "mode": mode, "config": label,
                           "backend": backend if provider != "peft" else "-",
                           **timing, "cpu_median_ms": statistics.median(cpu_ms),
                           "tokens_per_s": tokens / (timing["median_ms"] / 1e3),
                           "max_grad_rel_err": err, "loss": loss_acc if provider != "peft" else loss_ref}
                    if mode == "train_step":
                        providers[provider](model)
                        row["peak_mem_mb"] = peak_memory_bytes(fn, device) / 2**20
                    rows.append(row)
        providers["peft"](model)
    return rows


def _speedups(rows: list[dict]) -> str:
    """One line per (config, mode): PEFT's median wall and CPU times over the accelerated one's, and the same
    ratio of the minima (the least disturbed runs: when the medians differ and the minima agree, the difference is
    the machine's load, not the code)."""
    lines = []
    by_key = {(r["config"], r["mode"], r["provider"]): r for r in rows}
    for (label, mode, provider), row in by_key.items():
        if provider == "peft" and (label, mode, "peft+fastadapter") in by_key:
            fast = by_key[(label, mode, "peft+fastadapter")]
            lines.append(f"{label} {mode}: wall peft {row['median_ms']:.1f} ms, peft+fastadapter "
                         f"{fast['median_ms']:.1f} ms (x{row['median_ms'] / fast['median_ms']:.2f}); CPU time "
                         f"peft {row['cpu_median_ms']:.1f} ms, peft+fastadapter {fast['cpu_median_ms']:.1f} ms "
                         f"(x{row['cpu_median_ms'] / fast['cpu_median_ms']:.2f}); min peft {row['min_ms']:.1f} ms, "
                         f"peft+fastadapter {fast['min_ms']:.1f} ms (x{row['min_ms'] / fast['min_ms']:.2f}) over "
                         f"{row['runs']} interleaved runs each"
                         + (f"; attention {row['attention_share']:.0%} of PEFT's time: at most "
                            f"x{row['attention_free_bound']:.2f} from the attention alone"
                            if "attention_free_bound" in row else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="PEFT adaption_prompt training step, before and after accelerate")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (one thread is steadier on a machine shared with others)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved timed runs per provider (default: the preset's); with --parts, to tell "
                             "a difference from the noise by its minimum and median")
    parser.add_argument("--parts", nargs="+", default=None, metavar="PART",
                        choices=("dense", "padded", "train_step", "forward", "generation"),
                        help="measure only these batches (dense, padded), modes (train_step, forward) and/or "
                             "the generation rows (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .report import format_table
    if args.repeats is None and args.parts is None:
        rows = run(args.quick, args.device, full=args.full)
    else:
        preset = "quick" if args.quick else "full" if args.full else "default"
        warmup, repeats = {"quick": (0, 2)}.get(preset, (2, 5))
        repeats = args.repeats or repeats
        parts = set(args.parts or ("dense", "padded", "train_step", "forward", "generation"))
        batches = tuple(b for b in ("dense", "padded") if b in parts) or ("dense", "padded")
        modes = tuple(m for m in ("train_step", "forward") if m in parts)
        config = config_for(preset)
        rows = run_config(config, args.device, warmup=warmup, repeats=repeats, batches=batches,
                          modes=modes) if modes else []
        if "generation" in parts:
            rows += run_generation(config, args.device, new_tokens={"quick": 8}.get(preset, 16), warmup=warmup,
                                   repeats=repeats)
    print(format_table(rows))
    print(_speedups(rows))
    if args.output:
        import pathlib
        from .metadata import collect_metadata
        from .report import write_json
        preset = "quick" if args.quick else "full" if args.full else "default"
        write_json(pathlib.Path(args.output), collect_metadata(args.device, preset, argv), rows)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
