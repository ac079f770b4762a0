"""ScienceQA in the layout the community uses for it (LaVIN's), its question format and its categories.

Layout of a ScienceQA folder::

    problems.json      {pid: {"question": str, "choices": [str, ...], "answer": int (index into choices),
                              "hint": str (the context, may be ""), "image": "image.png" | null,
                              "split": "train" | "val" | "test", "subject": str, "grade": "grade1".."grade12",
                              ... (task, topic, category, skill, lecture, solution: not used)}}
    pid_splits.json    {"train": [pid, ...], "val": [...], "test": [...], ...}
    images/<split>/<pid>/image.png

A problem becomes an instruction in the paper's format (context, question, options → answer)::

    Context: {hint or "N/A"}
    Question: {question}
    Options: (A) {choice 0} (B) {choice 1} ...

with the response ``The answer is (A).``, wrapped in the Alpaca template as every fastadapter example. A
problem whose image file is missing, whose answer index is outside its choices or whose fields are missing or of
the wrong type is a bad row, reported by its pid (skipped, or fatal with ``on_bad_row="error"``).

Categories for evaluation (as ScienceQA's own evaluation): subject (``natural science``, ``social science``,
``language science``), context modality (``TXT``: a non-empty hint, ``IMG``: an image, ``NO``: neither; TXT and
IMG overlap), grade (``grade1`` … ``grade12``, and the bands ``G1-6`` / ``G7-12``).
"""
from __future__ import annotations

import json
import os
import string
import warnings
from dataclasses import dataclass
from typing import Optional

from .data import ON_BAD_ROW_CHOICES, DataError, DataReport, tokenize_rows
from .image_data import ImageExample

LETTERS = string.ascii_uppercase
#: The most choices a problem may have (one letter each).
MAX_CHOICES = len(LETTERS)


@dataclass(frozen=True)
class Problem:
    """One ScienceQA problem, checked.

    Attributes:
        pid: its id; question, choices, answer (index), hint: the official fields;
        image: the absolute path of its image file, or None; split, subject, grade: its categories.
    """

    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    hint: str
    image: Optional[str]
    split: str
    subject: str
    grade: str

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def categories(self) -> dict[str, list[str]]:
        """``{"subject": [...], "context": [...], "grade": [...]}``: the groups this problem is counted in."""
        context = [name for name, present in (("TXT", bool(self.hint.strip())), ("IMG", self.image is not None))
                   if present] or ["NO"]
        grade = [self.grade]
        number = self.grade[len("grade"):] if self.grade.startswith("grade") else ""
        if number.isdigit():
            grade.append("G1-6" if int(number) <= 6 else "G7-12")
        return {"subject": [self.subject], "context": context, "grade": grade}


def format_question(problem: Problem) -> str:
    """The instruction of ``problem`` in the paper's format (context, question, options)."""
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(problem.choices))
    return f"Context: {problem.hint.strip() or 'N/A'}\nQuestion: {problem.question}\nOptions: {options}"


def format_answer(letter: str) -> str:
    """The response for the answer ``letter``: ``The answer is (A).``"""
    return f"The answer is ({letter})."


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"ScienceQA {what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the ScienceQA {what} ({exc})") from exc


def _problem(folder: str, pid: str, row, split: str) -> Problem | str:
    """The checked :class:`Problem`, or why the row is bad."""
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    for key in ("question", "choices", "answer"):
        if key not in row:
            return f"missing field {key!r}"
    question, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(question, str) or not question.strip():
        return f"'question' must be a non-empty string, got {question!r}"
    if not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES or \
            not all(isinstance(c, str) for c in choices):
        return f"'choices' must be a list of 2 to {MAX_CHOICES} strings, got {choices!r}"
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"answer index {answer!r} is out of range for {len(choices)} choices"
    hint = row.get("hint") or ""
    if not isinstance(hint, str):
        return f"'hint' must be a string, got {type(hint).__name__}"
    image = row.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            return f"'image' must be a file name or null, got {image!r}"
        image = os.path.join(folder, "images", split, pid, image)
        if not os.path.isfile(image):
            return f"image file not found: {image}"
    return Problem(pid, question, tuple(choices), answer, hint, image, split, str(row.get("subject", "unknown")),
                   str(row.get("grade", "unknown")))


def load_problems(folder: str | os.PathLike, split: str = "train", *, on_bad_row: str = "skip",
                  report: Optional[DataReport] = None) -> list[Problem]:
    """The checked problems of ``split`` (the pids of ``pid_splits.json[split]``, in that order).

    Raises:
        FileNotFoundError: no folder, ``problems.json`` or ``pid_splits.json``.
        DataError: unreadable files, an unknown split or a pid missing from ``problems.json``, or (with
            ``on_bad_row="error"``) a bad problem, named by its pid.
    """
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ScienceQA folder not found: {folder}")
    problems_path = os.path.join(folder, "problems.json")
    problems = _read_json(problems_path, "problems.json")
    splits = _read_json(os.path.join(folder, "pid_splits.json"), "pid_splits.json")
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise DataError(f"{folder}: problems.json and pid_splits.json must be JSON objects (pid → problem, "
                        f"split → pids)")
    if split not in splits:
        raise DataError(f"{folder}: pid_splits.json has no split {split!r}; it has {sorted(splits)}")
    report = DataReport() if report is None else report
    pids = [str(p) for p in splits[split]]
    report.rows = len(pids)
    out = []
    for index, pid in enumerate(pids):
        problem = (_problem(folder, pid, problems[pid], split) if pid in problems
                   else "listed in pid_splits.json but not in problems.json")
        if isinstance(problem, Problem):
            out.append(problem)
            report.kept_rows.append(index)
            continue
        if on_bad_row == "error":
            raise DataError.naming("{path}: problem {pid} is malformed: {problem} (pass {on_bad_row} skip to skip "
                                   "it)", path=problems_path, pid=pid, problem=problem)
        report.bad_rows.append((index, f"problem {pid}: {problem}"))
        warnings.warn(f"{problems_path}: skipping malformed problem {pid}: {problem}", stacklevel=2)
    if not out:
        raise DataError(f"{folder}: none of the {len(pids)} problems of split {split!r} is usable")
    return out


def problem_rows(problems: list[Problem]) -> list[dict]:
    """Alpaca rows (instruction, input, output) of ``problems``: the question format and the right answer."""
    return [{"instruction": format_question(p), "input": "", "output": format_answer(p.answer_letter)}
            for p in problems]


def load_scienceqa_examples(folder: str | os.PathLike, tokenizer, max_seq_len: int, *, split: str = "train",
                            on_bad_row: str = "skip") -> tuple[list[ImageExample], DataReport]:
    """The problems of ``split`` as training examples (:class:`ImageExample`, ``key`` = pid, ``image`` = the
    problem's image or None)."""
    report = DataReport()
    problems = load_problems(folder, split, on_bad_row=on_bad_row, report=report)
    examples = tokenize_rows(problem_rows(problems), tokenizer, max_seq_len, report,
                             row_numbers=list(range(len(problems))))
    out = [ImageExample(e.tokens, e.labels, e.truncated, row=report.kept_rows[e.row], image=problems[e.row].image,
                        key=problems[e.row].pid) for e in examples]
    if not out:
        raise DataError.naming("{path}: no example left after truncation to {length} tokens; raise {max_seq_len}",
                               path=os.fspath(folder), length=max_seq_len)
    return out, report
