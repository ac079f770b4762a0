"""What a result file says about where it was measured: device, machine, library versions, git commit."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
from typing import Optional

import torch

#: Libraries whose versions change the figures.
LIBRARIES = ("torch", "triton", "transformers", "peft", "flash-attn", "xformers", "numpy", "fastadapter")

_REPO = pathlib.Path(__file__).resolve().parents[1]


def library_versions() -> dict[str, Optional[str]]:
    """Installed version of each of :data:`LIBRARIES` (None when it is not installed)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


#: Folders whose untracked files change what is measured: a new source file (a kernel, a backend, a suite) not
#: yet committed makes the figures those of no commit. Result files (``benchmarks/results/``) do not count.
SOURCE_FOLDERS = ("fastadapter", "csrc", "kernels", "benchmarks")
_NOT_SOURCE = ("benchmarks/results",)
#: At most this many untracked file names are recorded (their count always is).
UNTRACKED_LISTED = 10


def git_commit(repo: pathlib.Path = _REPO) -> dict[str, Optional[object]]:
    """The state of the checkout holding the benchmarks: ``{"commit": sha or None, "dirty": bool or None,
    "untracked": [names], "untracked_count": int}``.

    ``dirty`` is true when a tracked file is modified or staged, or when an untracked, non-ignored file lies under
    :data:`SOURCE_FOLDERS` (``benchmarks/results/`` aside); the first :data:`UNTRACKED_LISTED` such files are
    named in ``untracked`` (paths relative to the repository root).
    """
    def git(*args) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None, "untracked": [], "untracked_count": 0}
    status = git("status", "--porcelain", "--untracked-files=no")
    # Paths relative to the repository root whatever folder ``repo`` names (--full-name), ignored files left out.
    others = git("ls-files", "--others", "--exclude-standard", "--full-name", "--", *(
        f":(top){folder}" for folder in SOURCE_FOLDERS), *(f":(top,exclude){path}" for path in _NOT_SOURCE))
    untracked = sorted(others.splitlines()) if others else []
    dirty = None if status is None or others is None else bool(status) or bool(untracked)
    return {"commit": commit, "dirty": dirty, "untracked": untracked[:UNTRACKED_LISTED],
            "untracked_count": len(untracked)}


def _cpu_description() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["simd"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    meminfo = pathlib.Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    return info


def device_description(device) -> dict:
    """The device the figures were measured on: ``{"device", "device_name", ...}``."""
    device = torch.device(device)
    description = {"device": str(device), **_cpu_description()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        description.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                           compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        simd = ", AVX-512" if "avx512f" in description.get("simd", []) else ""
        memory = f", {description['memory_gib']:.0f} GiB" if "memory_gib" in description else ""
        description["device_name"] = f"{description['cpu']} ({description['cores']} cores{simd}{memory})"
    return description


def collect_metadata(device, preset: str, argv: Optional[list[str]] = None) -> dict:
    """Everything a result file records besides its rows."""
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "preset": preset,
        "command": " ".join(argv if argv is not None else sys.argv),
        **device_description(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "git": git_commit(),
    }


def save_text_report(out: pathlib.Path, lines: list[str], suite: str, argv: Optional[list[str]]) -> None:
    """Write a printed report's ``lines`` to ``out`` and the run's metadata (:func:`collect_metadata` on the CPU,
    with the command line ``argv``, default ``sys.argv[1:]``) beside it as ``out`` with suffix ``.json``."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    metadata = collect_metadata("cpu", suite, argv if argv is not None else sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    print(f"\nsaved {out} and {out.with_suffix('.json')}")
