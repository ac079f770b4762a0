"""Lazy loader of ``fastadapter._C``, the compiled CPU kernels built from ``csrc/`` by ``setup.py``.

Importing ``fastadapter._C`` registers the ``torch.ops.fastadapter_cpu`` operators; this module then registers
their fake (meta) implementations so that ``torch.compile`` can trace them. When the library is missing (built
with ``FASTADAPTER_SKIP_BUILD=1``, no compiler, or a torch it was not built against) it warns once, and
:func:`unavailable_reason` says why, so the ``cpu`` backend declines and the automatic choice falls back.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Optional

import torch


def _register_fakes() -> None:
    """Shapes of the C++ ops' results, for ``torch.compile`` (mirrors csrc/registration.cpp)."""

    @torch.library.register_fake("fastadapter_cpu::forward")
    def _forward(q, k, v, prefix_k, prefix_v, gate, cu_seqlens, max_seqlen, causal, softmax_scale, gate_tanh):
        heads_q = q.shape[-2]
        lse_shape = (heads_q, q.shape[0]) if cu_seqlens is not None else (q.shape[0], heads_q, q.shape[1])
        return (q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32),
                q.new_empty(lse_shape, dtype=torch.float32))

    @torch.library.register_fake("fastadapter_cpu::backward")
    def _backward(grad_out, q, k, v, prefix_k, prefix_v, gate, out, lse_w, lse_p, cu_seqlens, max_seqlen, causal,
                  softmax_scale, gate_tanh):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape),
                prefix_v.new_empty(prefix_v.shape), gate.new_empty(gate.shape, dtype=torch.float32))


class ExtensionLoader:
    """Imports the compiled library at most once; remembers why it failed and warns about it once.

    No lock: ``torch.compile`` traces through the backend choice, and Dynamo cannot enter a lock. Two threads
    racing on the very first call both import (Python's import is thread-safe) and at worst both warn.
    """

    def __init__(self, importer: Callable[[], object] = lambda: importlib.import_module("fastadapter._C")):
        self._importer = importer
        self._tried = False
        self._error: Optional[str] = None

    def unavailable_reason(self) -> Optional[str]:
        """None when the kernels are loaded, else why they are not (the first call imports them)."""
        if not self._tried:
            self._tried = True
            try:
                self._importer()
                _register_fakes_once()
            except (ImportError, OSError) as error:
                self._error = (f"the compiled CPU kernels fastadapter._C are not available ({error}); "
                               f"reinstall with a C++ compiler and without FASTADAPTER_SKIP_BUILD: "
                               f"pip install --no-build-isolation -e .")
                warnings.warn(self._error + "; falling back to the sdpa backend on CPU", RuntimeWarning,
                              stacklevel=3)
        return self._error


_fakes_registered = False


def _register_fakes_once() -> None:
    global _fakes_registered
    if not _fakes_registered:
        _register_fakes()
        _fakes_registered = True


#: The process-wide loader (tests replace it to simulate a missing library).
LOADER = ExtensionLoader()


def unavailable_reason() -> Optional[str]:
    """None when ``torch.ops.fastadapter_cpu`` is usable, else why not (loads the library on first call)."""
    return LOADER.unavailable_reason()
