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
``op_tests``            80 s   120 s  the triton cases of tests/ops/test_fused_backends.py, compiled on CUDA
                                      (tests/conftest.py picks CUDA tensors when CUDA exists), in up to 16 pytest
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
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .flops import attention_flops, tflops_per_second
from .memory import peak_memory_bytes
from .metadata import collect_metadata
from .timing import measure

#: The op test grid (its triton cases), and the case of it ``--smoke`` runs.
OP_TEST_FILE = "tests/ops/test_fused_backends.py"
SMOKE_TEST_SELECTION = "test_matches_reference and triton and B2-Sq1-Sk1-"


def _repo_root() -> pathlib.Path:
    """The checkout holding the tests: the first folder above this file with :data:`OP_TEST_FILE` (this module
    may live in ``benchmarks/`` or be installed as ``fastadapter.benchmarks``), else the working directory."""
    for folder in pathlib.Path(__file__).resolve().parents:
        if (folder / OP_TEST_FILE).is_file():
            return folder
    return pathlib.Path.cwd()


REPO = _repo_root()
SHARED_DATA = pathlib.Path(os.environ.get("FASTADAPTER_SHARED_DATA", REPO.parent / "shared" / "data"))
ALPACA = "alpaca_en_demo.json"
TOKENIZER = "llama_tokenizer.model"
JSON_NAME, MARKDOWN_NAME, TEST_LOG_NAME = "gpu-acceptance.json", "gpu-acceptance.md", "op-tests.log"


@dataclass(frozen=True)
class Stage:
    """A stage: its expected and budgeted seconds on one H200, and its budget in ``--smoke`` mode (CPU)."""

    name: str
    expected_s: float
    budget_s: float
    smoke_budget_s: float


STAGES = (Stage("environment", 3, 20, 20), Stage("op_tests", 80, 120, 40), Stage("op_bench", 100, 120, 40),
          Stage("decode_bench", 15, 30, 20), Stage("trainer", 70, 90, 20))
#: Seconds past its budget after which a stage is interrupted (SIGALRM) rather than asked to stop.
HARD_STOP_GRACE_S = 20
#: The whole run's budget (the 8 minutes less ~1.5 min for the editable install).
TOTAL_BUDGET_S = 390

#: Dense bf16 tensor-core peak and HBM bandwidth by device name (H200 has H100's SMs and faster memory).
DEVICE_PEAKS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
                ("A100", 312e12, 2.0e12))

#: The paper's run: LLaMA-7B, Alpaca 52K (52,002 rows), 5 epochs, "1 hour on 8 A100" (padded to 512).
PAPER_ROWS, PAPER_EPOCHS, PAPER_GPUS, PAPER_HOURS = 52_002, 5, 8, 1.0


class NotRun(Exception):
    """A benchmark row that is not measured, for a reason (too large for this device)."""


class StageTimeout(Exception):
    """Raised by SIGALRM inside a stage that overran its budget by :data:`HARD_STOP_GRACE_S`."""


class Deadline:
    """The end of a stage's budget; long loops ask :meth:`left` before each measurement."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Settings:
    """Shapes and run lengths of one mode (GPU or smoke)."""

    smoke: bool
    device: str
    dtype: torch.dtype
    heads_q: int
    heads_kv: tuple[int, ...]
    head_dim: int
    prefix_len: int
    seqlens: tuple[int, ...]
    batch_tokens: int
    decode_cache: tuple[int, ...]
    decode_batches: tuple[int, ...]
    ragged_rows: int
    warmup: int
    repeats: int
    max_seconds: float
    test_shards: int


def settings(smoke: bool) -> Settings:
    if smoke:  # CPU; Triton under its interpreter: every shape tiny
        return Settings(True, "cpu", torch.float32, 2, (1,), 32, 10, (16,), 32, (64,), (1,), 2, 0, 1, 1.0, 1)
    # 16 test shards: compiling (autotuned configurations of four kernels per case) is single-threaded per process.
    return Settings(False, "cuda", torch.bfloat16, 32, (32, 8), 128, 10, (512, 2048, 8192), 16384, (2048, 8192),
                    (1, 16), 8, 2, 10, 1.0, min(16, os.cpu_count() or 1))


def _device_peaks(device: str) -> tuple[Optional[float], Optional[float]]:
    """``(bf16 FLOP/s, HBM bytes/s)`` of the device, None when unknown (CPU, other GPUs)."""
    if torch.device(device).type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, flops, bandwidth in DEVICE_PEAKS:
        if key in name:
            return flops, bandwidth
    return None, None


def _alpaca_lengths(max_seq_len: int) -> list[int]:
    """Model-input lengths of the Alpaca rows of :data:`ALPACA`, tokenised with LLaMA's tokenizer."""
    return [len(e) for e in _alpaca_examples(max_seq_len)]


def _alpaca_examples(max_seq_len: int):
    from fastadapter.model.tokenizer import load_tokenizer
    from fastadapter.training.data import load_examples
    examples, _ = load_examples(SHARED_DATA / ALPACA, load_tokenizer(SHARED_DATA / TOKENIZER), max_seq_len)
    return examples


