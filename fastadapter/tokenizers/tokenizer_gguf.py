"""``load_gguf_tokenizer``: the tokenizer a GGUF file describes in its metadata, as an
:class:`~fastadapter.tokenizers.tokenizer_hf.HFTokenizer`.

The vocabulary (``tokenizer.ggml.model`` ``gpt2`` byte-level BPE or ``llama`` SentencePiece, ``tokens``,
``merges``, ``scores``, ``token_type``) becomes a ``tokenizers.Tokenizer`` through transformers' own GGUF
conversion (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package); the
special ids and the chat template come from the metadata:

* BOS: ``tokenizer.ggml.bos_token_id``, prepended only when ``tokenizer.ggml.add_bos_token`` is true (llama.cpp
  adds it by default for a SentencePiece vocabulary that does not say, none for a BPE one);
* the ids that end a generation: ``eos_token_id``, then ``eot_token_id`` and ``eom_token_id`` when given;
* padding: ``padding_token_id``; the chat template: ``tokenizer.chat_template``.
"""
from __future__ import annotations

import os
from typing import Optional, Union

from ..loaders.gguf_file import read_gguf
from ..setting_error import SettingError
from .tokenizer_hf import HFTokenizer

#: GGUF metadata keys of the ids that end a generation, in the order :attr:`HFTokenizer.stop_ids` lists them.
_STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def load_gguf_tokenizer(path: Union[str, os.PathLike]) -> HFTokenizer:
    """The tokenizer of the GGUF file at ``path``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file has no tokenizer metadata, or one transformers cannot convert.
    """
    path = os.fspath(path)
    metadata = read_gguf(path).metadata
    n_tokens = metadata.get("tokenizer.ggml.tokens")  # the vocabulary's length: its strings are not decoded here
    if not isinstance(n_tokens, int) or "tokenizer.ggml.model" not in metadata:
        raise SettingError("{path}: the GGUF file has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens "
                           "metadata); pass {tokenizer} with the model's tokenizer", path=path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(f"{path}: the tokenizer of a GGUF file is converted by transformers: pip install "
                          f"transformers (or fastadapter[gguf]), or give a tokenizer file as the tokenizer") from None

    try:
        converted = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                  gguf_file=os.path.basename(path))
    except Exception as exc:  # transformers raises ValueError, KeyError or NotImplementedError by vocabulary kind
        raise ValueError(f"{path}: transformers cannot build a tokenizer from this file's "
                         f"{metadata['tokenizer.ggml.model']!r} vocabulary ({type(exc).__name__}: {exc})") from exc

    def token_id(key: str) -> Optional[int]:
        value = metadata.get(key)
        if value is None:
            return None
        if not 0 <= int(value) < n_tokens:
            raise ValueError(f"{path}: {key}={value} is not a token id (the vocabulary has {n_tokens:,} tokens)")
        return int(value)

    add_bos = metadata.get("tokenizer.ggml.add_bos_token", metadata["tokenizer.ggml.model"] == "llama")
    bos = token_id("tokenizer.ggml.bos_token_id")
    stops = [i for i in (token_id(k) for k in _STOP_KEYS) if i is not None]
    pad = token_id("tokenizer.ggml.padding_token_id")
    backend = converted.backend_tokenizer
    named = (("bos_token", bos), ("eos_token", stops[0] if stops else None), ("pad_token", pad),
             ("unk_token", token_id("tokenizer.ggml.unknown_token_id")))
    special = {name: backend.id_to_token(i) for name, i in named if i is not None}
    template = metadata.get("tokenizer.chat_template")
    return HFTokenizer.from_parts(backend, path, bos_id=bos if add_bos else None,
                                  stop_ids=stops, pad_id=pad,
                                  chat_template=template if isinstance(template, str) else None,
                                  special_tokens=special)
