"""Op-level benchmark: the frozen fp32 products of a training step and a prefill, ``F.linear`` (MKL) vs
:func:`fastadapter.onednn_linear.onednn_linear` (oneDNN), forward and the input's gradient.

Shapes: SmolLM2-135M's layer products (dim 576, kv dim 192, FFN 1536) and its 49152-way head, on the rows of a
packed training step (1024 tokens; the head on a 128-token chunk of the chunked cross-entropy). The providers run
the same tensors, interleaved run by run, after checking that they agree. ``forward``: ``x · Wᵀ``; ``grad_input``:
``grad · W`` (what the backward of a frozen weight computes). The figure says on which CPUs the oneDNN route pays
(:data:`fastadapter.onednn_linear.ENABLED`): MKL's sgemm takes a slow generic path on AMD CPUs, its own on Intel's.

    python -m benchmarks.bench_onednn_linear
    python -m benchmarks.bench_onednn_linear --quick --out bench-results/onednn-linear.json
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .bench_training import interleaved_times
from .timing import summarize

#: (name, rows, in features, out features) of SmolLM2-135M's products in a packed step of 1024 tokens.
SHAPES = [("wq/wo", 1024, 576, 576), ("wk/wv", 1024, 576, 192), ("w1/w3", 1024, 576, 1536),
          ("w2", 1024, 1536, 576), ("head-chunk", 128, 576, 49152)]


def shapes_for(preset: str) -> list[tuple[str, int, int, int]]:
    """``smoke``: one tiny product; ``quick``: SmolLM2's two attention products; else all of :data:`SHAPES`."""
    return {"smoke": [("tiny", 64, 64, 97)], "quick": SHAPES[:2]}.get(preset, SHAPES)


def run(quick: bool = False, device: str = "cpu", *, full: bool = False, preset: Optional[str] = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Rows ``suite="onednn_linear"``: providers ``F.linear`` (first, the baseline) and ``onednn_linear``, modes
    ``forward`` and ``grad_input``, with ``tflops`` and ``max_abs_err`` (against ``F.linear``)."""
    import fastadapter.onednn_linear as onednn_module

    preset = preset or ("quick" if quick else "full" if full else "default")
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu or not onednn_module.onednn_available():
        why = "this torch has no oneDNN" if on_cpu else f"a CPU route: nothing to time on {device}"
        return [{"suite": "onednn_linear", "provider": "onednn_linear", "mode": "forward", "config": "-",
                 "median_ms": None, "skipped": why}]
    warmup, repeats = {"smoke": (0, 1), "quick": (1, 5)}.get(preset, (3, 15))
    generator = torch.Generator().manual_seed(0)
    rows = []
    before, onednn_module.ENABLED = onednn_module.ENABLED, True  # the route itself, whatever this CPU's default
    try:
        for name, m, k, n in shapes_for(preset):
            x = torch.randn(m, k, generator=generator)
            grad = torch.randn(m, n, generator=generator)
            weight = torch.randn(n, k, generator=generator) / k ** 0.5
            label = f"{name}-M{m}-K{k}-N{n}"
            log(f"  onednn_linear: {label}")
            calls = {"forward": {"F.linear": lambda: F.linear(x, weight),
                                 "onednn_linear": lambda: onednn_module._product(x, weight, None)},
                     "grad_input": {"F.linear": lambda: grad @ weight,
                                    "onednn_linear": lambda: onednn_module.input_gradient(grad, weight)}}
            for mode, providers in calls.items():
                expected = providers["F.linear"]()
                error = float((providers["onednn_linear"]() - expected).abs().max())
                if error > 1e-3 * max(1.0, float(expected.abs().max())):
                    raise AssertionError(f"oneDNN differs from F.linear by {error:.3g} at {label} {mode}: not timed")
                times = interleaved_times(dict(providers), warmup, repeats, "cpu")
                for provider, values in times.items():
                    timing = summarize(values)
                    rows.append({"suite": "onednn_linear", "provider": provider, "mode": mode, "config": label,
                                 **timing, "tflops": 2.0 * m * k * n / (timing["median_ms"] / 1e3) / 1e12,
                                 "max_abs_err": error if provider == "onednn_linear" else 0.0})
    finally:
        onednn_module.ENABLED = before
    return rows


def main(argv=None) -> int:
    from .report import suite_main
    return suite_main(run, "frozen fp32 products: F.linear (MKL) vs oneDNN", "two shapes, fewer repeats", argv)


if __name__ == "__main__":
    raise SystemExit(main())
