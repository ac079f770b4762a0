"""Paths the commands find on their own, importable without torch (``fastadapter --help`` stays fast)."""
from __future__ import annotations


def default_tokenizer(model_path: str) -> str:
    """The tokenizer beside the model at ``model_path`` (a folder, or a file whose folder is searched): the first of
    :data:`fastadapter.model.tokenizer.TOKENIZER_FILES` found there (``tokenizer.json``, ``tokenizer.model``,
    ``tokenizer.bin``), through :func:`fastadapter.model.tokenizer.find_tokenizer`, imported only when called.

    Raises:
        FileNotFoundError: none of them is there (the message names the folder and the ``--tokenizer`` flag).
    """
    from ..model.tokenizer import find_tokenizer
    return find_tokenizer(model_path)
