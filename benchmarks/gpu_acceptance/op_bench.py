"""Stage 2, ``op_bench``: forward and forward+backward at LLaMA-7B heads, dense and packed batches, against two SDPA
calls, eager v1 and flex_attention (compiled, last: its compiles are what the budget runs out on)."""
from __future__ import annotations

import statistics

from .cases import OpCase, run_cases
from ..runner import SuiteSkipped
from .common import Deadline, Settings, alpaca_examples, log


def _packed_lengths(cfg: Settings) -> list[int]:
    """Alpaca lengths (LLaMA tokenizer, truncated to 512, and to ``batch_tokens / 2`` for ``--smoke``'s tiny
    rows) packed in order into one row of ``batch_tokens``."""
    lengths, row = [min(n, cfg.batch_tokens // 2) for n in (len(e) for e in alpaca_examples(512))], []
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
    try:
        lengths = _packed_lengths(cfg)
    except SuiteSkipped as missing:  # no shared data: the dense cases still run, the packed ones say why not
        out["packed_skipped"] = str(missing)
        log(f"  op bench: packed batch skipped: {missing}")
        lengths = []
    if lengths:
        out["packed_lengths"] = dict(sequences=len(lengths), tokens=sum(lengths), longest=max(lengths),
                                     mean=statistics.mean(lengths))
    for heads_kv in cfg.heads_kv if lengths else ():
        cases.append(OpCase(f"packed{len(lengths)}-T{sum(lengths)}-H{cfg.heads_q}x{heads_kv}", len(lengths),
                            max(lengths), max(lengths), heads_kv, lengths=lengths))
    # flex_attention compiles one graph per shape (~10-20 s each, forward and backward): it runs last, S = 2048 and
    # the packed batch first, so that the budget is spent on what matters most if it runs out.
    def flex_priority(case: OpCase) -> int:
        return 0 if case.seqlen_q == 2048 else 1 if case.lengths else 2
    run_cases(cfg, deadline, out, cases, ("forward", "forward+backward"), decode=False, later=("flex-attention",),
               later_order=flex_priority)

