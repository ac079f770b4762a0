"""``--config run.yaml``: a YAML mapping of a command's flags, as litgpt and torchtune users keep their runs.

Keys are the flag names without the dashes (``max-steps`` or ``max_steps``); values are what the flag takes
(``true``/``false`` for a switch such as ``overwrite``). The mapping is turned into command-line words placed
*before* the words the user typed, so argparse checks every value (types, choices, required flags) and a flag
on the command line overrides the file (the last occurrence of a flag wins).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional


def _find_config(argv: list[str]) -> Optional[str]:
    for index, word in enumerate(argv):
        if word == "--config":
            if index + 1 >= len(argv):
                raise ValueError("--config needs a YAML file")
            return argv[index + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def config_words(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line words of the YAML file ``path`` for ``parser``'s flags.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a YAML mapping, an unknown key (the known ones are listed), or a value of the wrong
            kind for its flag (a list, a mapping, a non-boolean for a switch).
    """
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            settings = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if settings is None:
        return []
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of flags (model: DIR, lr: 0.01, ...), got a "
                         f"{type(settings).__name__}")
    flags = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                flags[option[2:]] = (option, action)
    words = []
    for key, value in settings.items():
        name = str(key).replace("_", "-")
        if name not in flags or name in ("config", "help"):
            known = ", ".join(sorted(k for k in flags if k not in ("config", "help")))
            raise ValueError(f"{path}: unknown setting {key!r}; expected one of: {known}")
        option, action = flags[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError(f"{path}: {key} is a switch: expected true or false, got {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                words.append(option)
            continue
        if isinstance(value, (list, dict)) or value is None:
            raise ValueError(f"{path}: {key} must be a single value, got {value!r}")
        words += [option, str(value).lower() if isinstance(value, bool) else str(value)]
    return words


def with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` (without the command name) with the words of its ``--config`` file in front; unchanged when
    there is none."""
    path = _find_config(argv)
    return argv if path is None else config_words(parser, path) + argv
