"""Paths of the commands, importable without torch (``fastadapter --help`` stays fast): the tokenizer a command
finds on its own, and the one rule every command follows for what it writes.

**No command writes over its own input.** Before it loads anything, a command calls :func:`check_outputs` with
the paths it will write and the paths it reads: an output that is one of the inputs (after resolving ``..`` and
symbolic links, or a hard link to the same file), or an existing file inside an input folder (a part of a model
folder), is refused; so is an existing output file unless the user passed ``--overwrite``. The file is then
replaced atomically with :func:`fastadapter.atomic_file.write_atomically` (a temporary file in the same folder, then ``os.replace``): a
crash or a full disk leaves the old file or the new one, never a torn one.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from ..atomic_file import write_atomically  # noqa: F401  (the commands' writer, re-exported)


def default_tokenizer(model_path: str) -> str:
    """The tokenizer beside the model at ``model_path`` (a folder, or a file whose folder is searched): the first of
    :data:`fastadapter.tokenizers.tokenizer.TOKENIZER_FILES` found there (``tokenizer.json``, ``tokenizer.model``,
    ``tokenizer.bin``), through :func:`fastadapter.tokenizers.tokenizer.find_tokenizer`, imported only when called.

    Raises:
        FileNotFoundError: none of them is there (the message names the folder and the ``--tokenizer`` flag).
    """
    from ..tokenizers.tokenizer import find_tokenizer
    return find_tokenizer(model_path)


class OutputPathError(ValueError):
    """An output path that would write over an input, or over an existing file without ``--overwrite``."""


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_outputs(outputs: Mapping[str, Optional[str]], inputs: Mapping[str, Optional[str]], *,
                  overwrite: bool = False, folders: Sequence[str] = ()) -> None:
    """Refuse outputs that would write over an input, or over an existing file without ``--overwrite``.

    Args:
        outputs: ``{what: path}`` of the files the command writes (``"--out"``, ``"--out/adapter_config.json"``);
            a None path is skipped. A name listed in ``folders`` is a folder the command writes into (its files
            are checked as separate outputs): it may exist, but may not be an input.
        inputs: ``{flag: path}`` of what the command reads (None: not given).
        overwrite: the user passed ``--overwrite``: an existing output file that is not an input may be replaced.

    Raises:
        OutputPathError: an output is an input (symbolic links and hard links resolved), an existing file inside an
            input folder, or, without ``overwrite``, an existing file; also an output file that is a folder.
    """
    given = {flag: path for flag, path in inputs.items() if path}
    for what, out in outputs.items():
        if not out:
            continue
        for flag, source in given.items():
            if _same(out, source):
                raise OutputPathError(f"{what} {out} is the {flag} input {source}: writing it would destroy the "
                                      f"input; choose another output path")
            if what not in folders and os.path.isdir(source) and _inside(out, source) and os.path.lexists(out):
                raise OutputPathError(f"{what} {out} lies inside the {flag} folder {source}: writing it would change "
                                      f"the input; choose an output path outside it")
        if what in folders:
            if os.path.exists(out) and not os.path.isdir(out):
                raise OutputPathError(f"{what} {out} is a file; expected a folder")
            continue
        if os.path.isdir(out):
            raise OutputPathError(f"{what} {out} is a folder; expected the path of a file")
        if os.path.lexists(out) and not overwrite:
            raise OutputPathError(f"{what} {out} already exists; pass --overwrite to replace it, or choose another "
                                  f"path")
