"""``fastadapter bench``: run the benchmark suite (:mod:`fastadapter.benchmarks`), or compare two runs.

The suites are installed with fastadapter (the checkout's ``benchmarks/`` folder is the package
``fastadapter.benchmarks``), so the command runs from any install and any folder. Each run writes its files to a
new folder, ``bench-results/<machine>-<UTC time>/`` in the working directory, unless ``--out`` names one.

    fastadapter bench --smoke                     # one tiny shape per suite: checks that everything runs
    fastadapter bench --quick                     # a few small shapes, < 2 minutes on a 2-core CPU
    fastadapter bench                             # the main job (~5 minutes on 2 cores): op table, training
                                                  # vs PEFT, generation vs HF + PEFT, a figure per question
    fastadapter bench --full                      # every suite and sweep, < 30 minutes on a 2-core CPU
    fastadapter bench --suites ops --device cuda  # one suite on a GPU
    fastadapter bench --compare A.json B.json     # speed-up of B over A, row by row
    fastadapter bench --compile-report            # the Triton kernels' ahead-of-time compile report
    fastadapter bench --markdown A.json           # a result file as markdown tables
"""
from __future__ import annotations

import json
import pathlib
import sys

HELP = "benchmark zero-init attention and the model against the baselines (tables, JSON, CSV, plots)"


def add_arguments(parser) -> None:
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--smoke", action="store_true",
                        help="one tiny shape per suite (seconds each): checks that every suite runs; no figures")
    preset.add_argument("--quick", action="store_true",
                        help="a few small shapes, no training step (under 2 minutes on CPU)")
    preset.add_argument("--full", action="store_true",
                        help="every suite and sweep: the PEFT integration, multimodal, seqlen to 4096, batch, GQA, "
                             "prefix (under 30 minutes on CPU; the default run is the ~5-minute main job)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--suites", nargs="+", metavar="SUITE",
                        help="run only these suites (ops, generation, ...; see --list)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="folder of the JSON, CSV and PNG files (default: a new folder "
                             "bench-results/<machine>-<UTC time>/ in the working directory)")
    parser.add_argument("--name", default=None, help="stem of the result files (default: <device>-<preset>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace result files of the same name already in --out (without it they are refused)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    parser.add_argument("--list", action="store_true", help="list the suites found and exit")
    parser.add_argument("--compare", nargs=2, type=pathlib.Path, metavar=("A.json", "B.json"),
                        help="print the speed-up of B over A for every measurement in both files")
    parser.add_argument("--markdown", type=pathlib.Path, metavar="RESULT.json",
                        help="print a result file as markdown tables (for a README)")
    parser.add_argument("--compile-report", action="store_true",
                        help="compile the Triton kernels ahead of time for sm_80/sm_90 and print/save the "
                             "register, spill and shared-memory report (needs triton, no GPU)")


def _compile_report(out_dir: pathlib.Path) -> int:
    try:
        from fastadapter.kernels import compile_report
        from fastadapter.kernels.report import format_table
    except ImportError as error:
        print(f"compile report unavailable: {error} (it needs triton: pip install triton)", file=sys.stderr)
        return 1
    rows = compile_report()
    table = format_table(rows)
    print("Triton kernels compiled ahead of time (no GPU needed)")
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compile-report.txt").write_text(table + "\n")
    (out_dir / "compile-report.json").write_text(
        json.dumps([{k: v for k, v in row.items() if k != "cubin"} for row in rows], indent=1, default=str) + "\n")
    print(f"wrote {out_dir / 'compile-report.txt'}, {out_dir / 'compile-report.json'}")
    return 0


def run(args) -> int:
    from fastadapter.benchmarks.runner import default_out_dir, discover_suites, run_benchmarks
    if args.compare:
        from fastadapter.benchmarks.compare import format_comparison
        try:
            print(format_comparison(*args.compare), end="")
        except (FileNotFoundError, ValueError) as error:
            print(f"fastadapter bench: error: --compare: {error}", file=sys.stderr)
            return 2
        return 0
    if args.markdown:
        from fastadapter.benchmarks.report import format_markdown, load_json
        try:
            print(format_markdown(load_json(args.markdown)), end="")
        except (FileNotFoundError, ValueError) as error:
            print(f"fastadapter bench: error: --markdown: {error}", file=sys.stderr)
            return 2
        return 0
    if args.list:
        for suite, module in discover_suites().items():
            print(f"{suite:<16} {module}")
        return 0
    out_dir = args.out or default_out_dir()
    if args.compile_report:
        from ._paths import check_outputs
        try:
            check_outputs({"--out": str(out_dir), **{f"--out/{name}": str(out_dir / name)
                                                     for name in ("compile-report.txt", "compile-report.json")}},
                          {}, overwrite=args.overwrite, folders=("--out",))
        except ValueError as error:
            print(f"fastadapter bench: error: {error}", file=sys.stderr)
            return 2
        return _compile_report(out_dir)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"fastadapter bench: error: --device {device}: no CUDA device is available here (torch "
              f"{torch.__version__})", file=sys.stderr)
        return 2
    preset = "smoke" if args.smoke else "quick" if args.quick else "full" if args.full else "default"
    stem = args.name or f"{torch.device(device).type}-{preset}"
    from ._paths import check_outputs
    try:  # before the suites run: a refusal costs nothing
        plots = [] if args.no_plots else sorted(out_dir.glob(f"{stem}-*.png"))  # the plots of an earlier run
        check_outputs({"--out": str(out_dir), **{f"--out/{path.name}": str(path) for path in
                                                 [out_dir / f"{stem}.json", out_dir / f"{stem}.csv", *plots]}},
                      {}, overwrite=args.overwrite, folders=("--out",))
    except ValueError as error:
        print(f"fastadapter bench: error: {error}", file=sys.stderr)
        return 2
    command = ["fastadapter", "bench"] + ([] if preset == "default" else [f"--{preset}"]) + ["--device", device]
    command += ["--suites", *args.suites] if args.suites else []
    try:
        result = run_benchmarks(preset=preset, device=device, suites=args.suites, out_dir=out_dir,
                                name=args.name, plots=not args.no_plots, argv=command)
    except ValueError as error:  # an unknown suite: the message lists the known ones
        print(f"fastadapter bench: error: {error}", file=sys.stderr)
        return 2
    if result.errors:
        return 1
    if result.skipped and not result.rows:
        print("fastadapter bench: every suite chosen was skipped (reasons above): nothing was measured",
              file=sys.stderr)
        return 1
    return 0
