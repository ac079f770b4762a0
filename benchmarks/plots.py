"""PNG plots of benchmark results (matplotlib, no display needed).

* ``<stem>-ops-time.png``: op time vs sequence length, one panel per mode, one line per provider (median, with
  the p20–p80 band).
* ``<stem>-ops-memory.png``: peak memory of forward+backward and bytes saved for the backward vs sequence length.
* ``<stem>-ops-sweeps.png``: forward+backward time along the other sweeps (batch, GQA, prefix), when run.
* ``<stem>-models.png``: model-level suites (generation, training, ...) as bars per provider: tokens/s when the
  rows have it, otherwise time.
"""
from __future__ import annotations

import pathlib
from typing import Optional

from .report import is_measured

_MODES = ("forward", "backward", "forward+backward")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt
    return plt


def _code_and_date(metadata: dict) -> str:
    """``commit abc1234 (dirty) · 2026-12-01``, or the fastadapter version when no git checkout made the run."""
    git = metadata.get("git") or {}
    if git.get("commit"):
        code = f"commit {git['commit'][:10]}" + (" (dirty)" if git.get("dirty") else "")
    else:
        code = f"fastadapter {(metadata.get('versions') or {}).get('fastadapter') or '?'} (no git checkout)"
    when = (metadata.get("created_utc") or "")[:10]
    return f"{code} · {when}" if when else code


def _title(metadata: dict, what: str, two_lines: bool = False) -> str:
    """``what — machine`` and, on the next line, the commit and date that made the figures; ``what`` on a line
    of its own for a figure too narrow for one line."""
    machine = metadata.get("device_name", metadata.get("device", "unknown machine"))
    head = f"{what}\n{machine}" if two_lines else f"{what} — {machine}"
    return f"{head}\n{_code_and_date(metadata)}"


_MARKERS = "osD^vP*X<>"


def _style(provider: str, providers: list[str]) -> dict:
    """The same colour, marker and line style for a provider in every panel (lines that coincide stay visible:
    two providers computing the same kernels draw one dashed over the other)."""
    i = providers.index(provider)
    return {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)], "linestyle": ("-", "--", ":")[i % 3],
            "label": provider}