# -- stage 0: environment -------------------------------------------------------------------------------------
def stage_environment(cfg: Settings, deadline: Deadline, out: dict) -> None:
    from fastadapter.backends import get_backend

    from .op_providers import OpProvider, check_provider
    backend = get_backend("triton")
    out["triton_unavailable"] = backend.unavailable_reason()
    flops, bandwidth = _device_peaks(cfg.device)
    out.update(peak_bf16_tflops=flops and flops / 1e12, peak_hbm_tb_s=bandwidth and bandwidth / 1e12)
    if out["triton_unavailable"]:
        raise RuntimeError(f"the triton backend cannot run here: {out['triton_unavailable']}")
    triton = OpProvider("fastadapter-triton", _triton_fn, "zero_init_attention(backend='triton')",
                        lambda *_: None)
    # --smoke: the forward only (the interpreted backward takes seconds; the op tests check gradients).
    checked = "forward" if cfg.smoke else "forward and every gradient"
    out["triton_check"] = (check_provider(triton, cfg.device, dtype=cfg.dtype, check_grads=not cfg.smoke)
                           or f"matches the fp32 reference ({checked})")
    log(f"  triton backend vs the fp32 reference: {out['triton_check']}")


def _triton_fn(q, k, v, pk, pv, gate, seqused_k=None, **varlen):
    """The triton backend: dense, or with ``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q``, ``max_seqlen_k``
    varlen."""
    from fastadapter import zero_init_attention, zero_init_attention_varlen
    if varlen:
        return zero_init_attention_varlen(q, k, v, pk, pv, gate, varlen["cu_seqlens_q"], varlen["cu_seqlens_k"],
                                          varlen["max_seqlen_q"], varlen["max_seqlen_k"], seqused_k=seqused_k,
                                          backend="triton")
    return zero_init_attention(q, k, v, pk, pv, gate, seqused_k=seqused_k, backend="triton")


