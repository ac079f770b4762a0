"""``python -m fastadapter.kernels.report``: compile the Triton kernels ahead of time and report what the compiler
made of them (no GPU needed).

    python -m fastadapter.kernels.report                        # the matrix: sm_80/86/89/90 × fp16/bf16/fp32 × D
    python -m fastadapter.kernels.report --json FILE            # the same rows saved as JSON
    python -m fastadapter.kernels.report --archs sm_90 --dtypes bf16 --head-dims 128
    python -m fastadapter.kernels.report --code-paths           # the other compile-time branches (varlen, ...)
    python -m fastadapter.kernels.report --decode               # the split-KV decode kernels (sm_80, sm_90)

Every row is one compiled (kernel, configuration, arch, dtype, head_dim) with registers, spill bytes and shared
bytes read from the cubin and whether the backend may launch it, or, where no configuration of a kernel fits, a
``declined`` row with the backend's reason.
"""
from __future__ import annotations

import argparse
import sys
import time

from .aot_compile import (MATRIX_ARCHS, MATRIX_DTYPES, MATRIX_HEAD_DIMS, DTYPE_NAMES, compile_code_paths,
                          compile_matrix, default_workers, dtype_of, write_json)


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table, one line per compiled configuration or declined combination."""
    last = ("inputs" if rows and ("code_path" in rows[0] or "shape" in rows[0])
            else ("S" if rows and "seqlens" in rows[0] else "launch"))
    header = ("kernel", "config", "arch", "dtype", "D", "regs", "spill B", "shared B", "tensor cores", last)

    def cells(r):
        if r.get("config") is None:
            return [r["kernel"], "-", r["arch"], r.get("dtype", ""), str(r.get("head_dim", "")), "-", "-", "-", "-",
                    "declined: " + r["declined"]]
        if "code_path" in r:
            tail = r["code_path"]
        elif "shape" in r:  # decode kernels: the launch shape and its splits
            tail = r["shape"]
        elif "seqlens" in r:
            tail = ",".join(str(s) for s in r["seqlens"])
        else:
            tail = "yes" if r.get("launches") else f"no ({r.get('rejected', '')})"
        return [r["kernel"], r["config"], r["arch"], r.get("dtype", ""), str(r.get("head_dim", "")),
                str(r["registers"]), str(r["spill_bytes"]), str(r["shared_bytes"]),
                ",".join(r.get("tensor_cores", [])) or "none", tail]

    lines = [cells(r) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cs: "  ".join(c.ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def summary(rows: list[dict]) -> str:
    """Configurations kept per (arch, dtype, head dim) and kernel, and the declined combinations."""
    combos: dict[tuple, dict[str, list[str]]] = {}
    for r in rows:
        per_kernel = combos.setdefault((r["arch"], r["dtype"], r["head_dim"]), {})
        kept = per_kernel.setdefault(r["kernel"], [])
        if r.get("launches"):
            kept.append(r["config"])
    lines = []
    for (arch, dtype, head_dim), per_kernel in sorted(combos.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        counts = ", ".join(f"{k} {len(v)}" for k, v in per_kernel.items())
        declined = [k for k, v in per_kernel.items() if not v]
        state = f"declined ({', '.join(declined)})" if declined else "runs"
        lines.append(f"{arch} {dtype} D={head_dim}: {state}; configurations kept: {counts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastadapter.kernels.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=None,
                        help=f"target architectures (default: {' '.join(MATRIX_ARCHS)}; sm_80 sm_90 with --decode)")
    parser.add_argument("--dtypes", nargs="+", default=[DTYPE_NAMES[d] for d in MATRIX_DTYPES],
                        choices=sorted(DTYPE_NAMES.values()))
    parser.add_argument("--head-dims", nargs="+", type=int, default=list(MATRIX_HEAD_DIMS))
    parser.add_argument("--json", metavar="FILE", help="save the rows as JSON to FILE (and print the summary)")
    parser.add_argument("--cubins", action="store_true", help="with --json: include the cubins (base64)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel compile processes")
    parser.add_argument("--matrix", action="store_true", help="the compile matrix (the default)")
    parser.add_argument("--code-paths", action="store_true",
                        help="compile the branches the matrix does not take, in the first configuration")
    parser.add_argument("--decode", action="store_true",
                        help="the split-KV decode kernels (kernels/decode.py), bf16 D = 128 P = 10 (LLaMA-7B)")
    args = parser.parse_args(argv)
    if args.archs is None:
        args.archs = ["sm_80", "sm_90"] if args.decode else list(MATRIX_ARCHS)
    start = time.perf_counter()
    if args.decode:
        from .decode import compile_decode_kernels
        rows = compile_decode_kernels(tuple(args.archs))
    elif args.code_paths:
        rows = compile_code_paths(args.archs[0])
    else:
        rows = compile_matrix(tuple(args.archs), tuple(dtype_of(d) for d in args.dtypes), tuple(args.head_dims),
                              workers=args.workers)
    elapsed = time.perf_counter() - start
    if args.json:
        write_json(rows, args.json, cubins=args.cubins)
    else:
        print(format_table(rows))
    if not (args.code_paths or args.decode):
        compiled = [r for r in rows if r.get("config") is not None]
        spills = [r for r in compiled if r["spill_bytes"]]
        print(("\n" if not args.json else "") + summary(rows), file=sys.stderr if args.json else sys.stdout)
        print(f"{len(compiled)} binaries ({len(spills)} spill, never launched) in {elapsed:.0f} s",
              file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