def _log2_axis(ax, xs) -> None:
    """A log₂ x axis labelled with the values themselves (128, 256, ...) rather than powers of two."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    from matplotlib.ticker import NullLocator
    ax.xaxis.set_minor_locator(NullLocator())


def _series(rows: list[dict], y: str) -> dict[str, list[tuple[float, dict]]]:
    """``{provider: [(x, row), ...]}`` sorted by x, for rows having ``y``."""
    series: dict[str, list[tuple[float, dict]]] = {}
    for row in rows:
        if row.get(y) is not None:
            series.setdefault(row["provider"], []).append((row["x"], row))
    return {p: sorted(points, key=lambda point: point[0]) for p, points in series.items()}


def plot_op_times(rows: list[dict], metadata: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """Time vs sequence length per provider, a panel per mode (the ``seqlen`` sweep of the ops suite)."""
    sweep = [r for r in rows if r.get("suite") == "ops" and r.get("sweep") == "seqlen" and is_measured(r)]
    if not sweep:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(_MODES), figsize=(5 * len(_MODES), 4.2), squeeze=False)
    providers = list(dict.fromkeys(r["provider"] for r in sweep))
    for ax, mode in zip(axes[0], _MODES):
        for provider, points in _series([r for r in sweep if r["mode"] == mode], "median_ms").items():
            xs = [x for x, _ in points]
            style = _style(provider, providers)
            ax.plot(xs, [r["median_ms"] for _, r in points], **style)
            ax.fill_between(xs, [r["p20_ms"] for _, r in points], [r["p80_ms"] for _, r in points],
                            color=style["color"], alpha=0.2)
        ax.set(title=mode, xlabel="sequence length", ylabel="time (ms, median; band p20–p80)", yscale="log")
        _log2_axis(ax, [r["x"] for r in sweep])
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    config = sweep[0]
    fig.suptitle(_title(metadata, f"zero-init attention, B={config['batch']} Hq={config['heads_q']} "
                                  f"Hkv={config['heads_kv']} D={config['head_dim']} P={config['prefix_len']} "
                                  f"{config['dtype']}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_op_memory(rows: list[dict], metadata: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """Peak memory (forward+backward) and bytes saved for the backward vs sequence length, per provider."""
    sweep = [r for r in rows if r.get("suite") == "ops" and r.get("sweep") == "seqlen" and is_measured(r)
             and r["mode"] == "forward+backward" and r.get("peak_mem_mb") is not None]
    if not sweep:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    providers = list(dict.fromkeys(r["provider"] for r in sweep))
    for ax, field, label in ((axes[0], "peak_mem_mb", "peak memory of forward+backward (MiB)"),
                             (axes[1], "saved_bytes", "saved for backward (MiB)")):
        for provider, points in _series(sweep, field).items():
            scale = 1 / 2**20 if field == "saved_bytes" else 1.0
            ax.plot([x for x, _ in points], [r[field] * scale for _, r in points], **_style(provider, providers))
        ax.set(xlabel="sequence length", ylabel=label, yscale="log")
        _log2_axis(ax, [r["x"] for r in sweep])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(metadata, "zero-init attention memory (beyond the inputs)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_op_sweeps(rows: list[dict], metadata: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """Forward+backward time along every ops sweep other than sequence length (batch, GQA, prefix)."""
    measured = [r for r in rows if r.get("suite") == "ops" and r.get("sweep") not in (None, "seqlen")
                and r["mode"] == "forward+backward" and is_measured(r)]
    sweeps = list(dict.fromkeys(r["sweep"] for r in measured))
    if not sweeps:
        return None
    plt = _pyplot()
    # Constrained layout keeps room for the suptitle above the panels (tight_layout lets them overlap); the
    # default run has one sweep (GQA), a 6-inch figure whose title goes on two lines to fit its width.
    fig, axes = plt.subplots(1, len(sweeps), figsize=(max(6.0, 5 * len(sweeps)), 4.6), squeeze=False,
                             layout="constrained")
    for ax, sweep in zip(axes[0], sweeps):
        sweep_rows = [r for r in measured if r["sweep"] == sweep]
        providers = list(dict.fromkeys(r["provider"] for r in sweep_rows))
        for provider, points in _series(sweep_rows, "median_ms").items():
            ax.plot([x for x, _ in points], [r["median_ms"] for _, r in points], **_style(provider, providers))
        ax.set(title=f"{sweep} sweep (forward+backward)", xlabel=sweep_rows[0]["x_axis"], ylabel="time (ms)",
               yscale="log")
        ax.set_xticks(sorted({r["x"] for r in sweep_rows}))  # the values run, not 7.6 … 8.4 around one point
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(metadata, "zero-init attention sweeps", two_lines=len(sweeps) < 3))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_model_level(rows: list[dict], metadata: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """One bar panel per (suite, mode) of the model-level suites: tokens/s when present, else median time."""
    measured = [r for r in rows if r.get("suite") != "ops" and is_measured(r)]
    panels = list(dict.fromkeys((r["suite"], r["mode"], r["config"]) for r in measured))
    if not panels:
        return None
    plt = _pyplot()
    columns = min(3, len(panels))
    lines = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(5 * columns, 4.2 * lines), squeeze=False)
    for ax, (suite, mode, config) in zip(axes.flat, panels):
        panel = [r for r in measured if (r["suite"], r["mode"], r["config"]) == (suite, mode, config)]
        use_tokens = all(r.get("tokens_per_s") is not None for r in panel)
        values = [r["tokens_per_s"] if use_tokens else r["median_ms"] for r in panel]
        bars = ax.bar(range(len(panel)), values, color=[f"C{i}" for i in range(len(panel))])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(panel)), [r["provider"] for r in panel], rotation=20, ha="right", fontsize=8)
        ax.set(title=f"{suite}: {mode}\n{config}", ylabel="tokens/s (higher is better)" if use_tokens
               else "time (ms, lower is better)")
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(_title(metadata, "model level"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(rows: list[dict], metadata: dict, out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    """Every plot the rows allow, as ``out_dir/<stem>-<plot>.png``; returns the files written."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [plot(rows, metadata, out_dir / f"{stem}-{suffix}.png")
             for plot, suffix in ((plot_op_times, "ops-time"), (plot_op_memory, "ops-memory"),
                                  (plot_op_sweeps, "ops-sweeps"), (plot_model_level, "models"))]
    return [p for p in drawn if p is not None]
