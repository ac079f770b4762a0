"""The FLOP count of one zero-init attention call, as the benchmarks import it.

The one FLOP model of the project is :mod:`fastadapter.training.flops` (attention calls and whole training steps,
with the table of GPU peaks); this module only names its attention part for the suites.
"""
from __future__ import annotations

from fastadapter.training.flops import MODE_FACTORS, attention_flops, tflops_per_second

__all__ = ["MODE_FACTORS", "attention_flops", "tflops_per_second"]
