"""Benchmark: the compiled row kernels of a training step (``csrc/training_rows.h``) against the eager compositions
they replace, op by op and in a whole training step.

Ops (forward + backward, SmolLM2-135M's widths on a packed step of 1024 tokens): RMSNorm ``[1024, 576]``, the
residual addition + RMSNorm, the gated activation ``[1024, 1536]``, and the head's chunked cross-entropy (1024
tokens against a 49152-way head, loss and gradient). Step: forward + backward of a model with SmolLM2-135M's shape
(30 layers, dim 576, 9 heads over 3, FFN 1536, vocabulary 49152; random weights), LLaMA-Adapter on the top 28
layers, one packed row of 1024 tokens in 4 sequences. Each pair runs the same tensors, interleaved run by run
(``fastadapter.model.row_kernels.ENABLED`` flipped between runs).

    python -m benchmarks.bench_row_kernels
    python -m benchmarks.bench_row_kernels --quick --out bench-results/row-kernels.json
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .bench_training import interleaved_times
from .timing import summarize

TOKENS, DIM, HIDDEN, VOCAB = 1024, 576, 1536, 49152


def _with_row_kernels(on: bool, call: Callable[[], object]) -> Callable[[], None]:
    from fastadapter.model import row_kernels

    def run():
        before, row_kernels.ENABLED = row_kernels.ENABLED, on
        try:
            call()
        finally:
            row_kernels.ENABLED = before
    return run


def _op_calls(tokens: int) -> dict[str, Callable[[], object]]:
    """Forward + backward of each op on fresh inputs of SmolLM2's widths."""
    from fastadapter.model.gated_activation import gated_activation
    from fastadapter.model.norms import RMSNorm, add_and_normalize
    from fastadapter.training.linear_cross_entropy import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(DIM, 1e-5).requires_grad_(False)
    x = torch.randn(1, tokens, DIM, generator=generator, requires_grad=True)
    residual = torch.randn(1, tokens, DIM, generator=generator, requires_grad=True)
    gate = torch.randn(1, tokens, HIDDEN, generator=generator, requires_grad=True)
    up = torch.randn(1, tokens, HIDDEN, generator=generator, requires_grad=True)
    head = torch.randn(VOCAB, DIM, generator=generator) / DIM ** 0.5
    hidden = torch.randn(tokens, DIM, generator=generator, requires_grad=True)
    labels = torch.randint(0, VOCAB, (tokens,), generator=generator)
    grad_dim, grad_hidden = torch.randn_like(x), torch.randn_like(gate)

    def backward(outputs, grads):
        torch.autograd.backward(outputs, grads)

    return {
        f"rms_norm-{tokens}x{DIM}": lambda: backward(norm(x), grad_dim),
        f"add_and_normalize-{tokens}x{DIM}": lambda: backward(add_and_normalize(x, residual, norm),
                                                              (grad_dim, grad_dim)),
        f"gated_activation-{tokens}x{HIDDEN}": lambda: backward(gated_activation(gate, up), grad_hidden),
        f"cross_entropy-{tokens}x{VOCAB}": lambda: linear_cross_entropy(hidden, head, labels).backward(),
    }


def _step_call(tokens: int, layers: int = 30) -> Callable[[], None]:
    """Forward + backward of a SmolLM2-shaped adapted model (``layers`` layers, the top ``layers - 2`` adapted) on
    one packed row of ``tokens`` tokens."""
    from fastadapter import AdapterConfig, LlamaConfig, LlamaModel, add_adapter
    from fastadapter.training.data import Example
    from fastadapter.training.loss import token_loss_sum
    from fastadapter.training.packing import collate_packed

    config = LlamaConfig(dim=DIM, n_layers=layers, n_heads=9, n_kv_heads=3, vocab_size=VOCAB, hidden_dim=HIDDEN,
                         max_seq_len=2048)
    model = LlamaModel(config)
    add_adapter(model, AdapterConfig(prompt_len=10, layers=layers - 2))
    for p in model.parameters():
        if p.requires_grad:  # open gates: the adapter takes part as after some training
            p.data.normal_(0, 0.02)
    generator = torch.Generator().manual_seed(1)
    length = tokens // 4
    examples = [Example(tokens=tuple(torch.randint(0, VOCAB, (length,), generator=generator).tolist()),
                        labels=tuple(torch.randint(0, VOCAB, (length,), generator=generator).tolist()))
                for _ in range(4)]
    batch = collate_packed(examples)

    def step():
        token_loss_sum(model, batch).backward()
        model.zero_grad(set_to_none=True)
    return step


def run(quick: bool = False, device: str = "cpu", *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="row_kernels"``, providers ``eager`` (first, the baseline) and ``row_kernels``, mode
    ``forward+backward``: one row per op and one for the whole step (``smoke``: 64 tokens, a 2-layer step;
    ``quick``: 256 tokens)."""
    from fastadapter.model.row_kernels import runs_row_kernels

    preset = preset or ("quick" if quick else "full" if full else "default")
    if torch.device(device).type != "cpu" or not runs_row_kernels(torch.zeros(1)):
        why = (f"CPU kernels: nothing to time on {device}" if torch.device(device).type != "cpu"
               else "the compiled row kernels are off or not built")
        return [{"suite": "row_kernels", "provider": "row_kernels", "mode": "forward+backward", "config": "-",
                 "median_ms": None, "skipped": why}]
    tokens = {"smoke": 64, "quick": 256}.get(preset, TOKENS)
    warmup, repeats = {"smoke": (0, 1), "quick": (1, 3)}.get(preset, (2, 9))
    calls = _op_calls(tokens)
    calls[f"smollm2-shape-step-{tokens}tok"] = _step_call(tokens, layers=2 if preset == "smoke" else 30)
    rows = []
    for config, call in calls.items():
        log(f"  row_kernels: {config}")
        times = interleaved_times({"eager": _with_row_kernels(False, call),
                                   "row_kernels": _with_row_kernels(True, call)},
                                  warmup, max(1, repeats // 3) if "step" in config else repeats, "cpu")
        for provider, values in times.items():
            rows.append({"suite": "row_kernels", "provider": provider, "mode": "forward+backward", "config": config,
                         **summarize(values)})
    return rows


def main(argv=None) -> int:
    from .report import suite_main
    return suite_main(run, "a training step's row kernels vs the eager compositions", "256 tokens, fewer repeats", argv)


if __name__ == "__main__":
    raise SystemExit(main())
