"""The run folder (``fastadapter train --out``): one run per folder, one process writing it at a time.

A folder holds ``run.json`` (the run's identity), ``metrics.jsonl``, ``checkpoints/step_NNNNNN.pt`` and, at the
end, ``adapter.safetensors``. :class:`RunFolder` guards it:

* **a lock** (``flock`` on ``OUT/.lock``, held until the process ends or :meth:`RunFolder.release`): a second
  process writing the same folder is refused instead of mixing its files with the first one's;
* **one run per folder**: a new run refuses a folder that already holds a run (its checkpoints would be pruned
  as if they were the new run's, and ``--resume`` would pick them), unless told to overwrite it; a resume
  refuses a folder that holds another run than its checkpoint's (``run.json``'s ``run_id`` is saved in every
  checkpoint);
* **nothing torn**: ``metrics.jsonl`` is cut back to the resumed step by writing a new file and renaming it over
  the old one (a kill at any moment leaves the old or the new file, never an empty one), a torn last line (a
  kill in the middle of a write) is dropped, and temporary files that a killed process left behind are removed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; the folder checks still apply
    fcntl = None

from ..setting_error import NamesSettings
from .checkpoint import list_checkpoints

METRICS = "metrics.jsonl"
RUN_FILE = "run.json"
ADAPTER = "adapter.safetensors"
LOCK = ".lock"


class RunFolderError(NamesSettings, ValueError):
    """A run folder that this run may not use: locked by another process, holding another run, or not a
    folder; the message says which and what to do."""


def _temporary_files(folder: str) -> list[str]:
    """Temporary files of interrupted atomic writes in ``folder`` and its ``checkpoints/``: ``.step_*.pt.tmp-PID``
    (checkpoints), ``.adapter-*.safetensors.tmp`` (adapters), ``.metrics.jsonl.tmp-PID``."""
    found = []
    for where in (folder, os.path.join(folder, "checkpoints")):
        if not os.path.isdir(where):
            continue
        for name in os.listdir(where):
            if name.startswith(".") and (".tmp-" in name or name.endswith(".tmp")):
                found.append(os.path.join(where, name))
    return found


class RunFolder:
    """The ``--out`` folder of one training run, locked for this process.

    Use :meth:`open` (it creates the folder, locks it and checks that this run may use it); the trainer reads
    :attr:`run_id` and writes through :meth:`log` and :meth:`restart_metrics`.
    """

    def __init__(self, out: str):
        self.out = os.fspath(out)
        self.run_id: Optional[str] = None
        self._lock_file = None

    # -- lock ----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, out: str, *, resume_state: Optional[dict] = None, resume_path: Optional[str] = None,
             overwrite: bool = False) -> "RunFolder":
        """Create and lock ``out``, then check that this run may write it.

        Args:
            resume_state: the checkpoint being resumed (its ``run_id`` is compared with the folder's), or None
                for a new run.
            resume_path: where that checkpoint is (for messages, and to recognise a checkpoint of this folder
                written before run ids existed).
            overwrite: a new run deletes the run already in ``out`` (its checkpoints, metrics and adapter)
                instead of refusing the folder.

        Raises:
            RunFolderError: ``out`` is a file, is locked by another process, or holds another run.
            OSError: the folder cannot be created or written (read-only, full disk).
        """
        folder = cls(out)
        if os.path.exists(folder.out) and not os.path.isdir(folder.out):
            raise RunFolderError.naming("{out} {path} is a file; expected a folder for the run (metrics.jsonl, "
                                        "checkpoints/, adapter.safetensors)", path=folder.out)
        os.makedirs(folder.out, exist_ok=True)
        folder._acquire()
        try:
            if resume_state is None:
                folder._claim_new(overwrite)
            else:
                folder._claim_resumed(resume_state, resume_path)
            for path in _temporary_files(folder.out):  # the lock is ours: no other process is writing them
                os.remove(path)
        except BaseException:
            folder.release()
            raise
        return folder

    def _acquire(self) -> None:
        if fcntl is None:
            return
        path = os.path.join(self.out, LOCK)
        lock_file = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise RunFolderError.naming("{out} {path} is in use by another fastadapter train (pid {holder}); wait "
                                        "for it to finish, or choose another {out} folder", path=self.out,
                                        holder=holder) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file

    def release(self) -> None:
        """Unlock the folder (also done by the operating system when the process ends)."""
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- one run per folder --------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def existing_run(self) -> list[str]:
        """What of a run the folder already holds (names relative to it), empty when none. ``run.json`` alone
        does not count: a run that stopped before its first metrics line (a model that failed to load) left
        nothing to lose."""
        found = [name for name in (METRICS, ADAPTER) if os.path.exists(self._path(name))]
        checkpoints = list_checkpoints(self._path("checkpoints"))
        if checkpoints:
            found.append(f"checkpoints/ ({len(checkpoints)} checkpoints, the newest "
                         f"{os.path.basename(checkpoints[-1][1])})")
        return found

    def _read_run_id(self) -> Optional[str]:
        try:
            with open(self._path(RUN_FILE), encoding="utf-8") as f:
                return json.load(f).get("run_id")
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return None  # a torn run.json: treated as a folder of unknown run

    def _write_run_id(self, run_id: str) -> None:
        temporary = self._path(f".{RUN_FILE}.tmp-{os.getpid()}")
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"run_id": run_id}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self._path(RUN_FILE))
        self.run_id = run_id

    def _claim_new(self, overwrite: bool) -> None:
        existing = self.existing_run()
        if existing and not overwrite:
            raise RunFolderError.naming("{out} {path} already holds a run ({existing}); continue it with {resume}, "
                                        "start the new run in another {out} folder, or pass {overwrite} to delete "
                                        "the old run", path=self.out, existing=", ".join(existing))
        if existing:
            for name in (RUN_FILE, METRICS, ADAPTER):
                if os.path.exists(self._path(name)):
                    os.remove(self._path(name))
            for _, path in list_checkpoints(self._path("checkpoints")):
                os.remove(path)
        self._write_run_id(uuid.uuid4().hex)

    def _claim_resumed(self, state: dict, resume_path: Optional[str]) -> None:
        checkpoint_run = state.get("run_id")
        folder_run = self._read_run_id()
        inside = resume_path is not None and os.path.dirname(os.path.abspath(resume_path)) == os.path.abspath(
            self._path("checkpoints"))
        existing = self.existing_run()
        if folder_run is not None and checkpoint_run is not None and folder_run != checkpoint_run:
            raise RunFolderError.naming("{out} {path} holds another run than the checkpoint {resume_path} (run "
                                        "{folder_run}, the checkpoint's is {checkpoint_run}); resume into the "
                                        "checkpoint's own folder or into an empty {out} folder", path=self.out,
                                        resume_path=resume_path, folder_run=folder_run[:8],
                                        checkpoint_run=checkpoint_run[:8])
        if folder_run is None and existing and not inside:
            raise RunFolderError.naming("{out} {path} already holds a run ({existing}) and the checkpoint "
                                        "{resume_path} is not one of its; resume into the checkpoint's own folder or "
                                        "into an empty {out} folder", path=self.out, existing=", ".join(existing),
                                        resume_path=resume_path)
        self._write_run_id(checkpoint_run or folder_run or uuid.uuid4().hex)
        if not os.path.exists(self._path(METRICS)) and resume_path is not None:
            # Resumed into a new folder: bring the run's metrics along (the summary and plots start at step 0).
            source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(resume_path))), METRICS)
            if os.path.isfile(source):
                shutil.copyfile(source, self._path(METRICS))

    # -- metrics -------------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl``; lines that are not JSON objects (a torn last line) are left out with
        a warning."""
        try:
            with open(self._path(METRICS), encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                warnings.warn(f"{self._path(METRICS)}: line {number} is not a metrics record (torn by a killed "
                              f"run?); dropped", stacklevel=2)
                continue
            records.append(record)
        return records

    def restart_metrics(self, step: int) -> list[dict]:
        """Cut ``metrics.jsonl`` back to the records of steps ``<= step`` (none when ``step`` is 0: a run
        resumed at step 0 logs step 0 again) and return them. The file is replaced atomically."""
        kept = [r for r in self.read_metrics() if 0 < step and r["step"] <= step]
        temporary = self._path(f".{METRICS}.tmp-{os.getpid()}")
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self._path(METRICS))
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return kept

    def log(self, record: dict) -> None:
        """Append one record to ``metrics.jsonl`` (one ``write`` of one line)."""
        with open(self._path(METRICS), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
