"""Whether a checkpoint may be resumed by this run: what differs between the run that wrote it and this one
(settings, batch geometry, the data file, the examples), one line per difference, and the error that lists
them."""
from __future__ import annotations

from ..setting_error import SettingError, SettingMessage
from .train_config import TrainConfig

#: TrainConfig fields a resumed run must share with its checkpoint: they decide which rows each step sees
#: (batch_tokens, seed), the checkpoint's optimizer or scheduler state would silently override them (lr,
#: weight_decay, warmup_steps, min_lr_ratio), or they change what a step computes (grad_clip, dtype).
RESUME_KEYS = ("batch_tokens", "seed", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "dtype")


def resume_differences(state: dict, config: TrainConfig, rows_per_step: int, digests: dict
                       ) -> list[str | SettingMessage]:
    """What differs between the run that wrote checkpoint ``state`` and a run of ``config`` taking
    ``rows_per_step`` packed rows per optimizer step on examples of ``digests`` (``{"train", "eval"}``:
    :func:`~fastadapter.training.data.examples_digest`), one line per difference (empty: resuming continues the
    same run; a line that names settings is a :class:`~fastadapter.setting_error.SettingMessage`). Keys an older
    checkpoint did not record are not compared."""
    saved = state["config"]
    differences = []
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(config, key):
            differences.append(f"{key}={saved[key]}, this run has {key}={getattr(config, key)}")
    saved_rows = saved["grad_accum"] * state["world_size"]
    if saved_rows != rows_per_step:
        differences.append(f"{saved_rows} rows per step (grad_accum × world size), this run takes "
                           f"{rows_per_step}")
    saved_fingerprint, fingerprint = saved.get("fingerprint", {}), config.fingerprint
    for key in sorted(set(saved_fingerprint) & set(fingerprint)):
        before, now = saved_fingerprint[key], fingerprint[key]
        if isinstance(before, dict) and isinstance(now, dict) and "path" in before and "path" in now:
            if _without_path(before) != _without_path(now):
                differences.append(f"{key} file {_describe_file(before)}, this run's is {_describe_file(now)}")
        elif before != now:
            differences.append(f"{key}={before}, this run has {key}={now}")
    saved_digests = state.get("examples")
    if saved_digests is not None:
        parts = [name for name, part in (("training", "train"), ("eval", "eval"))
                 if saved_digests.get(part) != digests[part]]
        if parts:
            differences.append(SettingMessage("the {parts} examples differ (tokens or labels: other data, tokenizer, "
                                              "{max_seq_len}, {eval_fraction}, {on_bad_row} or {seed})",
                                              {"parts": " and the ".join(parts)}))
    return differences


def resume_refusal(differences: list[str | SettingMessage], source: str = "the checkpoint") -> SettingError:
    """The error (a ``ValueError``) that refuses to resume checkpoint ``source``: the ``differences`` of
    :func:`resume_differences`, one line each, and what to do instead."""
    lines = "".join(f"\n  {{difference_{i}}}" for i in range(len(differences)))
    return SettingError("{source} was made with other data or settings, so resuming it would not continue the "
                        "same run:" + lines + "\nresume with the checkpoint's data and settings, or start a new run "
                        "in another {out} folder", source=source,
                        **{f"difference_{i}": d for i, d in enumerate(differences)})


def _without_path(file: dict) -> dict:
    return {key: value for key, value in file.items() if key != "path"}


def _describe_file(file: dict) -> str:
    details = [f"{file['size']:,} bytes" if "size" in file else None,
               f"sha256 of its head {file['sha256_head'][:12]}…" if "sha256_head" in file else None]
    return f"{file['path']} ({', '.join(d for d in details if d)})"
