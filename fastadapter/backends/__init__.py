"""Every implementation of zero-init attention, and the choice between them (:mod:`.registry`).

A backend is one of two kinds:

* a *composition* (``fused = False``): :meth:`Backend.attention` returns the output as a differentiable PyTorch
  expression; autograd and ``torch.compile`` see through it (``reference``, ``sdpa``);
* a *fused kernel* (:class:`~.fused.FusedBackend`): ``forward`` returns ``(out, lse_w, lse_p)`` and ``backward``
  every gradient from the saved log-sum-exps; the backend registers them as its own ``torch.library`` custom
  ops, with an autograd formula and fake implementations (``triton``, ``cpu``).
"""
import importlib

from .registry import AUTOMATIC_ORDER, Backend, all_backends, get_backend, register_backend, select_backend

__all__ = ["Backend", "register_backend", "get_backend", "all_backends", "select_backend", "AUTOMATIC_ORDER"]

# The built-in backends register themselves when imported, here, at import time rather than on first use, so that
# torch.compile never has to trace an import (its first call may be a compiled one). A backend whose dependencies
# are missing cannot break the others.
from . import reference, sdpa  # noqa: E402,F401

for _module in ("triton", "cpu"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ImportError:
        pass
