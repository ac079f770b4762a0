"""PNG plots of benchmark results (matplotlib, no display needed).

* ``<stem>-ops-time.png``: op time vs sequence length, one panel per mode, one line per provider (median, with
  the p20–p80 band).
* ``<stem>-ops-memory.png``: peak memory of forward+backward and bytes saved for the backward vs sequence length.
* ``<stem>-ops-sweeps.png``: forward+backward time along the other sweeps (batch, GQA, prefix), when run.
* ``<stem>-<suite>.png``: one figure per model-level suite (training, generation, ...), the question it answers
  as its title: each provider's speed-up over the suite's baseline, per mode and shape (higher is better).
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


#: The question each model-level suite's figure answers (a suite not named here gets a generic title).
SUITE_QUESTIONS = {
    "training": "How much faster is a training step than PEFT's?",
    "generation": "How much faster does the thin model generate than Hugging Face + PEFT?",
    "peft_accelerate": "How much faster does PEFT run after fastadapter.integrations.peft.accelerate?",
    "multimodal": "How much faster is a multimodal training step than the eager baseline?",
    "decode_linear": "How much faster are a decoding step's linear layers than F.linear?",
}


def speedup_groups(rows: list[dict], suite: str) -> list[tuple[str, str, list[tuple[str, float]]]]:
    """``[(mode, config, [(provider, speed-up over the group's baseline), ...]), ...]`` of ``suite``'s measured
    rows, in the order the suite wrote them. The baseline of a (mode, config) group is its first provider, as in
    the tables; the speed-up is the baseline's median time over the provider's (higher is better)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("suite") == suite and is_measured(row):
            groups.setdefault((row["mode"], row["config"]), []).append(row)
    out = []
    for (mode, config), members in groups.items():
        base = members[0]["median_ms"]
        out.append((mode, config, [(r["provider"], base / r["median_ms"]) for r in members if r["median_ms"] > 0]))
    return out


def plot_suite_speedups(rows: list[dict], metadata: dict, suite: str, path: pathlib.Path
                        ) -> Optional[pathlib.Path]:
    """One figure for one model-level suite: a horizontal bar per provider and (mode, shape), its speed-up over
    the group's baseline (the first provider), with a line at 1×: every bar reads "higher is better"."""
    groups = speedup_groups(rows, suite)
    if not groups:
        return None
    plt = _pyplot()
    providers = list(dict.fromkeys(p for _, _, bars in groups for p, _ in bars))
    height = 0.8 / max(len(bars) for _, _, bars in groups)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.5 * sum(len(bars) for _, _, bars in groups)), layout="constrained")
    labels = []
    drawn = set()
    for g, (mode, config, bars) in enumerate(groups):
        baseline = bars[0][0]
        labels.append(f"{mode}\n{config}\n(vs {baseline})")
        for i, (provider, speedup) in enumerate(bars):
            colour = f"C{providers.index(provider) % 10}"
            y = g + (i - (len(bars) - 1) / 2) * height
            bar = ax.barh(y, speedup, height=height * 0.9, color=colour,
                          label=provider if provider not in drawn else None)
            drawn.add(provider)
            ax.bar_label(bar, [f"{speedup:.2f}×"], padding=3, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(groups)), labels, fontsize=7)
    ax.invert_yaxis()  # the suite's first group on top
    ax.set_xlabel("speed-up over the baseline (median time; higher is better)")
    ax.set_xlim(0, 1.18 * max(s for _, _, bars in groups for _, s in bars))
    fig.legend(loc="outside lower center", ncols=min(len(providers), 4), fontsize=8)  # never over a bar
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(_title(metadata, SUITE_QUESTIONS.get(suite, f"{suite}: speed-up over the baseline"),
                        two_lines=True), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(rows: list[dict], metadata: dict, out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    """Every plot the rows allow, as ``out_dir/<stem>-<plot>.png``; returns the files written."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [plot(rows, metadata, out_dir / f"{stem}-{suffix}.png")
             for plot, suffix in ((plot_op_times, "ops-time"), (plot_op_memory, "ops-memory"),
                                  (plot_op_sweeps, "ops-sweeps"))]
    for suite in dict.fromkeys(r.get("suite") for r in rows if r.get("suite") not in (None, "ops")):
        drawn.append(plot_suite_speedups(rows, metadata, suite, out_dir / f"{stem}-{suite}.png"))
    return [p for p in drawn if p is not None]
