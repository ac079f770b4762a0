"""Two builds of the CPU kernels timed side by side: ``python -m benchmarks.cpu_build_ab``.

On a shared machine, one build run as two processes gives timings further apart than most changes to the kernels
(A/A runs on a 2-core Xeon: 47 and 64 ms for the same bf16 forward). So the base build is loaded into this process
beside this checkout's: its ops are registered under another namespace (``fastadapter_cpu_base``), and each round
runs every build's raw ops (forward, or forward then backward: no autograd, no Python wrappers) ``--iters`` times in
turn, the order alternating from round to round. The table gives each build's median milliseconds and the median
and range of the per-round ratios base / this.

    python -m benchmarks.cpu_build_ab --make-base 58a986e --configs bf16:8:512:fb bf16:32:512:fwd
    python -m benchmarks.cpu_build_ab --configs fp32:8:1024:fb      # again, against the base built before

``--processes`` runs each build in a fresh process of its own instead, every round (warm-up calls first): memory a
build keeps between calls (csrc/workspace.h) changes how the allocator serves the other build in a shared process,
so a change to what the kernels allocate is measured this way. ``--before`` says what runs, untimed, before every
timed call: nothing (back to back, the default), ``cache-flush`` (the CPU caches evicted: the operands come from
memory), ``linear`` (a linear layer's forward and backward on the same rows, as a model's other layers run between
two attention calls) or ``sdpa`` (two SDPA calls' forward and backward on the same shape, as in
``benchmarks.cpu_kernel_targets``). What the kernels allocate and how much memory they touch weigh differently
after each.

A config is ``dtype:Hkv:S:mode`` (dtype fp32 or bf16, mode fwd or fb) at B = 1, Hq = 32, D = 128, P = 10, causal.
``--make-base`` checks the commit out into a temporary git worktree, renames the op namespace there and builds it
in place (the compiler and this torch, about a minute) and saves the library outside the checkout
(``--base-library``, by default in the temporary directory); nothing in this checkout changes.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from .metadata import save_text_report

BASE_NAMESPACE = "fastadapter_cpu_base"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fb")
REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    """One timed call: LLaMA-7B heads (B = 1, Hq = 32, D = 128, P = 10), ``heads_kv`` kv heads, length ``seqlen``."""

    dtype: str
    heads_kv: int
    seqlen: int
    mode: str

    @classmethod
    def parse(cls, text: str) -> "Config":
        """``dtype:Hkv:S:mode``, e.g. ``bf16:8:512:fb``; a ValueError says what was wrong."""
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError(f"a config is dtype:Hkv:S:mode (e.g. bf16:8:512:fb), got {text!r}")
        dtype, heads_kv, seqlen, mode = parts
        if dtype not in DTYPES or mode not in MODES or not heads_kv.isdigit() or not seqlen.isdigit():
            raise ValueError(f"config {text!r}: dtype must be one of {sorted(DTYPES)}, mode one of {list(MODES)}, "
                             "Hkv and S positive integers")
        if int(heads_kv) == 0 or 32 % int(heads_kv) or int(seqlen) == 0:
            raise ValueError(f"config {text!r}: Hkv must divide Hq = 32 and S must be positive")
        return cls(dtype, int(heads_kv), int(seqlen), mode)

    def label(self) -> str:
        return f"{self.dtype} Hkv={self.heads_kv:2d} S={self.seqlen:5d} {self.mode:3s}"

    def spec(self) -> str:
        """The ``dtype:Hkv:S:mode`` text :meth:`parse` reads."""
        return f"{self.dtype}:{self.heads_kv}:{self.seqlen}:{self.mode}"


def make_base(commit: str, out: pathlib.Path) -> pathlib.Path:
    """Builds ``commit``'s CPU kernels with the ops under :data:`BASE_NAMESPACE` and copies the library to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastadapter-base-") as tmp:
        tree = pathlib.Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True)
        try:
            registration = tree / "csrc" / "registration.cpp"
            text = registration.read_text()
            renamed = text.replace("TORCH_LIBRARY(fastadapter_cpu,", f"TORCH_LIBRARY({BASE_NAMESPACE},").replace(
                "TORCH_LIBRARY_IMPL(fastadapter_cpu,", f"TORCH_LIBRARY_IMPL({BASE_NAMESPACE},")
            if renamed == text:
                raise RuntimeError(f"{commit}: csrc/registration.cpp has no TORCH_LIBRARY(fastadapter_cpu, ...)")
            registration.write_text(renamed)
            print(f"building {commit} in {tree} ...", flush=True)
            subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree, check=True)
            built = sorted((tree / "fastadapter").glob("_C*.so"))
            if not built:
                raise RuntimeError(f"{commit}: the build left no fastadapter/_C*.so")
            shutil.copyfile(built[0], out)
            described = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], check=True,
                                       capture_output=True, text=True).stdout.strip()
            _commit_file(out).write_text(described + "\n")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"saved {out}")
    return out


