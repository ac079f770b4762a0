"""The library names its settings (``batch_tokens``); the CLI names their flags (``--batch-tokens``): a
:class:`SettingError` carries the setting names, and ``fastadapter``'s error line renders them as flags."""
import pathlib
import re

import pytest

from fastadapter.cli import build_parser, describe_error, flag_of
from fastadapter.setting_error import SettingError

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastadapter"


def test_a_setting_error_renders_its_settings_in_either_layers_words():
    error = SettingError("example 3 has 9 tokens ({batch_tokens} 8); raise {batch_tokens} to at least "
                         "{max_seq_len}; {'literal': 1}, lower {warmup_steps}")
    assert isinstance(error, ValueError)
    assert error.settings == ("batch_tokens", "max_seq_len", "warmup_steps")
    assert str(error) == ("example 3 has 9 tokens (batch_tokens 8); raise batch_tokens to at least max_seq_len; "
                          "{'literal': 1}, lower warmup_steps")
    assert describe_error(error) == ("example 3 has 9 tokens (--batch-tokens 8); raise --batch-tokens to at least "
                                     "--max-seq-len; {'literal': 1}, lower --warmup")


def test_the_library_writes_no_flag_where_it_raises_a_setting_error():
    """Every ``SettingError`` of the library names settings in braces, each of which is a flag of
    ``fastadapter train``; none writes a flag itself."""
    flags = {option for action in build_parser("train")._subparsers._group_actions[0].choices["train"]._actions
             for option in action.option_strings}
    named = set()
    for path in PACKAGE.rglob("*.py"):
        if path.parts[-2] in ("commands",) or path.name == "cli.py":
            continue
        text = path.read_text()
        for call in re.finditer(r"(?:raise (?:SettingError|TrainingDiverged)\(|return \(f\"training diverged)"
                                r"(.*?)\)\n", text, flags=re.S):
            assert " --" not in call.group(1) and "(--" not in call.group(1), f"{path.name}: {call.group(1)}"
            named |= set(re.findall(r"\{\{([a-z_]+)\}\}", call.group(1)))
    assert {"batch_tokens", "max_seq_len", "grad_accum", "lr", "warmup_steps"} <= named
    assert {flag_of(name) for name in named} <= flags, {flag_of(name) for name in named} - flags


@pytest.mark.parametrize("setting, flag", [("batch_tokens", "--batch-tokens"), ("warmup_steps", "--warmup"),
                                           ("lr", "--lr")])
def test_flag_of(setting, flag):
    assert flag_of(setting) == flag
