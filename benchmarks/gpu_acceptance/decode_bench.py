"""Stage 3, ``decode_bench``: decode steps (one query over a KV cache) by the split-KV decode kernels, the forward
kernel, two SDPA calls and eager v1; then ragged batches three ways (padded cache with ``seqused_k``, one varlen
call, one call per row)."""
from __future__ import annotations

from typing import Callable

import torch

from ..op_providers import fastadapter_triton
from ..timing import measure
from .cases import OpCase, case_inputs, run_cases
from .common import Deadline, Settings, StageTimeout, device_peaks, log


def stage_decode_bench(cfg: Settings, deadline: Deadline, out: dict) -> None:
    cases = [OpCase(f"decode-B{b}-Sk{sk}-H{cfg.heads_q}x{hkv}", b, 1, sk, hkv)
             for hkv in cfg.heads_kv for sk in cfg.decode_cache for b in cfg.decode_batches]
    run_cases(cfg, deadline, out, cases, ("forward",), decode=True)
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
        return torch.cat([fastadapter_triton(t["q"][b:b + 1], t["k"][b:b + 1, :n], t["v"][b:b + 1, :n], *common)
                          for b, n in enumerate(lengths)])

    return {"fastadapter-triton-seqused": lambda: fastadapter_triton(t["q"], t["k"], t["v"], *common,
                                                                     seqused_k=used),
            "fastadapter-triton-varlen": lambda: fastadapter_triton(t["q"][:, 0], packed_k, packed_v, *common,
                                                                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                                    max_seqlen_q=1, max_seqlen_k=max(lengths))[:, None],
            "fastadapter-triton-per-row": per_row}


def _ragged_decode_rows(cfg: Settings, deadline: Deadline, out: dict, cache: int, heads_kv: int) -> None:
    """The rows of one ragged decode batch: ms, GB/s of the keys and values actually read, and each one-call
    provider's largest difference from the per-row calls (the same function: exact up to summation order). No
    peak memory: a decode step allocates only its output and the split kernels' scratch."""
    lengths = ragged_cache_lengths(cfg.ragged_rows, cache)
    case = OpCase(f"ragged-B{len(lengths)}-Sk{cache}-H{cfg.heads_q}x{heads_kv}", len(lengths), 1, cache, heads_kv)
    t = case_inputs(cfg, case, requires_grad=False)
    t["lengths"] = lengths
    _, bandwidth = device_peaks(cfg.device)
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