def _commit_file(library: pathlib.Path) -> pathlib.Path:
    """Where make_base records which commit a base library was built from (beside it)."""
    return library.with_name(library.name + ".commit")


def base_description(library: pathlib.Path) -> str:
    """The commit ``library`` was built from (as make_base recorded it), or its path when nothing was recorded."""
    recorded = _commit_file(library)
    return recorded.read_text().strip() if recorded.is_file() else f"{library} (commit not recorded)"


def _inputs(config: Config) -> dict:
    generator = torch.Generator().manual_seed(0)
    dtype, hkv, s = DTYPES[config.dtype], config.heads_kv, config.seqlen

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)
    return {"q": randn(1, s, 32, 128), "k": randn(1, s, hkv, 128), "v": randn(1, s, hkv, 128),
            "prefix_k": randn(1, 10, hkv, 128), "prefix_v": randn(1, 10, hkv, 128),
            "gate": 0.5 * torch.randn(1, 32, generator=generator), "grad_out": randn(1, s, 32, 128)}


def op_call(namespace: str, config: Config, inputs: dict):
    """A call of one build's raw ops on ``inputs``: the forward, and for ``fb`` the backward after it."""
    ops = getattr(torch.ops, namespace)
    x = inputs
    ragged = (None, None, None, 0, 0)
    flags = (True, 128 ** -0.5, True)  # causal, softmax scale, tanh gate

    def call():
        out, lse_w, lse_p = ops.forward(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], x["gate"], *ragged,
                                        *flags)
        if config.mode == "fb":
            ops.backward(x["grad_out"], x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], x["gate"], out,
                         lse_w, lse_p, *ragged, *flags)
    return call


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (Linux sysfs), or 256 MiB where it cannot be read."""
    sizes = []
    for index in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=256 << 20)


class CacheFlush:
    """Evicts the CPU caches: reads and writes a buffer twice the size of the last-level cache (a fill alone would
    stream past the caches), so the next call finds its operands in memory."""

    def __init__(self):
        self.buffer = torch.zeros(2 * last_level_cache_bytes() // 4)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


#: What ``--before`` can run before every timed call.
BEFORE = ("nothing", "cache-flush", "linear", "sdpa")


def work_before(kind: str, config: Config):
    """The untimed work of ``--before kind`` for ``config``'s shape, as a callable (None for ``nothing``)."""
    if kind == "nothing":
        return None
    if kind == "cache-flush":
        return CacheFlush()
    generator = torch.Generator().manual_seed(1)
    dtype = DTYPES[config.dtype]
    if kind == "linear":  # LLaMA-7B's hidden size: a 4096 x 4096 weight on the S rows, forward and backward
        x = torch.randn(config.seqlen, 4096, generator=generator).to(dtype)
        weight = torch.randn(4096, 4096, generator=generator).to(dtype).requires_grad_(True)

        def linear() -> None:
            torch.nn.functional.linear(x, weight).sum().backward()
            weight.grad = None
        return linear
    if kind == "sdpa":
        from .baselines import two_sdpa
        x = _inputs(config)
        args = [x[name].clone().requires_grad_(True) for name in ("q", "k", "v", "prefix_k", "prefix_v")]
        gate = x["gate"].clone().requires_grad_(True)

        def sdpa() -> None:
            torch.autograd.grad(two_sdpa(*args, gate), [*args, gate], x["grad_out"])
        return sdpa
    raise ValueError(f"--before takes one of {', '.join(BEFORE)}, got {kind!r}")


def _timed(call, iters: int, before=None) -> float:
    """Milliseconds per call of ``iters`` calls; with ``before``, each call timed alone after ``before()``."""
    if before is None:
        start = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - start) / iters * 1e3
    total = 0.0
    for _ in range(iters):
        before()
        start = time.perf_counter()
        call()
        total += time.perf_counter() - start
    return total / iters * 1e3


