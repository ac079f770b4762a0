"""``fastadapter bench --compare A.json B.json``: how much faster B is than A, row by row.

Rows are matched on ``(suite, provider, mode, config)``; the speed-up is ``A.median_ms / B.median_ms`` (above 1:
B is faster). Each suite and provider also gets the geometric mean of its speed-ups, the usual summary of
ratios. Rows present in one file only are counted, not compared.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

from .report import is_measured, load_json


def row_key(row: dict) -> tuple:
    """What identifies a measurement across two result files."""
    return (row.get("suite"), row.get("provider"), row.get("mode"), row.get("config"))


@dataclass(frozen=True)
class Ratio:
    """One matched measurement: the medians in A and B and ``speedup = a_ms / b_ms``."""

    suite: str
    provider: str
    mode: str
    config: str
    a_ms: float
    b_ms: float

    @property
    def speedup(self) -> float:
        return self.a_ms / self.b_ms


def compare_rows(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[Ratio], int, int]:
    """``(ratios, only_in_a, only_in_b)`` over the measured rows of two result files."""
    measured_a = {row_key(r): r for r in rows_a if is_measured(r)}
    measured_b = {row_key(r): r for r in rows_b if is_measured(r)}
    ratios = [Ratio(*key, measured_a[key]["median_ms"], measured_b[key]["median_ms"])
              for key in measured_a if key in measured_b and measured_b[key]["median_ms"] > 0]
    return ratios, len(measured_a.keys() - measured_b.keys()), len(measured_b.keys() - measured_a.keys())


def geometric_mean(values: list[float]) -> float:
    """The geometric mean of positive values (``ValueError`` for none)."""
    if not values:
        raise ValueError("geometric mean of no values")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _describe(payload: dict) -> str:
    meta = payload["metadata"]
    git = meta.get("git") or {}
    commit = (git.get("commit") or "no commit")[:10] + (" (dirty)" if git.get("dirty") else "")
    return (f"{meta.get('device_name', '?')}, torch {(meta.get('versions') or {}).get('torch', '?')}, "
            f"{commit}, {meta.get('created_utc', '?')}, preset {meta.get('preset', '?')}")


def format_comparison(path_a: pathlib.Path, path_b: pathlib.Path) -> str:
    """The comparison of two result files as text: one line per matched row, then geometric means."""
    a, b = load_json(path_a), load_json(path_b)
    ratios, only_a, only_b = compare_rows(a["rows"], b["rows"])
    lines = [f"A: {path_a}: {_describe(a)}", f"B: {path_b}: {_describe(b)}"]
    if a["metadata"].get("device_name") != b["metadata"].get("device_name"):
        lines.append("note: A and B were measured on different devices")
    if not ratios:
        lines.append("no measurement appears in both files (matched on suite, provider, mode, config)")
        return "\n".join(lines) + "\n"
    header = ("suite", "config", "mode", "provider", "A ms", "B ms", "speed-up B/A")
    table = [(r.suite, r.config, r.mode, r.provider, f"{r.a_ms:.2f}", f"{r.b_ms:.2f}", f"{r.speedup:.2f}x")
             for r in ratios]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines += ["", fmt(header), fmt(["-" * w for w in widths])] + [fmt(t) for t in table]
    lines += ["", "geometric mean of the speed-ups (B over A):"]
    groups: dict[tuple[str, str], list[float]] = {}
    for r in ratios:
        groups.setdefault((r.suite, r.provider), []).append(r.speedup)
    for (suite, provider), values in groups.items():
        lines.append(f"  {suite:<12} {provider:<22} {geometric_mean(values):.2f}x over {len(values)} rows")
    lines.append(f"  {'all':<12} {'':<22} {geometric_mean([r.speedup for r in ratios]):.2f}x over {len(ratios)} rows")
    if only_a or only_b:
        lines.append(f"not compared: {only_a} rows only in A, {only_b} only in B")
    return "\n".join(lines) + "\n"
