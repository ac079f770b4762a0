"""The shapes and providers the op and decode stages time: a case's tensors (dense, or packed with the padded
batch the baselines without varlen run), each provider of :mod:`benchmarks.op_providers` adapted to them, and one
measured row per (case, provider, mode)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import baselines
from ..flops import attention_flops, tflops_per_second
from ..memory import peak_memory_bytes
from ..op_providers import (fastadapter_triton, flex_two_calls, sdpa_flash_only, triton_forward_kernel,
                            word_block_mask)
from ..timing import measure
from .common import Deadline, NotRun, Settings, StageTimeout, device_peaks, log


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


def case_inputs(cfg: Settings, case: OpCase, requires_grad: bool) -> dict:
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


def case_providers(cfg: Settings, decode: bool) -> dict[str, Callable[[dict], Callable[[], torch.Tensor]]]:
    """``{name: build(tensors) -> forward()}``. Packed cases: the baselines without varlen support run on the
    same sequences padded to the longest (what their users do); their TFLOP/s count the real work only."""
    def triton(t):
        if "cu_seqlens" in t:
            longest = int(max(t["lengths"]))
            return lambda: fastadapter_triton(t["q"][0], t["k"][0], t["v"][0], t["pk"], t["pv"], t["gate"],
                                              cu_seqlens_q=t["cu_seqlens"], cu_seqlens_k=t["cu_seqlens"],
                                              max_seqlen_q=longest, max_seqlen_k=longest)[None]
        return lambda: fastadapter_triton(t["q"], t["k"], t["v"], t["pk"], t["pv"], t["gate"])

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
                    with sdpa_flash_only(cfg.device):
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

    def forward_kernel(t):
        return lambda: triton_forward_kernel(t["q"], t["k"], t["v"], t["pk"], t["pv"], t["gate"])

    sdpa_name = "two-sdpa-flash" if torch.device(cfg.device).type == "cuda" else "two-sdpa"  # CPU: no flash
    providers = {"fastadapter-triton": triton, sdpa_name: two_sdpa, "eager-v1": eager}
    if decode:
        providers["triton-forward-kernel"] = forward_kernel
    else:
        providers["flex-attention"] = flex
    return providers


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


def run_cases(cfg: Settings, deadline: Deadline, out: dict, cases: list[OpCase], modes: tuple[str, ...],
               decode: bool, later: tuple[str, ...] = (), later_order: Callable[[OpCase], int] = lambda c: 0
               ) -> None:
    """Every (case, provider, mode); providers in ``later`` (expensive to compile) go in a second pass, so that
    the budget, when it runs out, is spent on the others first. Every row that is not measured says why."""
    peak_flops, bandwidth = device_peaks(cfg.device)
    providers = case_providers(cfg, decode)
    rows = out.setdefault("rows", [])
    passes = [[p for p in providers if p not in later], [p for p in providers if p in later]]
    for names, ordered in zip(passes, (cases, sorted(cases, key=later_order))):
        if not names:
            continue
        for case in ordered:
            tensors = case_inputs(cfg, case, requires_grad="forward+backward" in modes)
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
                    log("  " + row_line(row))
            del tensors, reference
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.empty_cache()


def row_line(row: dict) -> str:
    head = f"{row['shape']:<28} {row['provider']:<22} {row['mode']:<17}"
    if "median_ms" not in row:
        return f"{head} {'error: ' + row['error'] if 'error' in row else 'skipped: ' + row['skipped']}"
    extra = f" {row['gb_per_s']:8.1f} GB/s" if "gb_per_s" in row else ""
    pct = f" ({row['percent_of_peak']:.0f}% of peak)" if row.get("percent_of_peak") is not None else ""
    return (f"{head} {row['median_ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s{pct}{extra} "
            f"{row['peak_memory_mb']:9.1f} MiB")