def _rounds(rounds: int, time_build) -> dict:
    """``rounds`` rounds of ``time_build(name)`` (ms) for both builds, the order alternating: medians (ms) and the
    per-round ratios base / this."""
    ms: dict[str, list[float]] = {"base": [], "this": []}
    ratios = []
    for r in range(rounds):
        took = {}
        for name in (("base", "this") if r % 2 == 0 else ("this", "base")):
            took[name] = time_build(name)
            ms[name].append(took[name])
        ratios.append(took["base"] / took["this"])
    return {"base_ms": statistics.median(ms["base"]), "this_ms": statistics.median(ms["this"]),
            "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}


def compare(config: Config, base_namespace: str, iters: int, rounds: int, before: str = "nothing") -> dict:
    """Interleaved rounds of the two builds on one config in this process, each call after the work of ``before``
    (:data:`BEFORE`): see :func:`_rounds`."""
    inputs = _inputs(config)
    calls = {"base": op_call(base_namespace, config, inputs), "this": op_call("fastadapter_cpu", config, inputs)}
    work = work_before(before, config)
    for call in calls.values():
        call()
    return _rounds(rounds, lambda name: _timed(calls[name], iters, work))


#: Calls a fresh process makes before it starts the clock.
CHILD_WARMUP = 3


def time_in_fresh_process(build: str, config: Config, iters: int, base_library: pathlib.Path,
                          before: str = "nothing") -> float:
    """Milliseconds per call of one build's ops (``this`` or ``base``) in a new Python process that loads only that
    build, after :data:`CHILD_WARMUP` calls, each call after the work of ``before``."""
    command = [sys.executable, "-m", __spec__.name, "--child", build, "--base-library",
               str(base_library), "--configs", config.spec(), "--iters", str(iters), "--before", before]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
    return float(done.stdout.strip().splitlines()[-1])


def compare_processes(config: Config, iters: int, rounds: int, base_library: pathlib.Path,
                      before: str = "nothing") -> dict:
    """Rounds of the two builds on one config, each run in a fresh process of its own: see :func:`_rounds`."""
    return _rounds(rounds, lambda name: time_in_fresh_process(name, config, iters, base_library, before))


def _child(build: str, config: Config, iters: int, base_library: pathlib.Path, before: str) -> float:
    """What a fresh process of :func:`time_in_fresh_process` runs: ms per call of one build's ops."""
    if build == "base":
        torch.ops.load_library(str(base_library))
        namespace = BASE_NAMESPACE
    else:
        import fastadapter._C  # noqa: F401
        namespace = "fastadapter_cpu"
    call = op_call(namespace, config, _inputs(config))
    work = work_before(before, config)
    for _ in range(CHILD_WARMUP):
        if work is not None:
            work()
        call()
    return _timed(call, iters, work)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-base", metavar="COMMIT", help="build COMMIT's kernels as the base library")
    parser.add_argument("--base-library", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "fastadapter-base_C.so",
                        help="the base build's _C library (made by --make-base)")
    parser.add_argument("--configs", nargs="+", type=Config.parse, metavar="DTYPE:HKV:S:MODE",
                        default=[Config.parse(c) for c in ("bf16:8:512:fb", "bf16:32:512:fb", "bf16:8:512:fwd")])
    parser.add_argument("--iters", type=int, default=0, help="calls per build per round (0: about 0.1 s' worth)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--before", choices=BEFORE, default="nothing",
                        help="what runs, untimed, before every timed call (default: nothing, back to back)")
    parser.add_argument("--processes", action="store_true",
                        help="run each build in a fresh process of its own every round (allocator state apart)")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks/results/cpu-build-ab.txt")
    parser.add_argument("--child", choices=("base", "this"), help=argparse.SUPPRESS)  # one build, one config
    args = parser.parse_args(argv)
    if args.child:
        print(_child(args.child, args.configs[0], max(args.iters, 1), args.base_library, args.before))
        return 0
    if args.make_base:
        make_base(args.make_base, args.base_library)
    if not args.base_library.is_file():
        parser.error(f"no base library at {args.base_library}: make one with --make-base COMMIT")
    import fastadapter._C  # noqa: F401  (this checkout's ops: torch.ops.fastadapter_cpu)
    torch.ops.load_library(str(args.base_library))
    if not hasattr(getattr(torch.ops, BASE_NAMESPACE), "forward"):
        parser.error(f"{args.base_library} registers no {BASE_NAMESPACE} ops: make it with --make-base COMMIT")
    how = ("in a fresh process each (after {} warm-up calls)".format(CHILD_WARMUP) if args.processes
           else "in this process")
    how += {"nothing": ", back to back",
            "cache-flush": f", each call after the caches are evicted ({2 * last_level_cache_bytes() >> 20} MiB read "
                           "and written)",
            "linear": ", each call after a 4096 x 4096 linear's forward and backward on its S rows",
            "sdpa": ", each call after two SDPA calls' forward and backward on its shape"}[args.before]
    lines = [f"base {base_description(args.base_library)} against this checkout; {torch.get_num_threads()} threads; "
             f"each round runs both builds' raw ops in turn, the order alternating, {how}",
             "config                      |  base ms   this ms | base/this median  (range)"]
    print("\n".join(lines), flush=True)
    for config in args.configs:
        iters = args.iters
        if iters <= 0:  # about 0.1 s of the base build per round
            call = op_call(BASE_NAMESPACE, config, _inputs(config))
            call()
            start = time.perf_counter()
            call()
            iters = max(1, round(0.1 / (time.perf_counter() - start)))
        row = (compare_processes(config, iters, args.rounds, args.base_library, args.before) if args.processes
               else compare(config, BASE_NAMESPACE, iters, args.rounds, args.before))
        lines.append(f"{config.label()} | {row['base_ms']:8.2f}  {row['this_ms']:8.2f} | {row['ratio']:.3f}  "
                     f"({row['low']:.2f}-{row['high']:.2f})")
        print(lines[-1], flush=True)
    save_text_report(args.out, lines, "cpu-build-ab", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
