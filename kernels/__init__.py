"""Triton kernels of zero-init attention (installed as ``fastadapter.kernels``).

* :func:`attention_forward` — fused forward: prefix softmax + online causal softmax over words, gated sum;
  saves the two log-sum-exps.
* :func:`attention_backward` — memory-efficient backward: preprocess (row statistics and prefix gradients),
  dk/dv kernel, dq kernel; probabilities recomputed from the saved log-sum-exps.
* :func:`compile_report` — ahead-of-time compilation for sm_80/sm_90 with register, spill, shared-memory and
  tensor-core figures (``python -m fastadapter.kernels.report`` prints it).

Set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU tensors with Triton's interpreter.
"""
from .backward import attention_backward
from .aot_compile import compile_report
from .forward import attention_forward

__all__ = ["attention_forward", "attention_backward", "compile_report"]
