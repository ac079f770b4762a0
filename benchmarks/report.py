"""Benchmark results as text tables, JSON and CSV.

A result file (JSON) is ``{"metadata": {...}, "rows": [...], "errors": [...]}``: the metadata of
:mod:`benchmarks.metadata`, the flat rows of every suite (``suite, provider, mode, config, median_ms, p20_ms,
p80_ms`` and optional ``tflops, peak_mem_mb, saved_bytes, tokens_per_s, skipped``), and the suites that failed
with their error. The CSV holds the same rows, one column per field, the metadata repeated in leading columns
(device name, git commit) so that a spreadsheet row is self-describing.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Iterable, Optional

#: Leading columns of the CSV, in order; any other field follows alphabetically.
CSV_FIRST = ("suite", "provider", "mode", "config", "median_ms", "p20_ms", "p80_ms", "runs", "tflops",
             "peak_mem_mb", "saved_bytes", "tokens_per_s", "skipped")
#: Metadata repeated on every CSV row.
CSV_METADATA = ("device_name", "git_commit", "torch")


def is_measured(row: dict) -> bool:
    """True for a row with a time (not a skipped shape)."""
    return row.get("median_ms") is not None and not row.get("skipped")


def group_key(row: dict) -> tuple:
    """Rows of one comparison: same suite, shape and mode, different providers."""
    return (row.get("suite"), row.get("config"), row.get("mode"))


def _number(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)) and abs(value) >= 10 ** (digits + 3):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    """A fixed-width table per suite: time (median, p20–p80), TFLOP/s, memory, tokens/s, and the speed-up over
    the first provider measured for the same shape and mode (the suites list their baseline first).

    Skipped shapes are listed after each table with their reason, once per provider and reason.
    """
    out = []
    suites = list(dict.fromkeys(r.get("suite") for r in rows))
    for suite in suites:
        suite_rows = [r for r in rows if r.get("suite") == suite]
        measured = [r for r in suite_rows if is_measured(r)]
        first_time: dict[tuple, tuple[str, float]] = {}
        for r in measured:
            first_time.setdefault(group_key(r), (r["provider"], r["median_ms"]))
        header = ["config", "mode", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "GEMM GFLOP/s", "% GEMM",
                  "peak MB", "saved MB", "tokens/s", "agree", "speed-up"]
        lines = []
        for r in measured:
            base_provider, base_ms = first_time[group_key(r)]
            speedup = "1.00x (base)" if base_provider == r["provider"] else f"{base_ms / r['median_ms']:.2f}x"
            saved = r.get("saved_bytes")
            lines.append([str(r.get("config", "")), str(r.get("mode", "")), str(r["provider"]),
                          _number(r["median_ms"], 2),
                          "-" if r.get("p20_ms") is None else
                          f"{_number(r['p20_ms'], 2)}-{_number(r.get('p80_ms'), 2)}",
                          _number(r.get("tflops"), 3), _number(r.get("peak_gflops"), 1),
                          _number(r.get("pct_of_peak"), 1), _number(r.get("peak_mem_mb"), 1),
                          _number(None if saved is None else saved / 2**20, 1), _number(r.get("tokens_per_s"), 1),
                          _number(r.get("agree"), 2), speedup])
        # Drop the columns no row of this suite fills.
        keep = [i for i, h in enumerate(header) if i < 4 or any(line[i] != "-" for line in lines)]
        header = [header[i] for i in keep]
        lines = [[line[i] for i in keep] for line in lines]
        widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

        def fmt(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out.append(f"== {suite} ==")
        if lines:
            out += [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
        skipped = dict.fromkeys((r["provider"], r["skipped"]) for r in suite_rows if r.get("skipped"))
        every_config = {r.get("config") for r in suite_rows}
        for provider, reason in skipped:
            configs = {r.get("config") for r in suite_rows
                       if r.get("skipped") == reason and r["provider"] == provider}
            where = "every shape" if configs == every_config and len(configs) > 1 else ", ".join(sorted(configs))
            out.append(f"  skipped {provider} on {where}: {reason}")
        if "speed-up" in header:
            out.append("  (speed-up: the first provider's median time over this provider's, same shape and mode)")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_json(path: pathlib.Path, metadata: dict, rows: list[dict], errors: Optional[list[dict]] = None) -> None:
    """Write a result file (see the module docstring)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metadata": metadata, "rows": rows, "errors": errors or []}
    path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def load_json(path: pathlib.Path) -> dict:
    """Read a result file; ``ValueError`` saying what is missing when it is not one."""
    path = pathlib.Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no benchmark result file at {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}); expected a file written by `fastadapter bench`") from None
    if not isinstance(payload, dict) or "rows" not in payload or "metadata" not in payload:
        raise ValueError(f"{path} is not a benchmark result: expected an object with 'metadata' and 'rows'")
    return payload