# -- stage 1: the op test grid compiled on CUDA ---------------------------------------------------------------
def _junit_cases(path: pathlib.Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else None
        cases.append(dict(id=f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                          outcome=outcome, seconds=round(float(case.get("time", 0.0)), 2), message=message))
    return cases


def stage_op_tests(cfg: Settings, deadline: Deadline, out: dict, folder: pathlib.Path) -> None:
    """Collect the op test grid, run it in ``test_shards`` concurrent pytest processes, parse their JUnit files."""
    env = dict(os.environ)
    if cfg.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:  # compiled kernels on CUDA tensors: tests/conftest.py chooses CUDA when it is there
        env.pop("TRITON_INTERPRET", None)
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    if cfg.test_shards == 1:  # --smoke: two cases of the grid, no separate collection (a second interpreter start)
        shards = [[OP_TEST_FILE, "-k", SMOKE_TEST_SELECTION]]
        ids = None
    else:
        collected = subprocess.run(base + ["--collect-only", OP_TEST_FILE], cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=max(10.0, deadline.left()))
        ids = [line for line in collected.stdout.splitlines() if "::" in line and "triton" in line]
        if not ids:
            raise RuntimeError(f"no triton test collected from {OP_TEST_FILE}:\n{collected.stdout[-2000:]}"
                               f"{collected.stderr[-2000:]}")
        shards = [ids[shard::cfg.test_shards] for shard in range(cfg.test_shards)]
    out["collected"] = len(ids) if ids is not None else None
    log(f"  op tests: {'the smoke selection' if ids is None else len(ids)} cases in {len(shards)} shard(s)")
    log_path = folder / TEST_LOG_NAME
    with tempfile.TemporaryDirectory() as scratch, open(log_path, "w") as test_log:
        processes = []
        for shard, chosen in enumerate(shards):
            if not chosen:
                continue
            junit = pathlib.Path(scratch) / f"shard{shard}.xml"
            shard_log = pathlib.Path(scratch) / f"shard{shard}.log"
            handle = open(shard_log, "w")
            processes.append((subprocess.Popen(base + [f"--junitxml={junit}", *chosen], cwd=REPO, env=env,
                                               stdout=handle, stderr=subprocess.STDOUT), junit, shard_log, handle))
        timed_out = False
        for process, _, _, _ in processes:
            try:
                process.wait(timeout=max(1.0, deadline.left()))
            except subprocess.TimeoutExpired:
                # SIGINT first: pytest stops at the current test and still writes the JUnit file of those done.
                timed_out = True
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        cases = []
        for process, junit, shard_log, handle in processes:
            handle.close()
            test_log.write(shard_log.read_text(errors="replace"))
            if junit.exists():
                cases += _junit_cases(junit)
    out["cases"] = cases
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    out.update(counts, not_run=None if ids is None else len(ids) - len(cases))
    log(f"  op tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped" + ("" if out["not_run"] is None else f", {out['not_run']} not run"))
    if timed_out:
        raise StageTimeout(f"the op tests overran the stage budget; {len(cases)} cases reported")


# -- stage 2 and 3: op benchmarks -----------------------------------------------------------------------------
@contextlib.contextmanager
def _sdpa_flash_only(device: str):
    """SDPA restricted to its flash backend on CUDA (the baseline people run); on CPU PyTorch's own choice."""
    if torch.device(device).type != "cuda":
        yield "default (CPU: no flash backend)"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        yield "flash"


def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:  # --smoke: eager flex (its math reference), torch.compile would take longer than the run
        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
                return flex_attention(*args, **kwargs)
        return eager
    if not hasattr(_flex, "compiled"):
        import torch._dynamo
        for knob in ("cache_size_limit", "recompile_limit"):  # one graph per shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        _flex.compiled = torch.compile(flex_attention, dynamic=False)
    return _flex.compiled


def word_block_mask(length: int, device, document: Optional[torch.Tensor] = None):
    """flex_attention's block mask of causal self-attention over ``length`` tokens; with ``document`` (the
    sequence index of every packed token), causal within each sequence only. Built once per shape, as users do."""
    from torch.nn.attention.flex_attention import create_block_mask
    if document is None:
        def mask(b, h, i, j):
            return i >= j
    else:
        def mask(b, h, i, j):
            return (i >= j) & (document[i] == document[j])
    return create_block_mask(mask, None, None, length, length, device=device)


def flex_two_calls(q, k, v, pk, pv, gate, block_mask, *, compiled=True):
    """The op in ``flex_attention``: words under ``block_mask`` (:func:`word_block_mask`), the prefix as a second
    unmasked call over the P prompt keys, ``out = O_w + tanh(gate)·O_p`` (the two softmaxes are separate, which
    one flex call over cat(prefix, words) cannot express)."""
    flex = _flex(compiled)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = flex(qh, kh, vh, block_mask=block_mask, enable_gqa=True)
    batch = q.shape[0]
    out_p = flex(qh, pk.transpose(1, 2).expand(batch, -1, -1, -1), pv.transpose(1, 2).expand(batch, -1, -1, -1),
                 enable_gqa=True)
    return (out + torch.tanh(gate).to(out.dtype)[None, :, None, None] * out_p).transpose(1, 2)


@dataclass
class OpCase:
    """One benchmark shape: batched ``[B, S]`` or packed (``lengths`` set: one row of sequences)."""

    label: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_kv: int
    lengths: Optional[list[int]] = None

    def flops(self, cfg: Settings, mode: str) -> float:
        if self.lengths:
            return sum(attention_flops(1, cfg.heads_q, n, n, cfg.head_dim, cfg.prefix_len, mode=mode)
                       for n in self.lengths)
        # A decode step's query sees every cached key: the causal halving of square attention does not apply.
        return attention_flops(self.batch, cfg.heads_q, self.seqlen_q, self.seqlen_k, cfg.head_dim, cfg.prefix_len,
                               causal=self.seqlen_q == self.seqlen_k, mode=mode)


def _inputs(cfg: Settings, case: OpCase, requires_grad: bool) -> dict:
    """The tensors of ``case``: ``q, k, v`` batched (packed cases: ``[1, T, H, D]`` and the padded batch), the
    prompt ``[1, P, Hkv, D]`` and the gate ``[Hq]`` (N(0, 0.25): the prefix matters)."""
    def randn(*shape):
        return torch.randn(*shape, device=cfg.device, dtype=torch.float32).to(cfg.dtype).requires_grad_(requires_grad)

    d, hq, hkv = cfg.head_dim, cfg.heads_q, case.heads_kv
    tokens_q = case.batch * case.seqlen_q if not case.lengths else sum(case.lengths)
    shape_q = (case.batch, case.seqlen_q) if not case.lengths else (1, tokens_q)
    shape_k = (case.batch, case.seqlen_k) if not case.lengths else (1, tokens_q)
    t = dict(q=randn(*shape_q, hq, d), k=randn(*shape_k, hkv, d), v=randn(*shape_k, hkv, d),
             pk=randn(1, cfg.prefix_len, hkv, d), pv=randn(1, cfg.prefix_len, hkv, d),
             gate=(0.5 * torch.randn(hq, device=cfg.device)).requires_grad_(requires_grad))
    if case.lengths:
        cu = torch.zeros(len(case.lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(case.lengths), 0)
        t["cu_seqlens"] = cu.to(cfg.device)
        t["document"] = torch.repeat_interleave(torch.arange(len(case.lengths)),
                                                torch.tensor(case.lengths)).to(cfg.device)
        longest = max(case.lengths)
        t["padded"] = dict(q=randn(len(case.lengths), longest, hq, d), k=randn(len(case.lengths), longest, hkv, d),
                           v=randn(len(case.lengths), longest, hkv, d))
    return t


def _providers(cfg: Settings, decode: bool) -> dict[str, Callable[[dict], Callable[[], torch.Tensor]]]:
    """``{name: build(tensors) -> forward()}``. Packed cases: the baselines without varlen support run on the
    same sequences padded to the longest (what their users do); their TFLOP/s count the real work only."""
    from . import baselines

    def triton(t):
        if "cu_seqlens" in t:
            longest = int(max(t["lengths"]))
            return lambda: _triton_fn(t["q"][0], t["k"][0], t["v"][0], t["pk"], t["pv"], t["gate"],
                                      cu_seqlens_q=t["cu_seqlens"], cu_seqlens_k=t["cu_seqlens"],
                                      max_seqlen_q=longest, max_seqlen_k=longest)[None]
        return lambda: _triton_fn(t["q"], t["k"], t["v"], t["pk"], t["pv"], t["gate"])

    def padded(fn):
        def build(t):
            qkv = t.get("padded", t)
            return lambda: fn(qkv["q"], qkv["k"], qkv["v"], t["pk"], t["pv"], t["gate"])
        return build

    def two_sdpa(t):
        qkv = t.get("padded", t)
        args = (qkv["q"], qkv["k"], qkv["v"], t["pk"], t["pv"], t["gate"])

        def forward():
            if forward.note is None:
                try:
                    with _sdpa_flash_only(cfg.device):
                        return baselines.two_sdpa(*args, gate_tanh=True)
                except RuntimeError as error:  # the flash backend refuses this shape: PyTorch's own choice
                    forward.note = f"flash refused ({(str(error).strip().splitlines() or [''])[0][:200]}): " \
                                   f"PyTorch's default SDPA backend"
            return baselines.two_sdpa(*args, gate_tanh=True)
        forward.note = None
        return forward

    def flex(t):
        block_mask = word_block_mask(t["q"].shape[1], t["q"].device, t.get("document"))
        return lambda: flex_two_calls(t["q"], t["k"], t["v"], t["pk"], t["pv"], t["gate"], block_mask,
                                      compiled=not cfg.smoke)

    def eager(t):
        qkv = t.get("padded", t)
        b, s, hq, _ = qkv["q"].shape
        score_bytes = 4 * b * hq * s * (t["pk"].shape[1] + qkv["k"].shape[1])  # fp32 scores, as many probabilities
        if torch.device(cfg.device).type == "cuda" and 4 * score_bytes > 0.9 * torch.cuda.mem_get_info()[0]:
            raise NotRun(f"needs ~{4 * score_bytes / 2**30:.0f} GiB of fp32 scores and their gradients, more than "
                         f"the free GPU memory")
        return padded(lambda *a: baselines.eager_v1(*a, gate_tanh=True))(t)

    sdpa_name = "two-sdpa-flash" if torch.device(cfg.device).type == "cuda" else "two-sdpa"  # CPU: no flash
    providers = {"fastadapter-triton": triton, sdpa_name: two_sdpa, "eager-v1": eager}
    if decode:
        providers["triton-forward-kernel"] = _forward_kernel_provider
    else:
        providers["flex-attention"] = flex
    return providers


def _forward_kernel_provider(t):
    """The forward kernel alone (128-row query tiles, no split over the cache): what decode ran before."""
    from fastadapter.kernels.forward import attention_forward
    from fastadapter.kernels.problem import AttentionProblem
    inp = AttentionProblem.from_dense(t["q"], t["k"], t["v"], t["pk"], t["pv"], t["gate"])
    return lambda: attention_forward(inp)[0]


def _measure_row(cfg: Settings, case: OpCase, provider: str, build, mode: str, tensors: dict, peak_flops,
                 reference: Optional[torch.Tensor], decode: bool = False, bandwidth: Optional[float] = None) -> dict:
    row = dict(shape=case.label, provider=provider, mode=mode, heads_kv=case.heads_kv)
    if mode == "forward":  # inputs that need no gradient (flex_attention on CPU refuses any that does)
        detached = {name: t.detach() if isinstance(t, torch.Tensor) else t for name, t in tensors.items()}
        if "padded" in tensors:
            detached["padded"] = {name: t.detach() for name, t in tensors["padded"].items()}
        forward = build(detached)
    else:
        forward = build(tensors)
    if mode == "forward":
        fn = forward
        with torch.no_grad():
            result = fn()
        if reference is not None and result.shape == reference.shape:
            row["max_abs_diff_vs_triton"] = (result.float() - reference.float()).abs().max().item()
        del result
        call = lambda: torch.no_grad()(fn)()  # noqa: E731
    else:
        leaves = [t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        leaves += [t for t in tensors.get("padded", {}).values() if t.requires_grad]

        def call():
            out = forward()
            grads = torch.autograd.grad(out, [x for x in leaves], torch.ones_like(out), allow_unused=True)
            return grads
    timing = measure(call, warmup=cfg.warmup, repeats=cfg.repeats, device=cfg.device, max_seconds=cfg.max_seconds)
    row.update(timing, peak_memory_mb=peak_memory_bytes(call, cfg.device) / 2**20)
    if getattr(forward, "note", None):
        row["note"] = forward.note
    flops = case.flops(cfg, mode)
    row["tflops"] = tflops_per_second(flops, timing["median_ms"])
    row["percent_of_peak"] = None if peak_flops is None else 100 * row["tflops"] * 1e12 / peak_flops
    if decode:  # a decode step reads the whole KV cache once: memory-bound
        kv_bytes = 2 * case.batch * case.seqlen_k * case.heads_kv * cfg.head_dim * torch.finfo(cfg.dtype).bits // 8
        row["gb_per_s"] = kv_bytes / (timing["median_ms"] * 1e-3) / 1e9
        row["percent_of_hbm"] = None if not bandwidth else 100 * row["gb_per_s"] * 1e9 / bandwidth
    return row


def _run_cases(cfg: Settings, deadline: Deadline, out: dict, cases: list[OpCase], modes: tuple[str, ...],
               decode: bool, later: tuple[str, ...] = (), later_order: Callable[[OpCase], int] = lambda c: 0
               ) -> None:
    """Every (case, provider, mode); providers in ``later`` (expensive to compile) go in a second pass, so that
    the budget, when it runs out, is spent on the others first. Every row that is not measured says why."""
    peak_flops, bandwidth = _device_peaks(cfg.device)
    providers = _providers(cfg, decode)
    rows = out.setdefault("rows", [])
    passes = [[p for p in providers if p not in later], [p for p in providers if p in later]]
    for names, ordered in zip(passes, (cases, sorted(cases, key=later_order))):
        if not names:
            continue
        for case in ordered:
            tensors = _inputs(cfg, case, requires_grad="forward+backward" in modes)
            if case.lengths:
                tensors["lengths"] = case.lengths
            reference = None
            if not case.lengths:  # the other providers' outputs are compared with the Triton kernels'
                try:
                    with torch.no_grad():
                        reference = providers["fastadapter-triton"](tensors)()
                except Exception as error:  # noqa: BLE001 - the row of fastadapter-triton records it
                    log(f"  {case.label}: no Triton output to compare with ({type(error).__name__})")
            for name in names:
                for mode in modes:
                    if deadline.left() <= 0:
                        rows.append(dict(shape=case.label, provider=name, mode=mode, heads_kv=case.heads_kv,
                                         skipped="the stage's time budget was spent before this row"))
                        continue
                    try:
                        row = _measure_row(cfg, case, name, providers[name], mode, tensors, peak_flops,
                                           None if name == "fastadapter-triton" else reference,
                                           decode, bandwidth)
                    except StageTimeout:
                        raise
                    except NotRun as reason:
                        row = dict(shape=case.label, provider=name, mode=mode, heads_kv=case.heads_kv,
                                   skipped=str(reason))
                    except Exception as error:  # noqa: BLE001 - a provider that fails is a result, not a crash
                        first_line = (str(error).strip().splitlines() or [""])[0][:300]
                        row = dict(shape=case.label, provider=name, mode=mode, heads_kv=case.heads_kv,
                                   error=f"{type(error).__name__}: {first_line}")
                        if torch.device(cfg.device).type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    log("  " + _row_line(row))
            del tensors, reference
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.empty_cache()


def _row_line(row: dict) -> str:
    head = f"{row['shape']:<28} {row['provider']:<22} {row['mode']:<17}"
    if "median_ms" not in row:
        return f"{head} {'error: ' + row['error'] if 'error' in row else 'skipped: ' + row['skipped']}"
    extra = f" {row['gb_per_s']:8.1f} GB/s" if "gb_per_s" in row else ""
    pct = f" ({row['percent_of_peak']:.0f}% of peak)" if row.get("percent_of_peak") is not None else ""
    return (f"{head} {row['median_ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s{pct}{extra} "
            f"{row['peak_memory_mb']:9.1f} MiB")


def _packed_lengths(cfg: Settings) -> list[int]:
    """Alpaca lengths (LLaMA tokenizer, truncated to 512, and to ``batch_tokens / 2`` for ``--smoke``'s tiny
    rows) packed in order into one row of ``batch_tokens``."""
    lengths, row = [min(n, cfg.batch_tokens // 2) for n in _alpaca_lengths(512)], []
    for n in lengths:
        if sum(row) + n > cfg.batch_tokens:
            break
        row.append(n)
    return row


def stage_op_bench(cfg: Settings, deadline: Deadline, out: dict) -> None:
    cases = []
    for heads_kv in cfg.heads_kv:
        for seqlen in cfg.seqlens:
            batch = max(1, cfg.batch_tokens // seqlen)
            cases.append(OpCase(f"B{batch}-S{seqlen}-H{cfg.heads_q}x{heads_kv}", batch, seqlen, seqlen, heads_kv))
    lengths = _packed_lengths(cfg)
    out["packed_lengths"] = dict(sequences=len(lengths), tokens=sum(lengths), longest=max(lengths),
                                 mean=statistics.mean(lengths))
    for heads_kv in cfg.heads_kv:
        cases.append(OpCase(f"packed{len(lengths)}-T{sum(lengths)}-H{cfg.heads_q}x{heads_kv}", len(lengths),
                            max(lengths), max(lengths), heads_kv, lengths=lengths))
    # flex_attention compiles one graph per shape (~10-20 s each, forward and backward): it runs last, S = 2048 and
    # the packed batch first, so that the budget is spent on what matters most if it runs out.
    def flex_priority(case: OpCase) -> int:
        return 0 if case.seqlen_q == 2048 else 1 if case.lengths else 2
    _run_cases(cfg, deadline, out, cases, ("forward", "forward+backward"), decode=False, later=("flex-attention",),
               later_order=flex_priority)


def stage_decode_bench(cfg: Settings, deadline: Deadline, out: dict) -> None:
    cases = [OpCase(f"decode-B{b}-Sk{sk}-H{cfg.heads_q}x{hkv}", b, 1, sk, hkv)
             for hkv in cfg.heads_kv for sk in cfg.decode_cache for b in cfg.decode_batches]
    _run_cases(cfg, deadline, out, cases, ("forward",), decode=True)
    for heads_kv in cfg.heads_kv:
        for cache in cfg.decode_cache:
            _ragged_decode_rows(cfg, deadline, out, cache, heads_kv)


def ragged_cache_lengths(rows: int, cache: int) -> list[int]:
    """Cache lengths of a ragged decode batch: ``rows`` prompts spread from ``cache / rows`` to ``cache`` keys."""
    return [max(1, cache * (i + 1) // rows) for i in range(rows)]


def _ragged_decode_providers(cfg: Settings, t: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """One decode step (one query per row) of a ragged batch, three ways, each giving ``[B, 1, Hq, D]``: the padded
    cache ``[B, S_cache, Hkv, D]`` read up to each row's length (``seqused_k``: the thin model's generation), the
    caches packed ``[ΣSk, Hkv, D]`` with their own offsets (an unpadded Hugging Face step), and one call per row
    over its own slice of the cache (the loop callers ran before the op took ragged batches)."""
    lengths, batch = t["lengths"], len(t["lengths"])
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=cfg.device)
    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=cfg.device)
    cu_k[1:] = torch.cumsum(torch.tensor(lengths, device=cfg.device), 0)
    packed_k = torch.cat([t["k"][b, :n] for b, n in enumerate(lengths)])
    packed_v = torch.cat([t["v"][b, :n] for b, n in enumerate(lengths)])
    used = torch.tensor(lengths, dtype=torch.int32, device=cfg.device)
    common = (t["pk"], t["pv"], t["gate"])

    def per_row():
        return torch.cat([_triton_fn(t["q"][b:b + 1], t["k"][b:b + 1, :n], t["v"][b:b + 1, :n], *common)
                          for b, n in enumerate(lengths)])

    return {"fastadapter-triton-seqused": lambda: _triton_fn(t["q"], t["k"], t["v"], *common, seqused_k=used),
            "fastadapter-triton-varlen": lambda: _triton_fn(t["q"][:, 0], packed_k, packed_v, *common,
                                                            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1,
                                                            max_seqlen_k=max(lengths))[:, None],
            "fastadapter-triton-per-row": per_row}


def _ragged_decode_rows(cfg: Settings, deadline: Deadline, out: dict, cache: int, heads_kv: int) -> None:
    """The rows of one ragged decode batch: ms, GB/s of the keys and values actually read, and each one-call
    provider's largest difference from the per-row calls (the same function: exact up to summation order). No
    peak memory: a decode step allocates only its output and the split kernels' scratch."""
    lengths = ragged_cache_lengths(cfg.ragged_rows, cache)
    case = OpCase(f"ragged-B{len(lengths)}-Sk{cache}-H{cfg.heads_q}x{heads_kv}", len(lengths), 1, cache, heads_kv)
    t = _inputs(cfg, case, requires_grad=False)
    t["lengths"] = lengths
    _, bandwidth = _device_peaks(cfg.device)
    kv_bytes = 2 * sum(lengths) * heads_kv * cfg.head_dim * torch.finfo(cfg.dtype).bits // 8
    rows = out.setdefault("rows", [])
    providers = _ragged_decode_providers(cfg, t)
    reference = None  # the per-row calls' output (measured first): what the one-call providers are compared to
    for name in ("fastadapter-triton-per-row", "fastadapter-triton-seqused", "fastadapter-triton-varlen"):
        row = dict(shape=case.label, provider=name, mode="forward", heads_kv=heads_kv, cache_lengths=lengths)
        if deadline.left() <= 0:
            rows.append(dict(row, skipped="the stage's time budget was spent before this row"))
            continue
        last = []

        def call(fn=providers[name]):  # keeps the last output: no extra call for the comparison
            last[:] = [fn()]
        try:
            with torch.no_grad():
                timing = measure(call, warmup=cfg.warmup, repeats=cfg.repeats, device=cfg.device,
                                 max_seconds=cfg.max_seconds)
            if reference is None and name == "fastadapter-triton-per-row":
                reference = last[0]
            elif reference is not None:
                row["max_abs_diff_vs_per_row"] = (last[0].float() - reference.float()).abs().max().item()
            row.update(timing)
            row["gb_per_s"] = kv_bytes / (timing["median_ms"] * 1e-3) / 1e9
            row["percent_of_hbm"] = None if not bandwidth else 100 * row["gb_per_s"] * 1e9 / bandwidth
        except StageTimeout:
            raise
        except Exception as error:  # noqa: BLE001 - a provider that fails is a result, not a crash
            row["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        rows.append(row)
        diff = row.get("max_abs_diff_vs_per_row")
        log("  " + (f"{case.label:<28} {name:<28} " + (f"error: {row['error']}" if "error" in row else
                    f"{row['median_ms']:9.3f} ms {row['gb_per_s']:8.1f} GB/s"
                    + ("" if diff is None else f", max |diff| vs per row {diff:.1e}"))))


# -- stage 4: the trainer -------------------------------------------------------------------------------------
def _random_model(config, dtype: torch.dtype, device: str):
    """A LLaMA of ``config`` with random weights in ``dtype``, built on the meta device and filled in place on
    ``device`` (no fp32 copy of 7B parameters)."""
    from fastadapter.model.llama import LlamaModel
    with torch.device("meta"):
        model = LlamaModel(config).to(dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:  # RMSNorm weights
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 1.0 if "tok_embeddings" in name else 0.02, generator=generator)
    return model


def stage_trainer(cfg: Settings, deadline: Deadline, out: dict) -> None:
    from fastadapter.model.adapter import AdapterConfig, add_adapter
    from fastadapter.model.config import LlamaConfig
    from fastadapter.training.flops import NAMED_CONFIGS, epoch_flops
    from fastadapter.training.trainer import Trainer, TrainConfig, epoch_rows

    if cfg.smoke:
        config, name = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=172,
                                   max_seq_len=512), "tiny (dim 64, 2 layers)"
        max_seq_len, batch_tokens, adapter_layers, steps, dtype = 48, 256, 2, 2, "fp32"
    else:
        config, name = NAMED_CONFIGS["llama-7b"], "llama-7b (random bf16 weights)"
        max_seq_len, batch_tokens, adapter_layers, steps, dtype = 512, 8192, 30, 8, "bf16"
    examples = _alpaca_examples(max_seq_len)
    lengths = [len(e) for e in examples]
    out.update(model=name, adapter_layers=adapter_layers, prompt_len=10, batch_tokens=batch_tokens, dtype=dtype,
               data=f"{ALPACA}: {len(examples)} rows, mean {statistics.mean(lengths):.1f} tokens (LLaMA tokenizer, "
                    f"truncated to {max_seq_len})")
    log(f"  trainer: building {name}")
    model = _random_model(config, torch.bfloat16 if dtype == "bf16" else torch.float32, cfg.device)
    add_adapter(model, AdapterConfig(prompt_len=10, layers=adapter_layers))
    with torch.no_grad():  # non-zero gates: the prompt takes part as after some training
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("gate"):
                parameter.fill_(0.1)
    cuda = torch.device(cfg.device).type == "cuda"
    with tempfile.TemporaryDirectory() as run_folder:
        train_config = TrainConfig(out=run_folder, batch_tokens=batch_tokens, max_steps=1000, dtype=dtype,
                                   eval_every=0, save_every=0, progress=False)
        rows = epoch_rows(examples, batch_tokens, train_config.seed, 0)  # the rows the trainer's epoch 0 takes
        try:
            times, tokens, flops = _timed_steps(Trainer(model, examples, [], train_config), rows, examples, config,
                                                adapter_layers, steps, deadline, cuda)
            out["activation_checkpointing"] = False
        except torch.cuda.OutOfMemoryError:  # a GPU with less memory than an H200: recompute activations
            log("  trainer: out of memory; again with activation checkpointing")
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            model.activation_checkpointing = True
            times, tokens, flops = _timed_steps(Trainer(model, examples, [], train_config), rows, examples, config,
                                                adapter_layers, steps, deadline, cuda)
            out["activation_checkpointing"] = True
        out["steps_timed"] = len(times)
        out["step_s_median"] = statistics.median(times)
        out["tokens_per_s"] = sum(tokens) / sum(times)
        achieved = sum(flops) / sum(times)
        out["achieved_tflops"] = achieved / 1e12
        peak_flops, _ = _device_peaks(cfg.device)
        out["mfu"] = None if peak_flops is None else achieved / peak_flops
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    # The paper's run: the data's length distribution scaled to Alpaca 52K, 5 epochs.
    scale = PAPER_ROWS / len(lengths) * PAPER_EPOCHS
    run_tokens = sum(lengths) * scale
    run_flops = epoch_flops(config, lengths, adapter_layers=adapter_layers, prompt_len=10).total * scale
    hours_1 = run_tokens / out["tokens_per_s"] / 3600
    out["paper_run"] = dict(rows=PAPER_ROWS, epochs=PAPER_EPOCHS, tokens=run_tokens, flops=run_flops,
                            hours_1_gpu=hours_1, hours_8_gpus=hours_1 / 8, paper_hours_8_a100=PAPER_HOURS,
                            assumption="8 GPUs: linear data-parallel scaling of the measured single-GPU rate; "
                                       "the paper pads every example to 512 tokens, this run packs them")
    log(f"  trainer: {out['tokens_per_s']:.0f} tokens/s, MFU {_pct(out['mfu'])}, projected paper run "
        f"{hours_1:.2f} h on 1 GPU, {hours_1 / 8:.2f} h on 8 (paper: {PAPER_HOURS:g} h on 8 A100)")


def _timed_steps(trainer, rows: list[list[int]], examples, config, adapter_layers: int, steps: int,
                 deadline: Deadline, cuda: bool) -> tuple[list[float], list[int], list[float]]:
    """Seconds, real tokens and FLOPs of up to ``steps`` steps of ``trainer`` after an untimed first one (which
    compiles and autotunes the kernels); stops early, after two timed steps, when the budget runs short."""
    from fastadapter.training.flops import sequence_flops
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, tokens, flops = [], [], []
    step_seconds = None
    for step in range(min(steps + 1, len(rows))):
        if deadline.left() <= 0 or (step_seconds and deadline.left() < 2 * step_seconds and len(times) >= 2):
            break
        started = time.perf_counter()
        loss, real_tokens = trainer.train_step()  # the real trainer's step (its float(loss) synchronises)
        step_seconds = seconds = time.perf_counter() - started
        step_lengths = [len(examples[i]) for i in rows[step]]
        if sum(step_lengths) != real_tokens:
            raise RuntimeError(f"step {step} trained {real_tokens} tokens, its packed row holds "
                               f"{sum(step_lengths)}: the FLOP count would be that of another row")
        log(f"  trainer: step {step}: loss {loss:.3f}, {real_tokens} tokens, {seconds:.2f} s")
        if step == 0:
            continue
        times.append(seconds)
        tokens.append(real_tokens)
        flops.append(sum(sequence_flops(config, n, adapter_layers=adapter_layers, prompt_len=10).total
                         for n in step_lengths))
    if not times:
        raise RuntimeError("no timed step fitted in the budget")
    return times, tokens, flops


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# -- the run --------------------------------------------------------------------------------------------------
def _alarm(signum, frame):
    raise StageTimeout("interrupted: the stage overran its budget")


def run_stage(stage: Stage, cfg: Settings, fn: Callable[[Deadline, dict], None], results: dict,
              total: Deadline) -> None:
    budget = stage.smoke_budget_s if cfg.smoke else stage.budget_s
    budget = max(0.0, min(budget, total.left()))
    record = results["stages"][stage.name] = dict(expected_s=stage.expected_s, budget_s=round(budget, 1))
    data = results.setdefault(stage.name, {})
    if budget <= 0:
        record.update(status="skipped", reason="the run's total time budget was spent", seconds=0.0)
        log(f"stage {stage.name}: skipped ({record['reason']})")
        return
    log(f"stage {stage.name}: budget {budget:.0f} s (expected {stage.expected_s:g} s on an H200)")
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget + HARD_STOP_GRACE_S)
    try:
        fn(Deadline(budget), data)
        record["status"] = "ok"
    except StageTimeout as error:
        record.update(status="skipped", reason=str(error))
    except Exception as error:  # noqa: BLE001 - one stage's failure must not lose the others
        record.update(status="error", reason=f"{type(error).__name__}: {error}"[:1000],
                      traceback=traceback.format_exc()[-3000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - started, 1)
    log(f"stage {stage.name}: {record['status']} in {record['seconds']:.1f} s"
        + (f" ({record['reason'][:300]})" if "reason" in record else ""))


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_summary(results: dict) -> str:
    meta = results["metadata"]
    lines = [f"# GPU acceptance run{' (smoke, CPU)' if results['smoke'] else ''}", "",
             f"{meta['device_name']}; torch {meta['versions'].get('torch')}, triton {meta['versions'].get('triton')}; "
             f"commit {meta['git'].get('commit')}{' (dirty)' if meta['git'].get('dirty') else ''}; "
             f"{meta['created_utc']}; total {results['total_seconds']:.0f} s", "", "## Stages", ""]
    stage_rows = [dict(stage=name, **{k: v for k, v in record.items() if k != "traceback"})
                  for name, record in results["stages"].items()]
    lines += _table(stage_rows, [("stage", "stage", ""), ("status", "status", ""), ("seconds", "seconds", ".1f"),
                                 ("budget s", "budget_s", ".0f"), ("expected s", "expected_s", ".0f"),
                                 ("reason", "reason", "")])
    tests = results.get("op_tests", {})
    if tests.get("cases") is not None:
        lines += ["", "## Op test grid", "",
                  f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('error', 0)} errors, "
                  f"{tests.get('skipped', 0)} skipped"
                  + (" (the smoke selection)" if tests.get("collected") is None else
                     f", {tests.get('not_run', 0)} not run, of {tests['collected']} collected")]
        bad = [c for c in tests["cases"] if c["outcome"] in ("failed", "error")]
        if bad:
            lines += [""] + _table(bad, [("case", "id", ""), ("outcome", "outcome", ""), ("message", "message", "")])
    columns = [("shape", "shape", ""), ("provider", "provider", ""), ("mode", "mode", ""), ("ms", "median_ms", ".3f"),
               ("TFLOP/s", "tflops", ".1f"), ("% peak", "percent_of_peak", ".0f"),
               ("peak MiB", "peak_memory_mb", ".0f"), ("max abs diff vs triton", "max_abs_diff_vs_triton", ".1e"),
               ("note", "note", "")]
    for key, title, extra in (("op_bench", "Attention: forward and forward+backward", []),
                              ("decode_bench", "Decode steps", [("GB/s", "gb_per_s", ".0f"),
                                                                ("% HBM", "percent_of_hbm", ".0f"),
                                                                ("max abs diff vs per row",
                                                                 "max_abs_diff_vs_per_row", ".1e")])):
        rows = results.get(key, {}).get("rows")
        if rows:
            noted = [dict(r, note=f"error: {r['error']}" if "error" in r else r.get("skipped") or r.get("note"))
                     for r in rows]
            lines += ["", f"## {title}", ""] + _table(noted, columns[:-1] + extra + columns[-1:])
    trainer = results.get("trainer", {})
    if "tokens_per_s" in trainer:
        run = trainer["paper_run"]
        memory = "n/a" if trainer["peak_memory_gib"] is None else f"{trainer['peak_memory_gib']:.1f} GiB"
        lines += ["", "## Trainer", "",
                  f"{trainer['model']}, adapter on the top {trainer['adapter_layers']} layers, prompt "
                  f"{trainer['prompt_len']}, {trainer['dtype']}, packed rows of {trainer['batch_tokens']} tokens; "
                  f"{trainer['data']}.", "",
                  f"- {trainer['tokens_per_s']:,.0f} tokens/s over {trainer['steps_timed']} steps "
                  f"(median step {trainer['step_s_median']:.2f} s), {trainer['achieved_tflops']:.1f} TFLOP/s, "
                  f"MFU {_pct(trainer['mfu'])}, peak memory {memory}",
                  f"- the paper's run (Alpaca {run['rows']:,} rows x {run['epochs']} epochs, {run['tokens']:,.0f} "
                  f"tokens): {run['hours_1_gpu']:.2f} h on 1 GPU, {run['hours_8_gpus']:.2f} h on 8 GPUs; the paper: "
                  f"{run['paper_hours_8_a100']:g} h on 8 A100 ({run['assumption']})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_acceptance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu-acceptance.json, gpu-acceptance.md, op-tests.log")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton under its interpreter")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], default=[s.name for s in STAGES],
                        help="run only these stages (default: all)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU tensors
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke for the CPU smoke run")
    cfg = settings(args.smoke)
    folder = pathlib.Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = Deadline(TOTAL_BUDGET_S if not args.smoke else 90)
    results = dict(smoke=args.smoke, metadata=collect_metadata(cfg.device, "smoke" if args.smoke else "gpu",
                                                               argv if argv is not None else sys.argv),
                   stages={})
    torch.manual_seed(0)
    functions = {"environment": lambda d, o: stage_environment(cfg, d, o),
                 "op_tests": lambda d, o: stage_op_tests(cfg, d, o, folder),
                 "op_bench": lambda d, o: stage_op_bench(cfg, d, o),
                 "decode_bench": lambda d, o: stage_decode_bench(cfg, d, o),
                 "trainer": lambda d, o: stage_trainer(cfg, d, o)}
    for stage in STAGES:
        if stage.name in args.stages:
            run_stage(stage, cfg, functions[stage.name], results, total)
            results["total_seconds"] = time.perf_counter() - started
            (folder / JSON_NAME).write_text(json.dumps(results, indent=1, default=str))  # partial results survive
    results["total_seconds"] = time.perf_counter() - started
    (folder / JSON_NAME).write_text(json.dumps(results, indent=1, default=str))
    (folder / MARKDOWN_NAME).write_text(markdown_summary(results))
    log(f"done in {results['total_seconds']:.0f} s: {folder / JSON_NAME}, {folder / MARKDOWN_NAME}")
    return 0 if all(r["status"] == "ok" for r in results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
