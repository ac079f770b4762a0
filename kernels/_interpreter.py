"""Whether Triton kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``), and what that changes.

The interpreter runs every program of a grid in Python with NumPy, which is how the kernels are tested on a
machine without a GPU. Two things differ from compiled code:

* ``tl.dot`` on bf16 operands returns garbage under the interpreter (triton-lang/triton issue 11584, seen here
  with triton 3.9), so the launchers ask the kernels to upcast dot operands to fp32 while interpreting, and keep
  the fp16/bf16 tensor-core dots in compiled code;
* autotuning is meaningless (there is no GPU timer) and slow, so a single small configuration is used.
"""
from __future__ import annotations

import os

_FALSE_VALUES = ("", "0", "false", "off", "no")


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set: ``@triton.jit`` functions then run on CPU tensors in Python.

    Read from the environment each time (Triton itself reads it when a kernel is decorated, i.e. at import).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in _FALSE_VALUES
