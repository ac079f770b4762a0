"""Instruction data for fine-tuning: reading Alpaca-format JSON / JSONL rows, checking them, and turning them
into token sequences whose loss covers only the response.

A row is ``{"instruction": str, "input": str (optional, may be empty), "output": str}``; other keys are ignored.
An example is the model's input ``tokens`` (BOS, prompt, response) and the ``labels`` it must predict at each
position (the next token, EOS after the response), with :data:`IGNORE_INDEX` wherever the next token is still
part of the prompt — as LLaMA-Adapter's fine-tuning code, which masks ``len(encode(prompt))`` tokens of
``encode(prompt + output)``. :func:`file_fingerprint` and :func:`examples_digest` identify the data a run
was trained on, so that resuming it with other data can be refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from array import array
from typing import Iterable, Optional, Sequence

from ..setting_error import SettingMessage
from .examples import IGNORE_INDEX, DataError, DataReport, Example, text_problem  # noqa: F401
from .prompt import format_prompt

ON_BAD_ROW_CHOICES = ("skip", "error")

#: How much of a data file :func:`file_fingerprint` hashes.
FINGERPRINT_HEAD_BYTES = 4 << 20


def _parse_json(path: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected a JSON array of rows or JSON lines") from exc
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read; expected a JSON array of rows (objects of "
                        f"strings) or JSON lines") from None


def _read_json_rows(path: str) -> list:
    """The rows of a JSON array or JSON-lines file; an undecodable JSONL line becomes a row of type ``str``
    (reported as malformed by :func:`_row_problem`) so that one bad line does not hide the others. A ``.json``
    file must hold an array: one object there is refused (JSON lines go in ``.jsonl`` files)."""
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; expected an Alpaca-format .json (array) or .jsonl data file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte-order mark is not part of the JSON
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the data file ({exc})") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _parse_json(path, text)
    if path.lower().endswith(".json") and stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None  # JSON lines in a .json file: read line by line below
        if isinstance(whole, dict):
            raise DataError(f"{path}: holds one JSON object; the rows must be a JSON array of objects "
                            f"([{{\"instruction\": ..., \"output\": ...}}, ...]), or JSON lines in a .jsonl file")
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            rows.append(f"line {line_number} is not valid JSON ({exc.msg})")
        except RecursionError:
            rows.append(f"line {line_number} is JSON nested too deeply to read")
    if not rows:
        raise DataError(f"{path}: no rows; expected a JSON array of rows or JSON lines with "
                        f"'instruction', 'input' and 'output'")
    return rows


def _row_problem(row) -> Optional[str | SettingMessage]:
    """Why ``row`` is not a usable Alpaca row, or None when it is (a :class:`SettingMessage` when a setting
    would read it)."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return f"expected an object with 'instruction', 'input', 'output', got {type(row).__name__}"
    for key in ("instruction", "output"):
        if key not in row:
            if "messages" in row or "conversations" in row:
                return SettingMessage("missing key {key!r}: this is a conversation row; pass {template} chat",
                                      {"key": key})
            return f"missing key {key!r}"
    for key in ("instruction", "input", "output"):
        if key in row and not isinstance(row[key], str):
            return f"{key!r} must be a string, got {type(row[key]).__name__}"
        problem = text_problem(row[key]) if key in row else None
        if problem is not None:
            return f"{key!r} {problem}"
    if not row["instruction"].strip():
        return "empty 'instruction'"
    if not row["output"].strip():
        return "empty 'output' (nothing to learn)"
    return None


