"""Data parallelism with ``torch.distributed`` (launched by ``torchrun``): every rank holds the whole model,
takes its share of each global batch, and the adapter gradients are summed across ranks before the step.

The adapter is ~1.2M parameters for LLaMA-7B, so one all-reduce of one flat fp32 buffer per optimizer step is
all the communication there is; DDP's bucketing and overlap with backward would buy nothing measurable and
would need hooks on a model whose frozen part must stay out of it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..setting_error import SettingError


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job. ``world_size == 1`` (no process group) is plain single-process
    training.

    Attributes:
        rank: this process, ``0 .. world_size-1``; rank 0 writes metrics, checkpoints and the adapter.
        world_size: processes in the job.
        device: where this rank computes (``cuda:LOCAL_RANK`` on GPUs, the CPU otherwise).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def check_device(device: str | None) -> None:
    """Raise ``ValueError`` unless ``device`` is None, ``cpu``, or ``cuda[:N]`` with such a GPU
    here."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SettingError("{device} {value!r} is not a device; expected cpu, cuda or cuda:N", value=device) from None
    if parsed.type not in ("cpu", "cuda"):
        raise SettingError("{device} {value!r}: fastadapter runs on cpu or cuda[:N], not {type}", value=device,
                           type=parsed.type)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("{device} {value}: no CUDA GPU is available here (torch {torch}, CUDA {cuda}); use "
                               "{device} cpu", value=device, torch=torch.__version__,
                               cuda=torch.version.cuda or "not built in")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SettingError("{device} {value}: there are only {count} GPUs here", value=device,
                               count=torch.cuda.device_count())


def init_from_environment(device: str | None = None) -> DistributedContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``),
    with NCCL on GPUs and gloo on CPUs; a single process when ``WORLD_SIZE`` is unset or 1.

    Raises:
        ValueError: ``device`` is not ``cpu`` or an available ``cuda[:N]`` (see :func:`check_device`).
    """
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if world_size <= 1:
        return DistributedContext(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                              device=torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def all_reduce_gradients(parameters: list[torch.nn.Parameter], context: DistributedContext) -> None:
    """Sum the gradients of ``parameters`` over all ranks, in place (one flat buffer, one collective)."""
    if not context.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    """``values`` summed over all ranks (float64)."""
    if not context.active:
        return list(values)
    buffer = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.tolist()


def barrier(context: DistributedContext) -> None:
    if context.active:
        dist.barrier()
