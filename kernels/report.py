"""``python -m fastadapter.kernels.report``: print the ahead-of-time compile report of the Triton kernels.

    python -m fastadapter.kernels.report                 # table for sm_80 and sm_90
    python -m fastadapter.kernels.report --archs sm_90   # one architecture
    python -m fastadapter.kernels.report --json          # machine-readable (cubins base64-encoded)
    python -m fastadapter.kernels.report --code-paths    # the other compile-time branches (varlen, fp16, ...)
"""
from __future__ import annotations

import argparse
import base64
import json
import sys

from .aot_compile import compile_code_paths, compile_report


def format_table(rows: list[dict]) -> str:
    """The report as a fixed-width text table, one line per kernel × configuration × arch."""
    last = "inputs" if rows and "code_path" in rows[0] else "S"
    header = ("kernel", "config", "arch", "regs", "spill B", "shared B", "tensor cores", last)
    lines = [[r["kernel"], r["config"], r["arch"], str(r["registers"]), str(r["spill_bytes"]),
              str(r["shared_bytes"]), ",".join(r["tensor_cores"]) or "none",
              r["code_path"] if "code_path" in r else ",".join(str(s) for s in r["seqlens"])] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastadapter.kernels.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["sm_80", "sm_90"], help="target architectures")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--code-paths", action="store_true",
                        help="compile the branches the LLaMA-7B shapes do not take, in the first configuration")
    args = parser.parse_args(argv)
    rows = (compile_code_paths if args.code_paths else compile_report)(tuple(args.archs))
    if args.json:
        for row in rows:
            row["cubin"] = base64.b64encode(row["cubin"]).decode("ascii")
        json.dump(rows, sys.stdout)
    else:
        if args.code_paths:
            print("Triton kernels compiled ahead of time for the branches LLaMA-7B shapes do not take")
        else:
            print("Triton kernels compiled ahead of time at LLaMA-7B shapes (Hq=Hkv=32, D=128, P=10, bf16)")
        print(format_table(rows))
        spills = [r for r in rows if r["spill_bytes"]]
        no_tc = [r for r in rows if not r["tensor_cores"]]
        print(f"\n{len(rows)} binaries; {len(spills)} with spills; {len(no_tc)} without tensor-core instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
