"""fastadapter: fused kernels for LLaMA-Adapter's zero-init attention, and the model, training loop,
integrations and benchmarks built on them.

The public names below are imported on first use (PEP 562 ``__getattr__``), so that ``import fastadapter.cli``
— every ``fastadapter`` command, ``--help`` included — does not pay for importing torch before it needs it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "AttentionProblem": ".kernels.problem",
    "zero_init_attention": ".attention",
    "zero_init_attention_varlen": ".attention",
    "ZeroInitAttention": ".module",
    "zero_init_attention_reference": ".reference",
    **{name: ".model" for name in ("LlamaConfig", "LlamaModel", "generate")},
    **{name: ".adapters" for name in ("AdapterConfig", "add_adapter", "load_adapter", "save_adapter")},
    "load_model": ".loaders",
    "load_tokenizer": ".tokenizers",
}

__all__ = ["zero_init_attention", "zero_init_attention_varlen", "zero_init_attention_reference",
           "ZeroInitAttention", "AttentionProblem",
           "LlamaConfig", "LlamaModel", "load_model", "AdapterConfig", "add_adapter", "save_adapter", "load_adapter",
           "load_tokenizer", "generate",
           "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastadapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
