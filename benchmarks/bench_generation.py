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

    python -m benchmarks.bench_generation --quick
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

from .timing import measure


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
    return run_config(config_for(preset), device, warmup=warmup, repeats=repeats, log=log)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="generation tokens/s, thin model vs HF + PEFT")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from .report import format_table
    print(format_table(run(args.quick, args.device, full=args.full)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
