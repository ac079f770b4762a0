"""Triton kernels of zero-init attention (installed as ``fastadapter.kernels``).

* :func:`attention_forward` — fused forward: prefix softmax + online causal softmax over words, gated sum;
  saves the two log-sum-exps.
* :func:`attention_backward` — memory-efficient backward: preprocess (row statistics and prefix gradients),
  dk/dv kernel, dq kernel; probabilities recomputed from the saved log-sum-exps.
* :func:`compile_report` — ahead-of-time compilation for sm_80/sm_90 with register, spill, shared-memory and
  tensor-core figures (``python -m fastadapter.kernels.report`` prints it).

Importing this package never imports triton: the three functions are loaded on first access (PEP 562), so
``import fastadapter.kernels`` works where triton is not installed, and only using a kernel needs it.

Set ``TRITON_INTERPRET=1`` before importing triton to run the kernels on CPU tensors with Triton's interpreter.

This folder is the top-level ``kernels/`` of a source checkout. When the checkout's root is on ``sys.path`` (a
script, REPL or ``python -c`` started there), ``import kernels`` finds this file under the name ``kernels``,
which is also Hugging Face's kernels package, probed by transformers at import. Under that name this module
hands the import over to the ``kernels`` installed elsewhere on ``sys.path``, if any, and otherwise is an empty
module without a version, which transformers reports as "kernels not available"; it never shadows the real one.
"""
import importlib as _importlib

if __name__ != "fastadapter.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere) if "." not in __name__ else None
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this file
        _spec.loader.exec_module(_module)
    __all__: list = []
else:
    #: public name -> the submodule defining it
    _LAZY = {"attention_forward": ".forward", "attention_backward": ".backward", "compile_report": ".aot_compile"}
    __all__ = ["attention_forward", "attention_backward", "compile_report"]

    def __getattr__(name: str):
        """Import the submodule defining ``name`` (and with it triton) on first access."""
        if name not in _LAZY:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value

    def __dir__():
        return sorted(set(globals()) | set(__all__))
