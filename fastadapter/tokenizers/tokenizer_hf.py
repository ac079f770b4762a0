"""``HFTokenizer``: a Hugging Face ``tokenizer.json`` (the format of Llama-3, Mistral and Qwen folders) through the
``tokenizers`` library, with BOS, EOS, pad and the chat template read from the folder's configuration.

Special tokens come from, in order: ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
``add_bos_token``, ``chat_template``), ``special_tokens_map.json``, ``chat_template.jinja`` (where transformers 5
saves the template), ``generation_config.json`` (``eos_token_id``: every id that ends a generation, e.g. Qwen's
``<|im_end|>`` and ``<|endoftext|>``) and ``config.json``. A model without a BOS token (Qwen2) gets none:
``encode(text, bos=True)`` then adds nothing.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return value if isinstance(value, dict) else {}


def _token_text(value) -> Optional[str]:
    """A special token as written in tokenizer_config.json: a string, or ``{"content": ...}`` (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class HFTokenizer:
    """A ``tokenizer.json`` with the special tokens of its folder.

    Attributes:
        path: the ``tokenizer.json`` file.
        bos_id: the BOS id, or None when the model has none (Qwen2) or does not prepend it.
        eos_id: the EOS id (the first of :attr:`stop_ids`), or None.
        stop_ids: every id that ends a generation (the EOS token and ``generation_config.json``'s ids).
        pad_id: the padding id, or None.
        chat_template: the Jinja chat template, or None.
        special_tokens: ``{"bos_token": "<s>", ...}`` for rendering the chat template.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises its own Exception subclass for every parse error
            raise ValueError(f"{path}: not a readable tokenizer.json ({exc})") from exc
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
        generation = _read_json(os.path.join(folder, "generation_config.json"))
        model_config = _read_json(os.path.join(folder, "config.json"))

        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(config.get(key, special_map.get(key)))
            if text is not None:
                self.special_tokens[key] = text

        def token_id(key: str, fallback) -> Optional[int]:
            text = self.special_tokens.get(key)
            if text is not None:
                found = self._tokenizer.token_to_id(text)
                if found is None:
                    raise ValueError(f"{folder}: {key} {text!r} of the tokenizer configuration is not a token of "
                                     f"{path}")
                return found
            ids = _ids(fallback)
            return ids[0] if ids else None

        # bos_token: null (Qwen2) means no BOS, whatever config.json says; add_bos_token: false, none prepended.
        bos = (None if "bos_token" in config and config["bos_token"] is None
               else token_id("bos_token", generation.get("bos_token_id", model_config.get("bos_token_id"))))
        self.bos_id = bos if config.get("add_bos_token", True) is not False else None
        eos = token_id("eos_token", generation.get("eos_token_id", model_config.get("eos_token_id")))
        stops = ([eos] if eos is not None else []) + _ids(generation.get("eos_token_id"))
        self.stop_ids = list(dict.fromkeys(stops))
        self.eos_id = self.stop_ids[0] if self.stop_ids else None
        self.pad_id = token_id("pad_token", generation.get("pad_token_id", model_config.get("pad_token_id")))
        template = config.get("chat_template")
        jinja = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: Optional[str] = template if isinstance(template, str) else None

    @classmethod
    def from_parts(cls, tokenizer, path: str, *, bos_id: Optional[int], stop_ids: list[int], pad_id: Optional[int],
                   chat_template: Optional[str], special_tokens: dict[str, str]) -> "HFTokenizer":
        """An ``HFTokenizer`` around a ``tokenizers.Tokenizer`` built elsewhere (from a GGUF file's metadata, see
        :mod:`.tokenizer_gguf`), with its special ids given rather than read from a folder."""
        self = cls.__new__(cls)
        self._tokenizer, self.path = tokenizer, path
        self.bos_id, self.pad_id = bos_id, pad_id
        self.stop_ids = list(dict.fromkeys(stop_ids))
        self.eos_id = self.stop_ids[0] if self.stop_ids else None
        self.chat_template, self.special_tokens = chat_template, dict(special_tokens)
        return self

    @property
    def vocab_size(self) -> int:
        """Tokens of the vocabulary, added tokens included (the highest id + 1)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``: the tokenizer's model and normaliser only (no post-processor), then BOS first
        (when asked and the model has one) and EOS last (when asked). Special tokens written in ``text``
        (``<|im_start|>``) become their ids."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + ids + tail

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, offsets)`` of ``text`` (no BOS/EOS added): ``offsets[j] = (start, end)``, the characters of
        ``text`` that token j stands for."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)
