"""Paths of the commands, importable without torch (``fastadapter --help`` stays fast): the tokenizer a command
finds on its own, and the one rule every command follows for what it writes.

**No command writes over its own input.** Before it loads anything, a command calls :func:`check_outputs` with
the paths it will write and the paths it reads: an output that is one of the inputs (after resolving ``..`` and
symbolic links, or a hard link to the same file), or an existing file inside an input folder (a part of a model
folder), is refused; so is an existing output file unless the user passed ``--overwrite``. The file is then
replaced atomically with :func:`write_atomically` (a temporary file in the same folder, then ``os.replace``): a
crash or a full disk leaves the old file or the new one, never a torn one.
"""
from __future__ import annotations

import os
import uuid
from typing import Callable, Mapping, Optional, Sequence


def default_tokenizer(model_path: str) -> str:
    """The tokenizer beside the model at ``model_path`` (a folder, or a file whose folder is searched): the first of
    :data:`fastadapter.model.tokenizer.TOKENIZER_FILES` found there (``tokenizer.json``, ``tokenizer.model``,
    ``tokenizer.bin``), through :func:`fastadapter.model.tokenizer.find_tokenizer`, imported only when called.

    Raises:
        FileNotFoundError: none of them is there (the message names the folder and the ``--tokenizer`` flag).
    """
    from ..model.tokenizer import find_tokenizer
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
            are checked as separate outputs): it may exist, but may not be an input or lie inside one.
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
            if os.path.isdir(source) and _inside(out, source) and (what in folders or os.path.lexists(out)):
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


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Create or replace the file ``path`` atomically: ``write(temporary_path)`` writes a temporary file in the same
    folder (the folder is created), which then replaces ``path`` with ``os.replace``. When ``write`` fails (a full
    disk, a read-only folder), the temporary file is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, as open() gives
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
