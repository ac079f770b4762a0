"""Memory of a callable: the peak of the bytes it allocates, and the bytes autograd keeps for its backward.

``peak_memory_bytes`` answers "how much memory does this attention need on top of its inputs":

* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus what was allocated before
  the call — the caching allocator's own book-keeping, exact at the tensor level.
* CPU: PyTorch's profiler with ``profile_memory=True`` records every allocation and free of the CPU allocator
  (size and time); replaying them in order gives the live bytes at each instant, and their maximum is the peak.
  This counts exactly the tensors the call creates (scores, softmax probabilities, outputs, gradients), not the
  Python heap, nor pages the allocator keeps cached, nor what other processes on the machine are doing — which
  a sampled RSS or ``ru_maxrss`` would mix in, at a resolution far coarser than one attention call. The cost is
  the profiler's overhead, so memory is measured in a separate call from the timed ones.

``saved_tensor_bytes`` answers "how much does a forward pass leave alive for the backward": every tensor autograd
saves passes through ``torch.autograd.graph.saved_tensors_hooks``; their storages are counted once each (a
tensor saved by two nodes, or two views of one buffer, are one allocation).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable

import torch


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _cpu_allocation_events(prof) -> list[tuple[int, int]]:
    """``(time_ns, signed bytes)`` of the CPU allocator's allocations (+) and frees (−) recorded by ``prof``."""
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            events.append((event.start_ns(), event.nbytes()))
    # Stable sort: events of one instant keep their recorded order (an allocation before its free).
    events.sort(key=lambda e: e[0])
    return events


def peak_from_allocation_events(signed_bytes: Iterable[int]) -> int:
    """The largest number of live bytes while replaying allocations (+n) and frees (−n) in order, counted from
    the live bytes at the start (frees of memory allocated before the call can make the running sum negative;
    they never count as a peak)."""
    live = peak = 0
    for delta in signed_bytes:
        live += delta
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side prints a line at every start and stop
    ("USDT: ... profiler_start"), hundreds of lines over a benchmark run, which Python cannot redirect."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device="cpu") -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started (see the module docstring).

    ``fn`` runs once; its return value is dropped inside the measurement, so an output counts while it is alive,
    like any other tensor of the call.
    """
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if torch.device(device).type != "cpu":
        raise ValueError(f"peak_memory_bytes measures 'cpu' or CUDA devices, got {device!r}")
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    with _native_stderr_silenced():
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    return peak_from_allocation_events(delta for _, delta in _cpu_allocation_events(prof))


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensorCounter:
    """Context manager counting the distinct storages autograd saves for the backward inside it.

        with SavedTensorCounter(exclude=inputs) as saved:
            out = attention(*inputs)
        saved.bytes  # what the forward keeps alive for the backward, beyond the inputs

    ``exclude``: tensors whose storages are not counted even if saved — typically the inputs, which are alive
    anyway, to count only what the forward pass adds (scores, probabilities, log-sum-exps, outputs).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._storages: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = _storage_key(t)
        if storage.data_ptr() != 0 and key not in self._excluded:  # an empty tensor has no storage to keep
            self._storages[key] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        """The sum of ``untyped_storage().nbytes()`` over the storages saved so far, each counted once."""
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(fn: Callable[[], object], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn()`` runs.

    Args:
        fn: runs the forward pass (its inputs requiring grad); the graph it builds is dropped afterwards.
        exclude: tensors whose storages are not counted (see :class:`SavedTensorCounter`).

    Returns:
        The sum of ``untyped_storage().nbytes()`` over the storages saved, each counted once.
    """
    with SavedTensorCounter(exclude) as counter:
        result = fn()
    del result  # free the graph: nothing of this measurement outlives it
    return counter.bytes
