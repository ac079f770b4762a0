"""Model-level benchmark: generation tokens/s of fastadapter's thin LLaMA vs Hugging Face + PEFT.

Both run the same randomly initialised LLaMA (a small shape; no weights are downloaded) with the same
LLaMA-Adapter: a Hugging Face ``LlamaForCausalLM`` is built, wrapped by PEFT's ``adaption_prompt`` (gates set
non-zero so the prompt matters), saved to a temporary folder, and loaded into the thin model with
``fastadapter.load_model`` and ``fastadapter.load_adapter`` — the path a user takes. Before timing, the greedy
tokens of the two are compared (``agree`` in the rows): a benchmark must not time a model that computes
something else.

Modes: ``prefill`` (the prompts only: one forward, first token) and ``generate`` (prefill then
``new_tokens − 1`` decoding steps with a KV cache). ``tokens_per_s`` counts prompt tokens for prefill and
generated tokens for generate, over the whole batch. The thin model runs once per available fused/composed
backend (``FASTADAPTER_BACKEND``).

Ragged batches (config label ``…-ragged8``): 8 prompts of mixed lengths (from the preset's ``prompt_tokens`` down
to an eighth of it, odd lengths included), side by side in one run:

* ``hf-peft-left-padded``: Hugging Face + PEFT ``generate()`` on the left-padded batch (the baseline);
* ``fastadapter-<backend>-per-length``: the thin model's previous cache attention, kept here as the reference
  of the comparison (:func:`per_length_attention`): the prefill stored each prompt's keys row by row and every
  decoding step made one op call per group of rows of equal length (8 calls per layer here);
* ``fastadapter-<backend>``: the ragged path, one op call per layer per step over the padded cache
  (``seqused_k``);
* ``fastadapter-auto-F.linear`` (CPU): the ragged path with every linear layer on ``F.linear`` instead of the
  ``decode_linear`` kernel (:mod:`fastadapter.decode_linear`), to show what that kernel adds to a decoding step.

Modes ``prefill`` (as above) and ``per_token``: the time of one decoding step of the whole batch,
``(t(generate new_tokens) − t(prefill)) / (new_tokens − 1)`` from the medians (p20/p80 likewise), with
``tokens_per_s`` = batch / that time. ``agree`` is the fraction of greedy tokens equal to the ragged path's. The
providers' runs alternate (one run of each in turn), so that a shared machine's changing load reaches all alike.

    python -m benchmarks.bench_generation --quick
    python -m benchmarks.bench_generation --ragged-only --out bench-results/generation-ragged.json
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .bench_training import interleaved_times
from .timing import measure, per_step_summary, summarize


@dataclass(frozen=True)
class GenerationConfig:
    """The model and workload: a LLaMA of ``n_layers`` × ``dim`` (MHA, SwiGLU ``hidden_dim``), every layer
    adapted with a ``prompt_len`` prompt; ``batch`` prompts of ``prompt_tokens`` tokens, ``new_tokens`` each."""

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    vocab_size: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    prompt_len: int = 10

    @property
    def label(self) -> str:
        return (f"B{self.batch}-prompt{self.prompt_tokens}-new{self.new_tokens}-dim{self.dim}-L{self.n_layers}"
                f"-H{self.n_heads}-P{self.prompt_len}")


#: Modules this suite needs beyond torch (the runner skips it, with the reason, when one does not import).
REQUIRES = ("transformers", "peft")


def config_for(preset: str) -> GenerationConfig:
    """Small LLaMA shapes (LLaMA's 32000-token vocabulary, head_dim 64) sized for this preset.

    ``full`` keeps the default model and doubles the batch, the prompt and the generated tokens: ~3× the default
    suite's ~20 s on a 2-core CPU, so about a minute (dim 1024 at that workload, ~16× the default, would take
    ~5 minutes of ``--full``'s 30-minute budget).
    """
    if preset == "smoke":
        return GenerationConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=176, vocab_size=32000, batch=1,
                                prompt_tokens=8, new_tokens=2)
    if preset == "quick":
        return GenerationConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=704, vocab_size=32000, batch=2,
                                prompt_tokens=32, new_tokens=8)
    if preset == "default":
        return GenerationConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1408, vocab_size=32000, batch=4,
                                prompt_tokens=128, new_tokens=32)
    if preset == "full":
        return GenerationConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1408, vocab_size=32000, batch=8,
                                prompt_tokens=256, new_tokens=64)
    raise ValueError(f"unknown preset {preset!r}; expected 'smoke', 'quick', 'default' or 'full'")


def build_models(config: GenerationConfig, device, folder: str, dtype: torch.dtype = torch.float32):
    """``(peft_model, thin_model)``: the same random LLaMA and adapter in Hugging Face + PEFT and in fastadapter,
    base weights in ``dtype`` (the thin model keeps its adapter in fp32, as it always does)."""
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    import fastadapter

    hf_config = LlamaConfig(hidden_size=config.dim, intermediate_size=config.hidden_dim,
                            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                            num_key_value_heads=config.n_heads, vocab_size=config.vocab_size,
                            max_position_embeddings=max(512, config.prompt_tokens + config.new_tokens))
    torch.manual_seed(0)
    base = LlamaForCausalLM(hf_config).eval()
    hf_logging.disable_progress_bar()  # a temporary folder's "Writing model shards" bar is noise in the table
    try:
        base.save_pretrained(os.path.join(folder, "base"))  # before PEFT wraps the attention modules
    finally:
        hf_logging.enable_progress_bar()
    peft_model = get_peft_model(base, AdaptionPromptConfig(adapter_len=config.prompt_len,
                                                           adapter_layers=config.n_layers, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if name.endswith("adaption_gate"):  # zero-initialised: the prompt would not change the output
                parameter.uniform_(0.3, 0.9)
    peft_model.save_pretrained(os.path.join(folder, "adapter"))
    thin = fastadapter.load_model(os.path.join(folder, "base"), dtype=dtype)
    fastadapter.load_adapter(thin, os.path.join(folder, "adapter"))
    return peft_model.to(device=device, dtype=dtype).eval(), thin.to(device).eval()


@contextlib.contextmanager
def _backend(name: str):
    """Run the thin model's attention on backend ``name`` (the dispatch reads ``FASTADAPTER_BACKEND``)."""
    previous = os.environ.get("FASTADAPTER_BACKEND")
    os.environ["FASTADAPTER_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FASTADAPTER_BACKEND"]
        else:
            os.environ["FASTADAPTER_BACKEND"] = previous


def thin_backends(device) -> list[str]:
    """The backends the thin model is benchmarked on: the fused kernel of this device (when built) and sdpa."""
    from fastadapter.backends import get_backend
    fused = "triton" if torch.device(device).type == "cuda" else "cpu"
    names = []
    for name in (fused, "sdpa"):
        try:
            if get_backend(name).unavailable_reason() is None:
                names.append(name)
        except ValueError:  # not built here
            pass
    return names


def run(quick: bool, device: str, *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="generation"``, provider ``hf-peft`` (first: the baseline) and ``fastadapter-<backend>``,
    modes ``prefill`` and ``generate``, with ``tokens_per_s`` and ``agree`` (fraction of greedy tokens equal to
    Hugging Face's)."""
    preset = preset or ("quick" if quick else "full" if full else "default")
    warmup, repeats = {"smoke": (0, 1), "quick": (1, 2)}.get(preset, (1, 3))
    config = config_for(preset)
    # The main job (default preset) times the user's paths only; --full adds every backend forced by name.
    return (run_config(config, device, warmup=warmup, repeats=repeats, log=log)
            + run_ragged_config(config, device, warmup=warmup, repeats=repeats, log=log,
                                every_backend=preset != "default"))


def run_config(config: GenerationConfig, device: str, *, warmup: int = 1, repeats: int = 3,
               log: Callable[[str], None] = print) -> list[dict]:
    """The rows of :func:`run` for one model and workload."""
    from fastadapter import generate

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, config.vocab_size, (config.batch, config.prompt_tokens), generator=generator)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices, once per generate call
        # bf16 on a GPU, as models are served there; fp32 on CPU, where bf16 matmuls are not every CPU's forte.
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        peft_model, thin = build_models(config, device, folder, dtype)
        input_ids = prompts.to(device)

        @torch.no_grad()
        def hf_generate(new_tokens: int) -> torch.Tensor:
            out = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=0)
            return out[:, config.prompt_tokens:]

        def thin_generate(new_tokens: int) -> list[list[int]]:
            return generate(thin, prompts.tolist(), max_new_tokens=new_tokens)

        log(f"  generation: {config.label} hf-peft")
        expected = hf_generate(config.new_tokens).tolist()
        runners = [("hf-peft", hf_generate, None)] + [(f"fastadapter-{b}", thin_generate, b)
                                                      for b in thin_backends(device)]
        rows = []
        for provider, runner, backend in runners:
            with _backend(backend) if backend else contextlib.nullcontext():
                if backend:
                    log(f"  generation: {config.label} {provider}")
                produced = [list(r) for r in (runner(config.new_tokens) if backend else expected)]
                agree = sum(a == b for got, want in zip(produced, expected) for a, b in zip(got, want))
                agree /= config.batch * config.new_tokens
                for mode, new_tokens, tokens in (("prefill", 1, config.batch * config.prompt_tokens),
                                                 ("generate", config.new_tokens, config.batch * config.new_tokens)):
                    timing = measure(lambda: runner(new_tokens), warmup=warmup, repeats=repeats, device=device)
                    rows.append({"suite": "generation", "provider": provider, "mode": mode, "config": config.label,
                                 **timing, "tokens_per_s": tokens / (timing["median_ms"] / 1e3), "agree": agree,
                                 "dtype": str(dtype).replace("torch.", ""), "batch": config.batch,
                                 "prompt_tokens": config.prompt_tokens,
                                 "new_tokens": config.new_tokens})
    return rows


#: Lengths of the ragged batch's 8 prompts, as fractions of the preset's prompt_tokens (all distinct).
RAGGED_FRACTIONS = (1.0, 0.23, 0.61, 0.37, 0.89, 0.125, 0.74, 0.5)


def ragged_lengths(prompt_tokens: int) -> list[int]:
    """The 8 prompt lengths of the ragged workload for a preset of ``prompt_tokens`` (distinct when
    ``prompt_tokens >= 8``)."""
    return [max(1, round(prompt_tokens * f)) for f in RAGGED_FRACTIONS]


def per_length_attention(self, x, cos, sin, *, cu_seqlens=None, max_seqlen=None, cache=None, cache_step=None,
                         prompt_offset=None):
    """The thin model's ``Attention.forward`` before ragged batches, kept only as this benchmark's reference: the
    packed prefill stores each sequence's keys and values row by row, and a step with a cache groups the rows by
    length and makes one op call per group (the causal mask bottom-right aligned within each group)."""
    from fastadapter import zero_init_attention, zero_init_attention_varlen
    from fastadapter.model.rope import apply_rope

    batch, seqlen, _ = x.shape
    q = apply_rope(self.wq(x).view(batch, seqlen, self.n_heads, self.head_dim), cos, sin)
    k = apply_rope(self.wk(x).view(batch, seqlen, self.n_kv_heads, self.head_dim), cos, sin)
    v = self.wv(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
    if prompt_offset is not None:
        raise ValueError("the per-length reference runs the text-only benchmark: no per-sequence prompt offsets")
    prefix_k, prefix_v, gate, activation = self._prefix_and_gate(x, cache)

    def attend(q_, k_, v_, **varlen):
        return zero_init_attention(q_, k_, v_, prefix_k, prefix_v, gate, causal=True, gate_activation=activation,
                                   **varlen)

    if cu_seqlens is not None:
        out = zero_init_attention_varlen(q[0], k[0], v[0], prefix_k, prefix_v, gate, cu_seqlens, cu_seqlens,
                                         max_seqlen, max_seqlen, causal=True, gate_activation=activation)[None]
        if cache is not None:
            bounds = cu_seqlens.tolist()
            for row in range(len(bounds) - 1):
                lo, hi = bounds[row], bounds[row + 1]
                cache.keys[self.layer_index][row, :hi - lo] = k[0, lo:hi]
                cache.values[self.layer_index][row, :hi - lo] = v[0, lo:hi]
    elif cache is not None:
        keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
        by_length: dict[int, list[int]] = {}
        for row, length in enumerate(cache.lengths):
            keys[row, length:length + seqlen] = k[row]
            values[row, length:length + seqlen] = v[row]
            by_length.setdefault(length, []).append(row)
        out = q.new_empty(q.shape)
        for length, rows in by_length.items():
            index = torch.tensor(rows, device=q.device)
            end = length + seqlen
            out[index] = attend(q[index], keys[index, :end], values[index, :end])
    else:
        out = attend(q, k, v)
    return self.wo(out.reshape(batch, seqlen, self.n_heads * self.head_dim))


@contextlib.contextmanager
def _per_length_path():
    """Run the thin model's attention through :func:`per_length_attention` inside the block."""
    from fastadapter.model.llama import Attention
    ragged = Attention.forward
    Attention.forward = per_length_attention
    try:
        yield
    finally:
        Attention.forward = ragged


@contextlib.contextmanager
def _linears_on_torch():
    """Run the thin model's linear layers on ``F.linear`` inside the block (no ``decode_linear`` kernel)."""
    import fastadapter.decode_linear as decode_linear_module
    enabled = decode_linear_module.ENABLED
    decode_linear_module.ENABLED = False
    try:
        yield
    finally:
        decode_linear_module.ENABLED = enabled


def run_ragged_config(config: GenerationConfig, device: str, *, warmup: int = 1, repeats: int = 3,
                      log: Callable[[str], None] = print, every_backend: bool = True) -> list[dict]:
    """Rows of the ragged workload (module docstring): 8 prompts of :func:`ragged_lengths`, prefill and per-token
    times of HF + PEFT on the left-padded batch, the previous per-length path and the ragged path. With
    ``every_backend`` False only the automatic backend choice runs (what a user gets), not each backend by name."""
    from fastadapter import generate

    lengths = ragged_lengths(config.prompt_tokens)
    batch = len(lengths)
    new_tokens = max(config.new_tokens, 2)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    label = f"{config.label}-ragged{batch}"
    rows = []
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        peft_model, thin = build_models(config, device, folder, dtype)
        longest = max(lengths)
        input_ids = torch.zeros(batch, longest, dtype=torch.long)
        attention_mask = torch.zeros(batch, longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding, as batched HF generation needs
            input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

        @torch.no_grad()
        def hf_generate(n: int) -> list[list[int]]:
            out = peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
            return out[:, longest:].tolist()

        def thin_generate(n: int) -> list[list[int]]:
            return generate(thin, prompts, max_new_tokens=n)

        runners = [("hf-peft-left-padded", hf_generate, "", contextlib.nullcontext)]
        # "auto": the backend choice a user gets (per call: the fused kernel where it runs the inputs, else sdpa).
        for backend in ["auto"] + (thin_backends(device) if every_backend else []):
            runners += [(f"fastadapter-{backend}-per-length", thin_generate, backend, _per_length_path),
                        (f"fastadapter-{backend}", thin_generate, backend, contextlib.nullcontext)]
        if torch.device(device).type == "cpu":
            # The user's choice again with every linear on F.linear: what the decode_linear kernel adds.
            runners.append(("fastadapter-auto-F.linear", thin_generate, "auto", _linears_on_torch))
        expected = thin_generate(new_tokens)

        def in_context(runner, backend, path, n):
            def call():
                chosen = _backend(backend) if backend not in ("", "auto") else contextlib.nullcontext()
                with chosen, path():
                    return runner(n)
            return call

        agreement, skipped, steps = {}, {}, {}
        for provider, runner, backend, path in runners:
            log(f"  generation: {label} {provider}")
            try:
                produced = in_context(runner, backend, path, new_tokens)()
            except ValueError as exc:  # a forced backend that cannot run ragged inputs (yet)
                if "cannot run these inputs" not in str(exc):
                    raise
                skipped[provider] = str(exc)
                continue
            agree = sum(a == b for got, want in zip(produced, expected) for a, b in zip(got, want))
            agreement[provider] = agree / (batch * new_tokens)
            steps[f"{provider}|prefill"] = in_context(runner, backend, path, 1)
            steps[f"{provider}|whole"] = in_context(runner, backend, path, new_tokens)
        # The providers alternate run by run: on a shared machine the load changes over seconds.
        times = interleaved_times(steps, warmup, repeats, device)
        timings = {}
        for provider, agree in agreement.items():
            prefill = summarize(times[f"{provider}|prefill"])
            per_token = per_step_summary(times[f"{provider}|prefill"], times[f"{provider}|whole"], new_tokens - 1)
            timings[provider] = (prefill, per_token, agree)
        for provider, reason in skipped.items():
            rows += [{"suite": "generation", "provider": provider, "mode": mode, "config": label, "median_ms": None,
                      "skipped": reason} for mode in ("prefill", "per_token")]
        for provider, (prefill, per_token, agree) in timings.items():
            reference = timings.get(provider + "-per-length")
            for mode, timing, tokens, index in (("prefill", prefill, sum(lengths), 0),
                                                ("per_token", per_token, batch, 1)):
                row = {"suite": "generation", "provider": provider, "mode": mode, "config": label, **timing,
                       "tokens_per_s": tokens / (timing["median_ms"] / 1e3), "agree": agree,
                       "dtype": str(dtype).replace("torch.", ""), "batch": batch, "prompt_lengths": lengths,
                       "new_tokens": new_tokens}
                if reference is not None:
                    row["speedup_vs_per_length"] = reference[index]["median_ms"] / timing["median_ms"]
                torch_linears = timings.get(provider + "-F.linear")
                if torch_linears is not None:
                    row["speedup_vs_torch_linears"] = torch_linears[index]["median_ms"] / timing["median_ms"]
                rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="generation tokens/s, thin model vs HF + PEFT")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--ragged-only", action="store_true",
                        help="only the ragged workload (8 prompts of mixed lengths)")
    parser.add_argument("--out", help="also write the rows, with the machine's metadata, to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from .report import format_table, write_json
    preset = "quick" if args.quick else "full" if args.full else "default"
    if args.ragged_only:
        warmup, repeats = {"quick": (1, 2)}.get(preset, (1, 3))
        rows = run_ragged_config(config_for(preset), args.device, warmup=warmup, repeats=repeats)
    else:
        rows = run(args.quick, args.device, full=args.full)
    print(format_table(rows))
    for row in rows:
        if "speedup_vs_per_length" in row:
            print(f"{row['config']} {row['mode']:9s} {row['provider']}: {row['speedup_vs_per_length']:.2f}x the "
                  f"per-length path")
        if "speedup_vs_torch_linears" in row:
            print(f"{row['config']} {row['mode']:9s} {row['provider']}: {row['speedup_vs_torch_linears']:.2f}x the same "
                  f"path with its linears on F.linear")
    if args.out:
        from .metadata import collect_metadata
        write_json(args.out, collect_metadata(args.device, preset, argv), rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
