"""``gpu-acceptance.md``: the run's results as markdown tables."""
from __future__ import annotations

from .common import percent


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
                  f"MFU {percent(trainer['mfu'])}, peak memory {memory}",
                  f"- the paper's run (Alpaca {run['rows']:,} rows x {run['epochs']} epochs, {run['tokens']:,.0f} "
                  f"tokens): {run['hours_1_gpu']:.2f} h on 1 GPU, {run['hours_8_gpus']:.2f} h on 8 GPUs; the paper: "
                  f"{run['paper_hours_8_a100']:g} h on 8 A100 ({run['assumption']})"]
    return "\n".join(lines) + "\n"
