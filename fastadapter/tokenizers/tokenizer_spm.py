"""The SentencePiece tokenizer of LLaMA 1/2 (``tokenizer.model``), through the ``sentencepiece`` library."""
from __future__ import annotations

import os


class SentencePieceTokenizer:
    """A SentencePiece ``.model``; encodes exactly as LLaMA's reference code (dummy prefix, byte fallback)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        self.path = os.fspath(path)
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(self.path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.path}: not a readable SentencePiece model ({exc})") from exc
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (with BOS first and EOS last when asked)."""
        ids = self._processor.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (control tokens such as BOS and EOS produce nothing)."""
        return self._processor.decode(list(ids))
