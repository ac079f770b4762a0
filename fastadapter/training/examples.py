"""The types of tokenised training data, shared by every data format (Alpaca rows in :mod:`.data`,
conversations in :mod:`.chat`, ScienceQA, image rows): an :class:`Example`, the :class:`DataReport` of a data
file, the :class:`DataError` a bad file raises, and :data:`IGNORE_INDEX`, the label of positions without loss.
The formats import this module, never the dispatcher :func:`~.data.load_examples`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..setting_error import NamesSettings


#: Label of positions that carry no loss (the ``ignore_index`` of ``torch.nn.functional.cross_entropy``).
IGNORE_INDEX = -100

class DataError(NamesSettings, ValueError):
    """A data file that cannot be read, or a malformed row when malformed rows are fatal; names the file and
    the row (and the setting that would help: :meth:`~fastadapter.setting_error.NamesSettings.naming`)."""


@dataclass(frozen=True)
class Example:
    """One tokenised training example.

    Attributes:
        tokens: the model input, ``n`` token ids starting with BOS.
        labels: ``n`` ids: ``labels[j]`` is the token after ``tokens[j]`` when it belongs to the response (EOS
            included), :data:`IGNORE_INDEX` otherwise.
        truncated: the example was cut to ``max_seq_len`` tokens (its EOS, maybe more, was lost).
        row: the index of its row in the data file (0-based; None when not made from a file), for messages.
    """

    tokens: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False
    row: Optional[int] = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def loss_tokens(self) -> int:
        """How many positions carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class DataReport:
    """What happened to the rows of a data file on their way to examples.

    Attributes:
        rows: rows in the file.
        bad_rows: ``(index, reason)`` of every malformed row that was skipped.
        kept_rows: the index in the file of every row :func:`load_rows` returned, in order.
        truncated: examples cut to ``max_seq_len``.
        no_response: rows dropped because truncation left no response token to learn from.
    """

    rows: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    kept_rows: list[int] = field(default_factory=list)
    truncated: int = 0
    no_response: int = 0

    def summary(self) -> str:
        text = (f"{self.rows} rows: {len(self.bad_rows)} malformed and skipped, {self.truncated} truncated to "
                f"max_seq_len, {self.no_response} dropped (no response token left after truncation)")
        return text


def text_problem(text: str) -> Optional[str]:
    """Why ``text`` (a string field of a data row) is not text a tokenizer can encode, or None when it is: JSON
    may write a lone UTF-16 surrogate (``"\\ud800"``), which is no Unicode character and has no UTF-8 bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), which is "
                f"not valid Unicode text")
    return None
