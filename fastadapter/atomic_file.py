"""``write_atomically``: create or replace a file so that a crash, a kill or a full disk leaves the old file or the
new one, never a torn one (a temporary file in the same folder, then ``os.replace``, atomic on POSIX and
Windows)."""
from __future__ import annotations

import os
import uuid
from typing import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Create or replace the file ``path`` atomically: ``write(temporary_path)`` writes a temporary file in the same
    folder (the folder is created), which then replaces ``path`` with ``os.replace``. The temporary file is created
    with mode 0666 less the umask, as ``open`` gives. When ``write`` fails (a full disk, a read-only folder), the
    temporary file is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
