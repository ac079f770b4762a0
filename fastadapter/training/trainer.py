"""The LLaMA-Adapter training loop: packed batches, AdamW on the adapter only, warmup + cosine LR, gradient
accumulation and clipping, mixed precision, evaluation, metrics, atomic checkpoints, exact resume, graceful
SIGINT/SIGTERM, and data parallelism across ranks.

One optimizer step consumes a *global batch* of ``grad_accum × world_size`` packed rows of at most
``batch_tokens`` tokens; rank ``r`` runs rows ``r, r + world_size, ...`` of it. Every micro-batch's summed token
loss is divided by the number of loss tokens of the whole global batch (known to every rank, which holds the
whole data set's lengths), so summing gradients over micro-batches and ranks gives exactly the gradient of the
global batch's mean token loss — the same run whatever the split between ranks and accumulation.

A checkpoint records what the run was trained on — a digest of the training and eval examples, and the
caller's ``TrainConfig.fingerprint`` (``fastadapter train``: the data file, ``--max-seq-len``,
``--eval-fraction``, the adapter's settings) — and resuming refuses one that differs, listing every difference.

SIGINT and SIGTERM are caught from the start of :meth:`Trainer.run` on (resume, step-0 evaluation, training):
a running evaluation stops at its next packed row, a training step runs to its end, and the run then saves a
checkpoint (at step 0 when no step was taken) and returns with ``interrupted_by`` set.

Rank 0 holds ``config.out`` through :class:`~fastadapter.training.run_folder.RunFolder` for the whole run: a
lock against a second process, one run per folder, ``metrics.jsonl`` cut back atomically on resume. A loss or
an adapter that turns NaN or infinite raises :class:`TrainingDiverged` before anything of it is saved.

Backward stops at the lowest adapted layer by construction: :func:`fastadapter.add_adapter` freezes the base
model, so no activation below that layer requires a gradient and autograd records no graph there.

This module is the loop; its parts live beside it: the settings (``train_config``), the loss (``loss``), the
optimizer and the LR schedule (``optimizer``, ``schedule``), checkpoint files (``checkpoint``), what a resume
may differ in (``resume``), the run folder (``run_folder``) and the signals (``stop_signals``).
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Optional, Sequence

import torch
from torch import nn

from ..setting_error import SettingError
from .checkpoint import DataPosition, list_checkpoints, load_checkpoint, rng_state, set_rng_state, write_checkpoint
from .data import Example, examples_digest
from .distributed import DistributedContext, all_reduce_gradients, all_reduce_sum, barrier
from .fsdp import is_sharded
from .host_memory import return_freed_memory_to_os
from .loss import fuses_head_and_loss, token_loss_sum  # noqa: F401  (fuses_head_and_loss: re-exported for callers)
from .optimizer import adapter_parameters, build_optimizer
from .packing import collate_packed, pack_examples
from .resume import resume_differences, resume_refusal
from .run_folder import RunFolder
from .schedule import warmup_cosine
from .stop_signals import StopRequest
from .train_config import DTYPES, TrainConfig, TrainResult  # noqa: F401  (DTYPES: re-exported for callers)


class TrainingDiverged(SettingError):
    """The training loss or the adapter became NaN or infinite; nothing of the diverged state is saved."""


def epoch_rows(examples: Sequence[Example], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows of ``epoch``: the examples shuffled with ``(seed, epoch)``, then packed in that order."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rows = pack_examples([len(examples[i]) for i in order], batch_tokens)
    return [[order[i] for i in row] for row in rows]


class Trainer:
    """Runs :class:`TrainConfig` on an adapted model; see :func:`train`."""

    def __init__(self, model: nn.Module, train_examples: Sequence[Example], eval_examples: Sequence[Example],
                 config: TrainConfig, context: Optional[DistributedContext] = None, save_adapter_fn=None,
                 eval_hook=None, metrics_hook=None, collate_fn=None):
        self.model, self.config = model, config
        #: ``eval_hook(model, step, eval_loss)`` after every evaluation (rank 0), e.g. sample generations.
        self.eval_hook = eval_hook
        #: ``metrics_hook(record)`` with every metrics record (rank 0), e.g. TensorBoard scalars.
        self.metrics_hook = metrics_hook
        #: examples of one packed row → its batch (default collate_packed; images: image_data.collate_images).
        self.collate_fn = collate_fn or collate_packed
        self.context = context or DistributedContext(device=next(model.parameters()).device)
        if config.return_memory_to_os and self.context.device.type == "cpu":
            return_freed_memory_to_os()
        self.train_examples, self.eval_examples = list(train_examples), list(eval_examples)
        if not self.train_examples:
            raise ValueError("no training examples")
        for kind, examples in (("training", self.train_examples), ("eval", self.eval_examples)):
            for index, example in enumerate(examples):
                if len(example) > config.batch_tokens:
                    where = (f"data row {example.row}" if example.row is not None else f"{kind} example {index}")
                    raise SettingError("{where} has {length} tokens, more than a packed row holds ({batch_tokens} "
                                       "{value}); raise {batch_tokens} to at least {max_seq_len}", where=where,
                                       length=len(example), value=config.batch_tokens)
        self.run_folder: Optional[RunFolder] = None
        self.params = adapter_parameters(model)
        self._rows_cache: dict[int, list[list[int]]] = {}
        self.optimizer = build_optimizer(self.params, config)
        self.rows_per_step = config.grad_accum * self.context.world_size
        self.total_steps = self._count_total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup_steps=config.warmup_steps,
                                                    total_steps=self.total_steps, min_ratio=config.min_lr_ratio))
        device_type = self.context.device.type
        dtype = DTYPES[config.dtype]
        self.autocast = (torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext())
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
        self.save_adapter_fn = save_adapter_fn
        self.step = 0
        self.position = DataPosition()
        self.tokens_seen = 0
        self._digests: Optional[dict] = None

    # -- data -------------------------------------------------------------------------------------------------
    def _rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows_cache:
            self._rows_cache = {epoch: epoch_rows(self.train_examples, self.config.batch_tokens, self.config.seed,
                                                  epoch)}
        return self._rows_cache[epoch]

    def _steps_in_epoch(self, epoch: int) -> int:
        return len(self._rows(epoch)) // self.rows_per_step

    def _count_total_steps(self) -> int:
        if self._steps_in_epoch(0) == 0:
            raise SettingError("the {examples} training examples pack into {rows} rows of {tokens} tokens, fewer "
                               "than one step needs (grad_accum × world size = {per_step}); lower {batch_tokens} or "
                               "{grad_accum}", examples=len(self.train_examples), rows=len(self._rows(0)),
                               tokens=self.config.batch_tokens, per_step=self.rows_per_step)
        if self.config.max_steps is not None:
            return self.config.max_steps
        return sum(self._steps_in_epoch(e) for e in range(self.config.epochs))

    def _global_batch(self) -> list[list[Example]]:
        """The rows (as example lists) of the current step's global batch; advances the data position."""
        if self.position.step_in_epoch >= self._steps_in_epoch(self.position.epoch):
            self.position = DataPosition(self.position.epoch + 1, 0)
            if self._steps_in_epoch(self.position.epoch) == 0:
                raise SettingError("epoch {epoch} packs into {rows} rows, fewer than one step needs ({per_step}); "
                                   "lower {batch_tokens} or {grad_accum}", epoch=self.position.epoch,
                                   rows=len(self._rows(self.position.epoch)), per_step=self.rows_per_step)
        rows = self._rows(self.position.epoch)
        start = self.position.step_in_epoch * self.rows_per_step
        self.position = DataPosition(self.position.epoch, self.position.step_in_epoch + 1)
        return [[self.train_examples[i] for i in row] for row in rows[start:start + self.rows_per_step]]

    # -- one step -------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, int]:
        """One optimizer step; returns the global batch's mean token loss and its real token count."""
        global_batch = self._global_batch()
        loss_tokens = sum(e.loss_tokens for row in global_batch for e in row)
        real_tokens = sum(len(e) for row in global_batch for e in row)
        self.model.train()
        local_loss = 0.0
        for micro in range(self.config.grad_accum):
            batch = self.collate_fn(global_batch[micro * self.context.world_size + self.context.rank])
            with self.autocast:
                loss = token_loss_sum(self.model, batch.to(self.context.device)) / loss_tokens
            self.scaler.scale(loss).backward()
            local_loss += float(loss.detach())
        (loss_value,) = all_reduce_sum([local_loss], self.context)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(f"the training loss of step {self.step + 1} is {loss_value}")
        parameters = [p for _, p in self.params]
        all_reduce_gradients(parameters, self.context)
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += real_tokens
        # The adapter is small (1.2M values for LLaMA-7B): checking it costs nothing next to the step.
        broken = [name for name, p in self.params if not bool(torch.isfinite(p).all())]
        if broken:
            raise self._diverged(f"step {self.step} made {', '.join(broken[:3])}"
                                 f"{' and others' if len(broken) > 3 else ''} NaN or infinite")
        return loss_value, real_tokens

    def _diverged(self, what: str) -> TrainingDiverged:
        folder = os.path.join(self.config.out, "checkpoints")
        saved = list_checkpoints(folder)
        last = (f"the last checkpoint, {saved[-1][1]}, holds the adapter of step {saved[-1][0]}" if saved
                else "no checkpoint was saved")
        return TrainingDiverged("training diverged: {what} (lr {lr_value}, warmup {warmup_value} steps, grad clip "
                                "{grad_clip_value}, {dtype}); nothing of it is saved and {last}; lower {lr} or raise "
                                "{warmup_steps}", what=what, lr_value=self.config.lr,
                                warmup_value=self.config.warmup_steps, grad_clip_value=self.config.grad_clip,
                                dtype=self.config.dtype, last=last)

    @torch.no_grad()
    def evaluate(self, stop: Optional[StopRequest] = None) -> Optional[float]:
        """The mean token loss of the held-out examples; None when there are none, or when ``stop`` recorded a
        signal on any rank before the evaluation was complete (it stops at the next packed row)."""
        if not self.eval_examples:
            return None
        self.model.eval()
        rows = pack_examples([len(e) for e in self.eval_examples], self.config.batch_tokens)
        mine = rows[self.context.rank::self.context.world_size]
        # Under FSDP every forward gathers weights with the other ranks: all ranks run the same number of
        # forwards (a rank short of rows repeats its first one and ignores it) and agree on a signal at each row.
        lockstep = self.context.active and is_sharded(self.model)
        forwards = -(-len(rows) // self.context.world_size) if lockstep else len(mine)
        loss_sum, count, stopped = 0.0, 0, 0.0
        for index in range(forwards):
            signalled = float(stop is not None and stop.signum is not None)
            if lockstep and stop is not None:
                (signalled,) = all_reduce_sum([signalled], self.context)
            if signalled:
                stopped = 1.0
                break
            batch = self.collate_fn([self.eval_examples[i]
                                     for i in (mine[index] if index < len(mine) else rows[0])])
            with self.autocast:
                value = float(token_loss_sum(self.model, batch.to(self.context.device)))
            if index < len(mine):
                loss_sum += value
                count += batch.loss_tokens
        # One collective whether or not this rank stopped early, so that every rank agrees on the answer.
        loss_sum, count, stopped = all_reduce_sum([loss_sum, count, stopped], self.context)
        return None if stopped else loss_sum / count

    # -- state ----------------------------------------------------------------------------------------------
    def examples_digests(self) -> dict:
        """``{"train": ..., "eval": ...}``: :func:`~fastadapter.training.data.examples_digest` of each set."""
        if self._digests is None:
            self._digests = {"train": examples_digest(self.train_examples),
                             "eval": examples_digest(self.eval_examples)}
        return self._digests

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.position.epoch, "step_in_epoch": self.position.step_in_epoch,
                "tokens_seen": self.tokens_seen, "examples": self.examples_digests(),
                "adapter": {name: p.detach().clone() for name, p in self.params},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "config": asdict(self.config),
                "world_size": self.context.world_size,
                "run_id": self.run_folder.run_id if self.run_folder is not None else None}

    def resume_differences(self, state: dict) -> list[str]:
        """What differs between the run that wrote checkpoint ``state`` and this one (:func:`.resume.resume_differences`)."""
        return resume_differences(state, self.config, self.rows_per_step, self.examples_digests())

    def check_resumable(self, state: dict, source: str = "the checkpoint") -> None:
        """Raise a ``ValueError`` (:class:`~fastadapter.setting_error.SettingError`) listing
        :meth:`resume_differences` when there are any."""
        differences = self.resume_differences(state)
        if differences:
            raise resume_refusal(differences, source)

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        self.check_resumable(state, source)
        names = [name for name, _ in self.params]
        if sorted(state["adapter"]) != sorted(names):
            raise ValueError(f"{source} holds adapter parameters {sorted(state['adapter'])}, the model has "
                             f"{sorted(names)}")
        with torch.no_grad():
            for name, p in self.params:
                if state["adapter"][name].shape != p.shape:
                    raise ValueError(f"{source}: {name} has shape {list(state['adapter'][name].shape)}, the model's "
                                     f"is {list(p.shape)}")
                p.copy_(state["adapter"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.position = DataPosition(state["epoch"], state["step_in_epoch"])

    def save(self) -> Optional[str]:
        """Checkpoint (rank 0 writes, every rank waits for it); returns the path on rank 0.

        Raises :class:`~fastadapter.training.checkpoint.CheckpointWriteError` when the write fails (the older
        checkpoints are untouched)."""
        path = None
        if self.context.is_main:
            path = write_checkpoint(os.path.join(self.config.out, "checkpoints"), self.step, self.state_dict(),
                                    self.config.keep_checkpoints)
        barrier(self.context)
        return path

    # -- the run --------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.run_folder is not None:
            self.run_folder.log(record)
        if self.metrics_hook is not None and self.context.is_main:
            self.metrics_hook(record)

    def _after_eval(self, eval_loss: Optional[float]) -> None:
        if self.eval_hook is not None and self.context.is_main:
            was_training = self.model.training
            self.model.eval()
            with self.autocast:
                self.eval_hook(self.model, self.step, eval_loss)
            self.model.train(was_training)

    def _signalled(self, stop: StopRequest) -> Optional[int]:
        """The signal that asks this run to stop, when any rank received one (every rank must stop at the same
        step, so they agree on it), else None."""
        (signalled,) = all_reduce_sum([float(stop.signum or 0)], self.context)
        return (stop.signum or signal.SIGTERM) if signalled else None

    def run(self, resume: Optional[str] = None, *, run_folder: Optional[RunFolder] = None,
            overwrite: bool = False) -> TrainResult:
        """Train to ``total_steps`` (from ``resume``, a checkpoint file, when given).

        ``run_folder``: ``config.out`` already opened by the caller (see :class:`RunFolder`); by default rank 0
        opens and locks it for the run (``overwrite``: a new run may replace the run already there)."""
        own_folder = run_folder is None and self.context.is_main
        self._bar = None
        try:
            return self._run(resume, run_folder, overwrite)
        finally:
            if self._bar is not None:  # also when the run stops with an error (diverged, full disk)
                self._bar.close()
            if own_folder and self.run_folder is not None:
                self.run_folder.release()

    def _run(self, resume: Optional[str], run_folder: Optional[RunFolder], overwrite: bool) -> TrainResult:
        initial_eval = eval_loss = None
        loss = math.nan
        bar = None
        with StopRequest() as stop:
            state = None if resume is None else load_checkpoint(resume, map_location=self.context.device)
            if state is not None:
                self.check_resumable(state, resume)  # before the folder is touched
            if self.context.is_main:
                self.run_folder = run_folder or RunFolder.open(self.config.out, resume_state=state,
                                                               resume_path=resume, overwrite=overwrite)
            barrier(self.context)
            if state is not None:
                self.load_state_dict(state, resume)
                if self.run_folder is not None:
                    # Drop the lines the stopped run wrote past its checkpoint; the summary starts at step 0.
                    kept = self.run_folder.restart_metrics(self.step)
                    initial_eval = next((r.get("eval_loss") for r in kept if r["step"] == 0), None)
                    eval_loss = next((r["eval_loss"] for r in reversed(kept) if "eval_loss" in r), None)
                    loss = next((r["loss"] for r in reversed(kept) if "loss" in r), math.nan)
            if self.step == 0:
                initial_eval = eval_loss = self.evaluate(stop)
            interrupted = self._signalled(stop)
            if interrupted is not None:  # during the resume or the step-0 evaluation: keep what state exists
                initial_eval = eval_loss = None
                self.save()
            else:
                if self.step == 0:
                    self._log({"step": 0, "tokens": 0, "lr": self.scheduler.get_last_lr()[0],
                               "eval_loss": eval_loss})
                    self._after_eval(eval_loss)
                if self.config.progress and self.context.is_main:
                    from tqdm.auto import tqdm
                    bar = self._bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                               dynamic_ncols=True)
            while interrupted is None and self.step < self.total_steps:
                lr = self.scheduler.get_last_lr()[0]
                started = time.perf_counter()
                loss, real_tokens = self.train_step()
                seconds = time.perf_counter() - started
                record = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                          "tokens_per_s": real_tokens / seconds}
                final = self.step == self.total_steps
                if final or (self.config.eval_every and self.step % self.config.eval_every == 0):
                    value = self.evaluate(stop)
                    if value is not None:  # None: no eval examples, or a signal cut the evaluation short
                        eval_loss = record["eval_loss"] = value
                    if stop.signum is None:
                        self._after_eval(value)
                self._log(record)
                if bar is not None:
                    postfix = {"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                    if eval_loss is not None:
                        postfix["eval"] = f"{eval_loss:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                interrupted = self._signalled(stop)
                if interrupted is not None:
                    self.save()
                    break
                if final or (self.config.save_every and self.step % self.config.save_every == 0):
                    self.save()
        if bar is not None:
            bar.close()
        if interrupted is None and self.save_adapter_fn is not None and self.context.is_main:
            self.save_adapter_fn(self.model, os.path.join(self.config.out, "adapter.safetensors"))
        barrier(self.context)
        return TrainResult(self.step, loss, initial_eval, eval_loss, interrupted)


def train(model: nn.Module, train_examples: Sequence[Example], eval_examples: Sequence[Example],
          config: TrainConfig, *, resume: Optional[str] = None, context: Optional[DistributedContext] = None,
          save_adapter_fn=None, run_folder: Optional[RunFolder] = None, overwrite: bool = False,
          eval_hook=None, metrics_hook=None, collate_fn=None) -> TrainResult:
    """Fine-tune the adapter of ``model`` (already given one by :func:`fastadapter.add_adapter`).

    Args:
        model: called as ``model(tokens [1, T], cu_seqlens=int32 [N+1], max_seqlen=int) -> logits [1, T, V]``;
            its only trainable parameters are the adapter's (fp32).
        train_examples, eval_examples: tokenised examples (:func:`fastadapter.training.load_examples`).
        resume: a checkpoint file written by an earlier run with the same data and settings (see
            :meth:`Trainer.resume_differences`; a ``ValueError`` lists what differs).
        context: this process's rank in a ``torch.distributed`` job (default: single process).
        save_adapter_fn: ``fn(model, path)`` writing the final adapter (``OUT/adapter.safetensors``).
        run_folder: ``config.out`` already opened (and locked) by :meth:`RunFolder.open`; by default the run
            opens it itself and unlocks it at the end.
        overwrite: a new run replaces the run already in ``config.out`` instead of refusing the folder.
        eval_hook: ``fn(model, step, eval_loss)`` called on rank 0 after every evaluation (the model in eval mode,
            under the run's autocast), e.g. :class:`fastadapter.training.samples.SampleWriter`.
        metrics_hook: ``fn(record)`` called on rank 0 with every metrics record (``step``, ``loss``, ...).
        collate_fn: the examples of one packed row → a :class:`PackedBatch` (default :func:`collate_packed`; a
            batch's ``extra_inputs()`` go to the model with its tokens: images to a multimodal model).

    Returns:
        :class:`TrainResult`.

    Raises:
        RunFolderError: ``config.out`` is locked by another process or holds another run.
        TrainingDiverged: the loss or the adapter became NaN or infinite (nothing of it is saved).
        OSError: a checkpoint or the metrics could not be written (the checkpoints before it are intact).
    """
    return Trainer(model, train_examples, eval_examples, config, context, save_adapter_fn, eval_hook=eval_hook,
                   metrics_hook=metrics_hook, collate_fn=collate_fn).run(
        resume, run_folder=run_folder, overwrite=overwrite)
