"""The library names its settings (``batch_tokens``); the CLI names their flags (``--batch-tokens``): a
:class:`SettingError` carries the setting names, and ``fastadapter``'s error line renders them as flags."""
import ast
import pathlib
import re

import pytest

from fastadapter.cli import build_parser, describe_error, flag_of
from fastadapter.setting_error import SettingError

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "fastadapter"


def test_a_setting_error_renders_its_settings_in_either_layers_words():
    error = SettingError("example 3 has 9 tokens ({batch_tokens} 8); raise {batch_tokens} to at least "
                         "{max_seq_len}; {'literal': 1}, lower {warmup_steps}")
    assert isinstance(error, ValueError)
    assert error.settings == ("batch_tokens", "max_seq_len", "warmup_steps")
    assert str(error) == ("example 3 has 9 tokens (batch_tokens 8); raise batch_tokens to at least max_seq_len; "
                          "{'literal': 1}, lower warmup_steps")
    assert describe_error(error) == ("example 3 has 9 tokens (--batch-tokens 8); raise --batch-tokens to at least "
                                     "--max-seq-len; {'literal': 1}, lower --warmup")


def _literal_text(node: ast.AST) -> str:
    """The literal text of a string expression (an f-string's literal parts, where ``{{x}}`` reads ``{x}``)."""
    return "".join(part.value for part in ast.walk(node)
                   if isinstance(part, ast.Constant) and isinstance(part.value, str))


def _setting_error_messages(tree: ast.AST) -> list[str]:
    """The literal text of every message given to ``SettingError`` or ``TrainingDiverged`` (and of the trainer's
    ``_diverged``, which writes the latter's)."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("SettingError", "TrainingDiverged")):
            found += [_literal_text(arg) for arg in node.args]
        elif isinstance(node, ast.FunctionDef) and node.name == "_diverged":
            found.append(_literal_text(node))
    return found


def test_the_library_writes_no_flag_where_it_raises_a_setting_error():
    """Every ``SettingError`` of the library names settings in braces, each of which is a flag of
    ``fastadapter train``; none writes a flag itself."""
    flags = {option for action in build_parser("train")._subparsers._group_actions[0].choices["train"]._actions
             for option in action.option_strings}
    named = set()
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "commands" or path.name == "cli.py":
            continue
        for message in _setting_error_messages(ast.parse(path.read_text(), str(path))):
            assert not re.search(r"(^|[\s(])--[a-z]", message), f"{path.name}: {message}"
            named |= set(re.findall(r"\{([a-z_]+)\}", message))
    assert {"batch_tokens", "max_seq_len", "grad_accum", "lr", "warmup_steps", "adapter", "quantize", "fsdp",
            "template", "adapter_layers"} <= named
    assert {flag_of(name) for name in named} <= flags, {flag_of(name) for name in named} - flags


@pytest.mark.parametrize("setting, flag", [("batch_tokens", "--batch-tokens"), ("warmup_steps", "--warmup"),
                                           ("lr", "--lr")])
def test_flag_of(setting, flag):
    assert flag_of(setting) == flag
