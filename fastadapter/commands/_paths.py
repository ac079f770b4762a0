"""Paths the commands find on their own (no torch import: ``fastadapter --help`` stays fast)."""
from __future__ import annotations

import os

#: The tokenizer files looked for beside a model, in order.
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.bin")


def default_tokenizer(model_path: str) -> str:
    """The tokenizer beside the model at ``model_path`` (a folder, or a file whose folder is searched): the first of
    :data:`TOKENIZER_NAMES` found there.

    Raises:
        FileNotFoundError: none of them is there (the message names the folder and the ``--tokenizer`` flag).
    """
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    for name in TOKENIZER_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no --tokenizer given and no {' or '.join(TOKENIZER_NAMES)} in {folder}")
