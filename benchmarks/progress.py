"""Progress of a benchmark run: lines that reach a log file as they happen, and a bar on a terminal.

Python buffers stdout in blocks when it is not a terminal (``nohup``, CI, ``| tee``), which held every line of a
run back until its end; :class:`Progress` flushes each line. On a terminal a tqdm bar over the suites stays
below the lines (it names the running suite and the elapsed time).
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO


class Progress:
    """``log(line)`` prints and flushes a line; on a terminal, a bar of ``total`` suites below the lines.

    Args:
        total: number of suites of the run.
        stream: where lines go (default ``sys.stdout``, read when each line is printed).
        enabled: False: no bar, and :meth:`log` is never used by the caller (a caller-given log replaces it).
    """

    def __init__(self, total: int, stream: Optional[TextIO] = None, enabled: bool = True):
        self._stream = stream
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="suite", file=self.stream, dynamic_ncols=True, leave=False)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def log(self, line: str) -> None:
        """Print ``line`` at once (above the bar, when there is one)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def describe(self, suite: str) -> None:
        """Name the running suite on the bar."""
        if self._bar is not None:
            self._bar.set_description(suite)

    def advance(self) -> None:
        """One more suite done."""
        if self._bar is not None:
            self._bar.update(1)
            self._bar.refresh()  # a suite takes seconds to minutes: always redraw, whatever tqdm's mininterval

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
