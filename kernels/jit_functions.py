"""The ``@triton.jit`` function of each kernel, by the name :mod:`.configs` gives it (``"forward"``,
``"backward_preprocess"``, ``"backward_dkdv"``, ``"backward_dq"``).

For the callers above the kernels that compile one without launching it: the ``triton`` backend judging a GPU
before the first launch (:func:`.autotune.decline_reason`) and the compile matrix (:mod:`.aot_compile`). The
launch plan itself never imports a kernel: it compiles the function it is handed.
"""
from __future__ import annotations

from . import backward_dkdv, backward_dq, backward_preprocess, forward

#: kernel name -> its autotuned kernel (the ``@triton.jit`` function is its ``.fn``)
_AUTOTUNED = {"forward": forward.zero_init_attention_forward_kernel,
              "backward_preprocess": backward_preprocess.zero_init_attention_backward_preprocess_kernel,
              "backward_dkdv": backward_dkdv.zero_init_attention_backward_dkdv_kernel,
              "backward_dq": backward_dq.zero_init_attention_backward_dq_kernel}


def jit_function(kernel: str):
    """The ``@triton.jit`` function of ``kernel``: the one its autotuner launches and its pruner compiles."""
    if kernel not in _AUTOTUNED:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {tuple(_AUTOTUNED)}")
    return _AUTOTUNED[kernel].fn
