"""``load_tokenizer``: the tokenizer in a file, whichever of LLaMA's formats it is in.

Both tokenizers offer ``encode(text, bos=True, eos=False) -> list[int]``, ``decode(ids) -> str``, ``bos_id``,
``eos_id`` and ``vocab_size``.
"""
from __future__ import annotations

import os
from typing import Union

from .tokenizer_llama2c import Llama2cTokenizer
from .tokenizer_spm import SentencePieceTokenizer

Tokenizer = Union[SentencePieceTokenizer, Llama2cTokenizer]


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """A SentencePiece ``.model`` or a llama2.c ``tokenizer.bin``; a folder is searched for ``tokenizer.model``.

    The format is told by the file's first bytes: a SentencePiece model is a protobuf whose first field is a
    piece (tag byte ``0x0a``), a llama2.c tokenizer starts with a small little-endian int32.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{path}: no tokenizer.model in this folder")
        path = candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x0a":
        return SentencePieceTokenizer(path)
    if len(head) == 4 and 0 < int.from_bytes(head, "little") < 1024:
        return Llama2cTokenizer(path)
    raise ValueError(f"{path}: neither a SentencePiece .model nor a llama2.c tokenizer.bin")


def check_vocabulary(tokenizer: Tokenizer, model_vocab_size: int, tokenizer_path: str = "the tokenizer",
                     model_path: str = "the model") -> None:
    """Raise ``ValueError`` when ``tokenizer`` can produce ids the model has no embedding for (its vocabulary is
    larger than the model's ``model_vocab_size``): the tokenizer belongs to another model. A smaller tokenizer
    is accepted (checkpoints often pad their embedding to a multiple of 64 or 128)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size:,} tokens but {model_path} only "
                         f"{model_vocab_size:,} embeddings: this tokenizer belongs to another model; pass "
                         f"--tokenizer with the model's own tokenizer")
