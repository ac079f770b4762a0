"""The GPU acceptance run: one command that checks and measures everything on one H100/H200 in minutes.

    pip install --no-build-isolation --no-deps -e . && python -m benchmarks.gpu_acceptance --out DIR
    python -m benchmarks.gpu_acceptance --smoke --out DIR     # the same code path on CPU, tiny shapes (< 1 min)

Needs only a preinstalled stack (PyTorch 2.11+, Triton 3.6+; transformers/peft not needed), no network, no
flash-attn or xformers. Stages, each with a time budget (seconds on one H200; the whole run ≈ 6 min, so that
with the editable install it stays within 8), each skipped with its reason when it errors or overruns, so one
failure never loses the others; progress is printed and flushed as it goes:

==================  ========  ======  ==========================================================================
stage               expected  budget  what
==================  ========  ======  ==========================================================================
``environment``          3 s    20 s  device, versions, git commit; the Triton path checked against the reference
``op_tests``            80 s   120 s  the triton cases of tests/ops/test_fused_backends.py, compiled on CUDA (tests/
                                      conftest.py picks CUDA tensors when CUDA exists), in up to 16 pytest
                                      shards at once (compiling is CPU-bound); pass/fail per case from JUnit
``op_bench``           100 s   120 s  forward and forward+backward at LLaMA-7B heads (bf16, D=128, P=10, Hq=32,
                                      Hkv 32 and 8, S 512/2048/8192 at 16K tokens per batch, and a packed batch
                                      of Alpaca-length sequences): fastadapter-triton, two SDPA calls (flash
                                      backend), eager v1, then flex_attention (two calls; one compile per shape,
                                      S = 2048 and packed first, as far as the budget goes): ms, TFLOP/s, % of
                                      the device's peak, peak memory
``decode_bench``        15 s    30 s  decode steps (Sq = 1, KV cache 2048/8192, batch 1/16): the split-KV decode
                                      kernels, the forward kernel, two SDPA calls, eager v1: ms, GB/s, % of HBM;
                                      then ragged steps (8 rows of cache lengths from 1/8 of the cache to all
                                      of it): one call over the padded cache with ``seqused_k``, one varlen call
                                      over the packed caches, and one call per row (what callers did before)
``trainer``             70 s    90 s  fastadapter's trainer on LLaMA-7B with random bf16 weights, packed Alpaca
                                      rows: tokens/s, MFU, peak memory, projected time of the paper's run
==================  ========  ======  ==========================================================================

Writes ``DIR/gpu-acceptance.json`` (everything), ``DIR/gpu-acceptance.md`` (a summary) and
``DIR/op-tests.log`` (the pytest output of the op test grid).

One module per stage (``environment``, ``op_tests``, ``op_bench``, ``decode_bench``, ``trainer``), what they share in
``common`` (stages, budgets, settings) and ``cases`` (shapes, and the implementations of
:mod:`benchmarks.op_providers` adapted to them), the run in ``run``, the markdown in ``summary``.
"""
from __future__ import annotations

from .common import (HARD_STOP_GRACE_S, JSON_NAME, MARKDOWN_NAME, STAGES, TEST_LOG_NAME, Deadline, Settings, Stage,
                     settings)
from .decode_bench import ragged_cache_lengths
from .op_tests import _junit_cases
from .run import main, run_stage
from .summary import markdown_summary

__all__ = ["HARD_STOP_GRACE_S", "JSON_NAME", "MARKDOWN_NAME", "STAGES", "TEST_LOG_NAME", "Deadline", "Settings",
           "Stage", "settings", "ragged_cache_lengths", "_junit_cases", "main", "run_stage", "markdown_summary"]
