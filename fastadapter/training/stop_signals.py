"""Graceful stop: SIGINT and SIGTERM are recorded instead of killing the run, which then checkpoints at the end of
its current step (or evaluation row)."""
from __future__ import annotations

import signal
from typing import Optional


class StopRequest:
    """Records SIGINT/SIGTERM instead of dying, so the run can checkpoint at the end of the current step (or
    evaluation row)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous.clear()
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
