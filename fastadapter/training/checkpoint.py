"""Training checkpoints: the adapter, the optimizer, the LR scheduler, the RNG states and the position in the
data — everything a run needs to continue exactly where it stopped — and nothing of the frozen base model.

A checkpoint is one ``torch.save`` file ``OUT/checkpoints/step_000120.pt``, written to a temporary file in the
same folder and renamed over the final name, so a crash or a kill mid-write never leaves a truncated checkpoint
behind (``os.replace`` is atomic on POSIX and Windows).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..setting_error import NamesSettings, SettingMessage

FORMAT = "fastadapter-training-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointNotFound(NamesSettings, FileNotFoundError):
    """The checkpoint to resume (``resume``) names nothing usable."""


class CheckpointWriteError(NamesSettings, OSError):
    """A checkpoint that could not be written (full disk, lost permission): an ``OSError`` with the errno of the
    failed write, whose ``strerror`` says which checkpoint is the last good one and how to go on."""


@dataclass
class DataPosition:
    """Where the run is in its data: the epoch, and the optimizer steps already taken in it."""

    epoch: int = 0
    step_in_epoch: int = 0


def rng_state() -> dict:
    """Every RNG the training loop may draw from (torch CPU and CUDA, Python's ``random``)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"step_{step:06d}.pt")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the checkpoints in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    payload = {"format": FORMAT, "version": VERSION, **state}
    try:
        with open(temporary, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_checkpoint(folder: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Save ``state`` as the checkpoint of ``step`` in ``folder`` (:func:`save_checkpoint`), then keep only the
    newest ``keep`` of the folder (:func:`prune_checkpoints`); returns the checkpoint's path.

    Raises:
        CheckpointWriteError: the write failed (full disk, lost permission); the older checkpoints are untouched,
            and the message names the last good one.
    """
    path = checkpoint_path(folder, step)
    try:
        save_checkpoint(path, state)
    except OSError as exc:
        saved = list_checkpoints(folder)
        last = f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint was saved yet"
        message = SettingMessage("{strerror} while writing the checkpoint of step {step} ({last}; fix this, then "
                                 "continue with {resume})", dict(strerror=exc.strerror, step=step, last=last))
        error = CheckpointWriteError(exc.errno, str(message), path)
        error.setting_message = message
        raise error from exc
    prune_checkpoints(folder, keep)
    return path


def prune_checkpoints(folder: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of ``folder`` (``keep <= 0`` keeps every one)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep]:
        os.remove(path)


def resolve_resume(resume: str, out: str) -> str:
    """The checkpoint file that ``--resume`` names: a file, a folder of checkpoints, or a run folder (its
    ``checkpoints/``); a folder means its newest checkpoint."""
    if os.path.isfile(resume):
        return resume
    for folder in (resume, os.path.join(resume, "checkpoints")):
        found = list_checkpoints(folder)
        if found:
            return found[-1][1]
    raise CheckpointNotFound.naming("{resume} {path}: no checkpoint there (expected a step_NNNNNN.pt file, or a "
                                    "folder holding some, or a run folder with checkpoints/; {out} is {out_path})",
                                    path=resume, out_path=out)


def load_checkpoint(path: str, map_location: Optional[str | torch.device] = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; raises ``ValueError`` for any other file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a corrupt or foreign file
        raise ValueError(f"{path}: not a readable training checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fastadapter training checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')}, this fastadapter reads {VERSION}")
    return state
