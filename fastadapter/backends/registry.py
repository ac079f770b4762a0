"""The backend registry: the :class:`Backend` interface, registration, and the choice between backends.

A backend is one of two kinds:

* a *composition* (``fused = False``): :meth:`Backend.attention` returns the output as a differentiable PyTorch
  expression; autograd and ``torch.compile`` see through it (``reference``, ``sdpa``);
* a *fused kernel* (:class:`~.fused.FusedBackend`): ``forward`` returns ``(out, lse_w, lse_p)`` and ``backward``
  every gradient from the saved log-sum-exps; the backend registers them as its own ``torch.library`` custom
  ops, with an autograd formula and fake implementations (``triton``, ``cpu``).

Every backend takes the op's one :class:`~fastadapter.kernels.problem.AttentionProblem` and answers
:meth:`Backend.not_supported_reasons`; :func:`select_backend` returns the backend object that then runs the call
(the automatic choice takes the first backend of :data:`AUTOMATIC_ORDER` with no reasons, and an explicit choice
that cannot run raises with the reasons).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from ..kernels.problem import AttentionProblem


class Backend:
    """Base class of the backends. Subclasses set ``name``, ``fused`` and implement their half of the API."""

    name: str = ""
    fused: bool = False

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (None when it can)."""
        return None

    def not_supported_reasons(self, inp: AttentionProblem) -> list[str]:
        """Every reason this backend cannot run ``inp``; empty when it can."""
        reason = self.unavailable_reason()
        return [reason] if reason else []

    def automatic_choice_reasons(self, inp: AttentionProblem) -> list[str]:
        """Why the *automatic* choice should pass over this backend for ``inp`` (empty when it may take it).

        Defaults to :meth:`not_supported_reasons`; a backend that can run inputs only slowly (Triton's CPU
        interpreter) adds reasons here, so that it runs them only when asked for by name.
        """
        return self.not_supported_reasons(inp)

    def attention(self, inp: AttentionProblem) -> torch.Tensor:
        """The output, q's shape and dtype, differentiable with respect to every input tensor."""
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}

#: The order in which the automatic choice tries the backends: fastest first, the exact fallback last.
AUTOMATIC_ORDER = ("triton", "cpu", "sdpa", "reference")


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to the registry under ``backend.name`` (replacing one of the same name)."""
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def all_backends() -> list[Backend]:
    """Every registered backend, in automatic order first."""
    ordered = [_REGISTRY[n] for n in AUTOMATIC_ORDER if n in _REGISTRY]
    return ordered + [b for n, b in _REGISTRY.items() if n not in AUTOMATIC_ORDER]


def select_backend(inp: AttentionProblem, name: Optional[str] = None) -> Backend:
    """The backend that will run ``inp``.

    ``name`` (or, when it is None, the environment variable ``FASTADAPTER_BACKEND``) asks for one backend,
    which must be able to run the inputs; otherwise the first backend of :data:`AUTOMATIC_ORDER` that can.
    """
    if name is None:
        name = os.environ.get("FASTADAPTER_BACKEND") or None
    if name is not None:
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(inp)
        if reasons:
            raise ValueError(f"backend {name!r} cannot run these inputs ({inp.describe()}): " + "; ".join(reasons))
        return backend
    all_reasons = []
    for backend in all_backends():
        reasons = backend.automatic_choice_reasons(inp)
        if not reasons:
            return backend
        all_reasons.append(f"{backend.name}: " + "; ".join(reasons))
    raise ValueError(f"no backend can run these inputs ({inp.describe()}):\n  " + "\n  ".join(all_reasons))