def load_rows(path: str | os.PathLike, *, on_bad_row: str = "skip",
              report: Optional[DataReport] = None) -> list[dict]:
    """The well-formed Alpaca rows of a ``.json`` (array) or ``.jsonl`` file.

    Args:
        on_bad_row: ``"skip"`` warns with the row's index and reason and leaves it out; ``"error"`` raises.
        report: filled with the row count and the skipped rows.

    Raises:
        FileNotFoundError: no file at ``path``.
        DataError: unreadable or undecodable file, or (``on_bad_row="error"``) a malformed row.
    """
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")
    path = os.fspath(path)
    rows = _read_json_rows(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows, got a JSON {type(rows).__name__}")
    report = DataReport() if report is None else report
    report.rows = len(rows)
    good = []
    for index, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is None:
            good.append(row)
            report.kept_rows.append(index)
            continue
        if on_bad_row == "error":
            raise DataError.naming("{path}: row {index} is malformed: {problem} (pass {on_bad_row} skip to skip it)",
                                   path=path, index=index, problem=problem)
        report.bad_rows.append((index, str(problem)))
        warnings.warn(f"{path}: skipping malformed row {index}: {problem}", stacklevel=2)
    if not good:
        raise DataError(f"{path}: none of the {len(rows)} rows is usable")
    return good


def tokenize_rows(rows: Iterable[dict], tokenizer, max_seq_len: int,
                  report: Optional[DataReport] = None, row_numbers: Optional[Sequence[int]] = None
                  ) -> list[Example]:
    """Tokenise Alpaca rows into :class:`Example`: ``encode(prompt + output)`` with BOS and EOS, the first
    ``len(encode(prompt))`` positions masked, cut to ``max_seq_len`` input tokens.

    Args:
        tokenizer: ``encode(text, bos, eos) -> list[int]`` (see :func:`fastadapter.load_tokenizer`).
        max_seq_len: the longest model input kept; longer examples are truncated and counted in ``report``.
        row_numbers: the index in the data file of each row (:attr:`DataReport.kept_rows`), kept in
            :attr:`Example.row`; default: the position in ``rows``.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    report = DataReport() if report is None else report
    examples = []
    for position, row in enumerate(rows):
        prompt = format_prompt(row["instruction"], row.get("input", ""))
        full = tokenizer.encode(prompt + row["output"], bos=True, eos=True)
        prompt_tokens = len(tokenizer.encode(prompt, bos=True, eos=False))
        truncated = len(full) > max_seq_len + 1
        full = full[:max_seq_len + 1]
        tokens = full[:-1]
        # labels[j] = full[j + 1]; it is a response token when j + 1 >= prompt_tokens.
        labels = [t if j + 1 >= prompt_tokens else IGNORE_INDEX for j, t in enumerate(full[1:])]
        report.truncated += truncated
        if all(label == IGNORE_INDEX for label in labels):
            report.no_response += 1
            continue
        number = row_numbers[position] if row_numbers is not None else position
        examples.append(Example(tuple(tokens), tuple(labels), truncated, row=number))
    return examples


#: The data templates of :func:`load_examples`.
TEMPLATES = ("alpaca", "chat")


def load_examples(path: str | os.PathLike, tokenizer, max_seq_len: int, *, on_bad_row: str = "skip",
                  template: str = "alpaca", chat_template=None) -> tuple[list[Example], DataReport]:
    """The examples of a data file and what happened to its rows.

    Args:
        template: ``"alpaca"``: Alpaca rows (:func:`load_rows` then :func:`tokenize_rows`); ``"chat"``:
            conversation rows rendered with ``chat_template`` (see :mod:`fastadapter.training.chat`).
        chat_template: a :class:`~fastadapter.training.chat.ChatTemplate`; default: the tokenizer's own.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    report = DataReport()
    if template == "alpaca":
        rows = load_rows(path, on_bad_row=on_bad_row, report=report)
        examples = tokenize_rows(rows, tokenizer, max_seq_len, report, row_numbers=report.kept_rows)
    else:
        from .chat import chat_template_of, tokenize_chat_rows
        if on_bad_row not in ON_BAD_ROW_CHOICES:
            raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")
        chat_template = chat_template or chat_template_of(tokenizer)
        rows = _read_json_rows(os.fspath(path))
        if not isinstance(rows, list):
            raise DataError(f"{os.fspath(path)}: expected a JSON array of rows, got a JSON {type(rows).__name__}")
        report.rows = len(rows)
        examples = tokenize_chat_rows(rows, tokenizer, chat_template, max_seq_len, report=report,
                                      row_numbers=range(len(rows)), on_bad_row=on_bad_row, path=os.fspath(path))
        report.kept_rows = [e.row for e in examples]
        if not examples and report.bad_rows and len(report.bad_rows) == len(rows):
            raise DataError(f"{os.fspath(path)}: none of the {len(rows)} rows is a usable conversation (first "
                            f"problem, row {report.bad_rows[0][0]}: {report.bad_rows[0][1]})")
    if not examples:
        raise DataError.naming("{path}: no example left after truncation to {length} tokens; raise {max_seq_len}",
                               path=os.fspath(path), length=max_seq_len)
    return examples, report


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int
                   ) -> tuple[list[Example], list[Example]]:
    """Hold out ``eval_fraction`` of the examples (at least one, chosen with ``seed``) for evaluation.

    Returns:
        ``(train, eval)``; ``eval`` is empty when ``eval_fraction`` is 0.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * len(examples)))
    if len(examples) - n_eval < 1:
        raise ValueError(f"{len(examples)} examples are too few to hold out {n_eval} for evaluation")
    held_out = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    evaluation = [examples[i] for i in sorted(held_out)]
    return train, evaluation


def file_fingerprint(path: str | os.PathLike, head_bytes: int = FINGERPRINT_HEAD_BYTES) -> dict:
    """A cheap identity of a data file, recorded in training checkpoints so that a resume with other data is
    refused: its absolute ``path``, its ``size`` in bytes and the sha256 of its first ``head_bytes`` bytes
    (``sha256_head``, hex).

    The modification time is left out on purpose: copying or touching a file changes it, not the data.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; expected an Alpaca-format .json (array) or .jsonl data file")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f.read(head_bytes))
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    return {"path": os.path.abspath(path), "size": size, "sha256_head": digest.hexdigest()}


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 (hex) of the examples' tokens and labels, in order: equal exactly when the same rows were
    tokenised the same way (same file, tokenizer, template, ``max_seq_len`` and bad-row policy) and split the
    same way."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(array("q", (len(example),)).tobytes())
        digest.update(array("q", example.tokens).tobytes())
        digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()
