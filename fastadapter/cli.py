"""The ``fastadapter`` command line: one subcommand per module of :mod:`fastadapter.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when their subcommand runs, so ``fastadapter --help`` stays fast.

A user error — a ``FileNotFoundError`` naming a missing path, a ``FileNotFoundError`` / ``ValueError`` raised
by fastadapter's own checks (bad data file, bad setting, a checkpoint that does not fit), or an ``OSError`` of the
machine around the run (full disk, read-only or forbidden folder, a file where a folder was expected) — prints
``fastadapter COMMAND: error: MESSAGE`` and exits with status 2, as argparse does for bad flags; any other
exception is a bug and keeps its traceback (set ``FASTADAPTER_TRACEBACK=1`` to get the traceback of user errors
too). Ctrl-C outside training prints ``fastadapter: interrupted`` and exits with status 130.

The library names settings by their Python names (:mod:`fastadapter.setting_error`); the error line names the
flags instead: each setting the message declares is looked up in the options of the command (then of the other
commands, :func:`error_flags`), and nothing else of the message is touched.
"""
from __future__ import annotations

import argparse
import errno
import functools
import importlib
import os
import sys
import traceback
from typing import Optional

from .setting_error import NamesSettings

#: subcommand -> module under fastadapter.commands
COMMANDS = {
    "generate": "generate",
    "train": "train",
    "eval": "eval",
    "plan": "plan",
    "bench": "bench",
    "info": "info",
    "export": "export",
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


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


#: errno values of an ``OSError`` that describe the machine or the paths the user gave, not a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                                errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ENOENT, errno.EIO})


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a mistake of the user rather than a bug: a ``FileNotFoundError`` from the
    operating system (it names the missing path), an ``OSError`` of :data:`ENVIRONMENT_ERRNOS` (full disk,
    read-only or forbidden path, a file where a folder is expected, ...), or a ``FileNotFoundError`` /
    ``ValueError`` raised by a ``raise`` statement of fastadapter itself — not one a library or a failed operation
    inside fastadapter threw (``int("x")`` in fastadapter's code is a bug)."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        return True
    if not isinstance(exc, (FileNotFoundError, ValueError)):
        return False
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    innermost = frames[-1]
    inside = os.path.abspath(innermost.filename).startswith(_PACKAGE_DIR + os.sep)
    return inside and (innermost.line or "").lstrip().startswith("raise")


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
    module = importlib.import_module(f"fastadapter.commands.{COMMANDS[selected]}")
    try:
        command_parser = parser._subparsers._group_actions[0].choices[selected]
        if any(a.dest == "config" for a in command_parser._actions):  # --config run.yaml: its flags first
            from .commands._config_file import with_config
            argv = [selected] + with_config(command_parser, argv[1:])
        args = parser.parse_args(argv)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("fastadapter: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        if not is_user_error(exc) or os.environ.get("FASTADAPTER_TRACEBACK"):
            raise
        print(f"fastadapter {selected}: error: {describe_error(exc, error_flags(selected))}", file=sys.stderr)
        return 2


#: Library settings whose flag's ``dest`` is another name (``--warmup`` sets ``TrainConfig.warmup_steps``).
SETTING_DESTS = {"warmup_steps": "warmup"}


def setting_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{library setting: flag}`` that ``parser`` (one command's) declares: each option's ``dest`` (and each name
    of :data:`SETTING_DESTS` whose dest it has) maps to its first long flag."""
    flags = {}
    for action in parser._actions:
        long = [option for option in action.option_strings if option.startswith("--")]
        if long and action.dest != "help":
            flags.setdefault(action.dest, long[0])
    for setting, dest in SETTING_DESTS.items():
        if dest in flags:
            flags.setdefault(setting, flags[dest])
    return flags


@functools.lru_cache(maxsize=None)
def command_flags(command: str) -> dict[str, str]:
    """:func:`setting_flags` of ``fastadapter COMMAND``."""
    return setting_flags(build_parser(command)._subparsers._group_actions[0].choices[command])


def error_flags(command: str) -> dict[str, str]:
    """The flags an error of ``fastadapter COMMAND`` names settings with: the command's own, then ``train``'s (an
    ``export`` or a ``generate`` may say how to train the adapter instead), then the other commands'."""
    merged: dict[str, str] = {}
    for name in (command, "train", *COMMANDS):
        try:
            flags = command_flags(name)
        except ImportError:  # a command whose module cannot be imported here has no flags to offer
            continue
        for setting, flag in flags.items():
            merged.setdefault(setting, flag)
    return merged


def flag_of(setting: str, command: str = "train") -> str:
    """The flag of the library setting ``setting`` in ``fastadapter COMMAND`` (``KeyError`` when it has none)."""
    return command_flags(command)[setting]


def describe_error(exc: BaseException, flags: Optional[dict[str, str]] = None) -> str:
    """The one-line message of a user error: an ``OSError`` as ``what: path`` (without ``[Errno N]``), an error
    naming settings (:class:`~fastadapter.setting_error.NamesSettings`) with the flag ``flags`` declares for each
    (:func:`setting_flags`; a setting the command has no flag for keeps its name)."""
    def flag(setting: str) -> str:
        return (flags or {}).get(setting, setting)

    names = isinstance(exc, NamesSettings) and exc.setting_message is not None
    if isinstance(exc, OSError) and exc.strerror and (exc.errno in ENVIRONMENT_ERRNOS or exc.filename):
        where = f": {exc.filename}" if exc.filename is not None else ""
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        return f"{exc.render(flag) if names else exc.strerror}{where}"  # an OSError's message is its strerror
    return exc.render(flag) if names else str(exc)


if __name__ == "__main__":
    sys.exit(main())