def csv_columns(rows: Iterable[dict]) -> list[str]:
    """The CSV header: :data:`CSV_FIRST`, then every other field of the rows alphabetically, then metadata."""
    fields = set()
    for row in rows:
        fields.update(row)
    rest = sorted(fields - set(CSV_FIRST))
    return list(CSV_FIRST) + rest + list(CSV_METADATA)


def write_csv(path: pathlib.Path, metadata: dict, rows: list[dict]) -> None:
    """Write the rows as CSV (see the module docstring)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repeated = {"device_name": metadata.get("device_name"), "git_commit": (metadata.get("git") or {}).get("commit"),
                "torch": (metadata.get("versions") or {}).get("torch")}
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(rows), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **repeated})


def _markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in lines])


def format_markdown(payload: dict) -> str:
    """A README section from a result file: the ops seqlen sweep (time per mode, memory) with providers as
    columns, then every model-level suite with tokens/s and speed-ups."""
    meta, rows = payload["metadata"], [r for r in payload["rows"] if is_measured(r)]
    versions = meta.get("versions") or {}
    commit = ((meta.get("git") or {}).get("commit") or "?")[:10]
    out = [f"Measured on {meta.get('device_name', '?')}, torch {versions.get('torch', '?')}, "
           f"`{meta.get('command', 'fastadapter bench')}` at {commit} ({meta.get('created_utc', '?')})."]
    sweep = [r for r in rows if r.get("suite") == "ops" and r.get("sweep") == "seqlen"]
    if sweep:
        providers = list(dict.fromkeys(r["provider"] for r in sweep))
        seqlens = sorted({r["seqlen"] for r in sweep})
        cell = {(r["mode"], r["seqlen"], r["provider"]): r for r in sweep}
        first = sweep[0]
        shape = (f"B={first['batch']}, Hq={first['heads_q']}, Hkv={first['heads_kv']}, D={first['head_dim']}, "
                 f"P={first['prefix_len']}, {first['dtype']}, causal")
        for mode in ("forward", "backward", "forward+backward"):
            out += ["", f"**{mode}**, median ms ({shape}; `-`: skipped, see the JSON):", ""]
            out += _markdown_table(["S"] + providers, [[str(s)] + [
                _number(cell[(mode, s, p)]["median_ms"], 1) if (mode, s, p) in cell else "-" for p in providers]
                for s in seqlens])
        out += ["", "**memory of forward+backward**, peak MiB / saved for backward MiB:", ""]
        out += _markdown_table(["S"] + providers, [[str(s)] + [
            (f"{_number(cell[key].get('peak_mem_mb'), 0)} / {_number(cell[key]['saved_bytes'] / 2**20, 0)}"
             if (key := ("forward+backward", s, p)) in cell and cell[key].get("saved_bytes") is not None else "-")
            for p in providers] for s in seqlens])
    for suite in dict.fromkeys(r["suite"] for r in rows if r["suite"] != "ops"):
        suite_rows = [r for r in rows if r["suite"] == suite]
        first_time: dict[tuple, float] = {}
        for r in suite_rows:
            first_time.setdefault(group_key(r), r["median_ms"])
        out += ["", f"**{suite}** (speed-up over the first provider of each line group):", ""]
        out += _markdown_table(["config", "mode", "provider", "median ms", "tokens/s", "speed-up"], [
            [r["config"], r["mode"], r["provider"], _number(r["median_ms"], 1), _number(r.get("tokens_per_s"), 1),
             f"{first_time[group_key(r)] / r['median_ms']:.2f}x"] for r in suite_rows])
    return "\n".join(out) + "\n"


def suite_main(run, description: str, quick_help: str, argv=None) -> int:
    """The command line of a CPU suite module run on its own (``python -m benchmarks.bench_<name>``): ``--quick``
    and ``--out FILE``; prints the table (with each provider's speed-up over the first) and writes the rows with
    the machine's metadata to ``FILE`` when given. ``run(quick, device)`` is the suite's own."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", help="also write the rows, with the machine's metadata, to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.quick, "cpu")
    print(format_table(rows))
    if args.out:
        from .metadata import collect_metadata
        write_json(args.out, collect_metadata("cpu", "quick" if args.quick else "default", argv), rows)
    return 0
