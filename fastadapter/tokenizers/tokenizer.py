"""``load_tokenizer``: the tokenizer in a file, whichever of LLaMA's formats it is in: SentencePiece ``.model``,
llama2.c ``tokenizer.bin``, Hugging Face ``tokenizer.json`` (Llama-3, Mistral, Qwen) or the metadata of a GGUF
checkpoint.

Every tokenizer offers ``encode(text, bos=True, eos=False) -> list[int]``, ``decode(ids) -> str``, ``bos_id``,
``eos_id`` and ``vocab_size``.
"""
from __future__ import annotations

import os
from typing import Union

from ..setting_error import NamesSettings, SettingError
from .tokenizer_hf import HFTokenizer
from .tokenizer_llama2c import Llama2cTokenizer
from .tokenizer_spm import SentencePieceTokenizer

Tokenizer = Union[SentencePieceTokenizer, Llama2cTokenizer, HFTokenizer]

#: Tokenizer files looked for in a folder, in this order: a folder with tokenizer.json has its configuration
#: (special tokens, chat template) beside it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.bin")


class TokenizerNotFound(NamesSettings, FileNotFoundError):
    """No tokenizer was given and none lies beside the model."""


def find_tokenizer(model_path: Union[str, os.PathLike]) -> str:
    """The tokenizer file of the model at ``model_path``: a GGUF file itself (its metadata holds the tokenizer),
    else the first of :data:`TOKENIZER_FILES` that exists in its folder (or the folder of a ``.bin`` file)."""
    model_path = os.fspath(model_path)
    if os.path.isfile(model_path):
        with open(model_path, "rb") as f:
            if f.read(4) == b"GGUF":
                return model_path
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    for name in TOKENIZER_FILES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise TokenizerNotFound.naming("no {tokenizer} given and no {files} in {folder}", files=", ".join(TOKENIZER_FILES),
                                   folder=folder)


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """A SentencePiece ``.model``, a llama2.c ``tokenizer.bin``, a Hugging Face ``tokenizer.json`` or a GGUF
    checkpoint (its tokenizer metadata, :mod:`.tokenizer_gguf`); a folder is searched for
    :data:`TOKENIZER_FILES` in order.

    The format is told by the file's first bytes: ``GGUF`` is a GGUF file, ``{`` a tokenizer.json, a SentencePiece
    model is a protobuf
    whose first field is a piece (tag byte ``0x0a``), a llama2.c tokenizer starts with a small little-endian int32.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path}: no {', '.join(TOKENIZER_FILES)} in this folder")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        from .tokenizer_gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if head.lstrip()[:1] == b"{":
        return HFTokenizer(path)
    if head[:1] == b"\x0a":
        return SentencePieceTokenizer(path)
    if len(head) == 4 and 0 < int.from_bytes(head, "little") < 1024:
        return Llama2cTokenizer(path)
    raise ValueError(f"{path}: neither a SentencePiece .model nor a llama2.c tokenizer.bin nor a Hugging Face "
                     f"tokenizer.json nor a GGUF file")


def check_vocabulary(tokenizer: Tokenizer, model_vocab_size: int, tokenizer_path: str = "the tokenizer",
                     model_path: str = "the model") -> None:
    """Raise ``ValueError`` when ``tokenizer`` can produce ids the model has no embedding for (its vocabulary is
    larger than the model's ``model_vocab_size``): the tokenizer belongs to another model. A smaller tokenizer
    is accepted (checkpoints often pad their embedding to a multiple of 64 or 128)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise SettingError("{tokenizer_path} has {tokens:,} tokens but {model_path} only {embeddings:,} embeddings: "
                           "this tokenizer belongs to another model; pass {tokenizer} with the model's own tokenizer",
                           tokenizer_path=tokenizer_path, tokens=tokenizer.vocab_size, model_path=model_path,
                           embeddings=model_vocab_size)
