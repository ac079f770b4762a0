"""``--device`` and ``--dtype`` for the commands that run a model (train, generate, eval), chosen one way.

The automatic device is CUDA when a GPU is present, else the CPU; the automatic dtype is bf16 on a GPU that
computes in it (sm_80 and later) and fp32 elsewhere (CPUs, older GPUs): what the fused kernels run fastest and
what keeps a frozen base's outputs close to fp32. torch is imported only when a choice is resolved, so that the
parsers (``fastadapter --help``) stay fast.
"""
from __future__ import annotations

import argparse
from typing import Optional

#: ``--dtype`` names and the torch dtypes they mean (the adapter's own parameters always stay fp32).
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def add_device_arguments(parser: argparse.ArgumentParser, *, dtype_help: str = "the model's compute dtype") -> None:
    """Add ``--device`` (``cpu``, ``cuda``, ``cuda:N``; default automatic) and ``--dtype`` (``auto`` or one of
    :data:`DTYPE_NAMES`) to ``parser``."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=("auto",) + DTYPE_NAMES,
                        help=f"{dtype_help} (default auto: bf16 on a GPU of sm_80 or later, else fp32)")


def resolve_device(name: Optional[str]):
    """The ``torch.device`` that ``--device name`` asks for; ``None`` is automatic (CUDA when available).

    Raises:
        ValueError: not a device, not cpu/cuda, or a GPU this machine does not have (the message says which).
    """
    import torch

    from ..training.distributed import check_device
    check_device(name)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: Optional[str], device) -> "torch.dtype":  # noqa: F821 - torch is imported lazily
    """The torch dtype that ``--dtype name`` means on ``device``; ``None``/``"auto"`` picks bf16 on a CUDA
    device of sm_80 or later and fp32 elsewhere.

    Raises:
        ValueError: an unknown name, or fp16/bf16 asked of a device that cannot compute in it.
    """
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    device = torch.device(device)
    if name is None or name == "auto":
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            return torch.bfloat16
        return torch.float32
    if name not in dtypes:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    if name == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise ValueError(f"--dtype bf16 needs a GPU of sm_80 or later; {device} is "
                         f"sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}: use --dtype fp16")
    return dtypes[name]
