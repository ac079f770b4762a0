"""The ``fastadapter`` command line: one subcommand per module of :mod:`fastadapter.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when their subcommand runs, so ``fastadapter --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> module under fastadapter.commands
COMMANDS = {
    "generate": "generate",
    "train": "train",
    "plan": "plan",
    "bench": "bench",
    "info": "info",
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapter", description="Fast LLaMA-Adapter fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if selected is not None and name != selected:
            sub.add_parser(name)
            continue
        module = importlib.import_module(f"fastadapter.commands.{module_name}")
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastadapter`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and argv[0] in COMMANDS else None
    if selected is None:
        # Only help or an unknown command: describe every command that can be imported here.
        parser = argparse.ArgumentParser(prog="fastadapter", description="Fast LLaMA-Adapter fine-tuning.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, module_name in COMMANDS.items():
            try:
                help_text = importlib.import_module(f"fastadapter.commands.{module_name}").HELP
            except ImportError as exc:
                help_text = f"(unavailable: {exc})"
            sub.add_parser(name, help=help_text)
        parser.parse_args(argv or ["--help"])
        return 2
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    module = importlib.import_module(f"fastadapter.commands.{COMMANDS[selected]}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
