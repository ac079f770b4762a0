"""The exp of the CPU kernels' softmax (csrc/vec_exp.h, ``torch.ops.fastadapter_cpu.softmax_exp``) against the exact
exp: the avx512 variant's own exp within 2 ulp wherever e^x is a normal float, exactly 0 below that (never a
denormal) and for −inf, inf past 88.8 and NaN for NaN; the other variants' at::vec ``exp_u20`` within its 20 ulp
from −86.9 on (its AVX2 code gives 0 a little above the bottom of the normal range)."""
import math

import pytest
import torch

#: The smallest normal float32 and the spacing of float32 at 1 (one ulp, relative).
NORMAL_MIN = 2.0 ** -126
ULP = 2.0 ** -23
#: The bound of each variant's exp in ulp: the avx512 variant's own (vec_exp.h), at::vec's exp_u20 elsewhere.
BOUND_ULP = {"avx512": 2.0, "avx2": 20.0, "generic": 20.0}


def _softmax_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastadapter_cpu.softmax_exp(x)


def _grid(low: float, high: float, count: int) -> torch.Tensor:
    """``count`` float32 values from ``low`` to ``high`` plus the float32 neighbours of the integers of ln(2)
    multiples, where the range reduction changes n: odd counts keep the grid off round numbers."""
    grid = torch.linspace(low, high, count, dtype=torch.float64)
    steps = torch.arange(math.ceil(low / math.log(2)), math.floor(high / math.log(2)) + 1, dtype=torch.float64)
    edges = (steps + 0.5) * math.log(2)
    return torch.cat([grid, edges, edges.nextafter(torch.tensor(-math.inf, dtype=torch.float64))]).float()


def test_within_the_variants_bound(cpu_variant):
    x = _grid(-86.9, 88.5, 1_000_003)
    got = _softmax_exp(x).double()
    exact = torch.exp(x.double())
    error_ulp = ((got - exact).abs() / exact / ULP).max().item()
    assert error_ulp <= BOUND_ULP[cpu_variant], f"{cpu_variant}: {error_ulp:.2f} ulp off e^x"


def test_within_two_ulp_wherever_e_to_the_x_is_a_normal_float_on_avx512(force_cpu_variant):
    force_cpu_variant("avx512")
    x = _grid(math.log(NORMAL_MIN), 88.72, 1_000_003)
    x = x[torch.exp(x.double()) >= NORMAL_MIN]
    exact = torch.exp(x.double())
    assert ((_softmax_exp(x).double() - exact).abs() / exact / ULP).max().item() <= BOUND_ULP["avx512"]


def test_special_values_on_avx512(force_cpu_variant):
    force_cpu_variant("avx512")
    x = torch.tensor([-math.inf, math.inf, math.nan, 0.0, -0.0, 88.8, 100.0, 1e30, -88.0, -100.0, -1e30])
    got = _softmax_exp(x)
    assert got[0] == 0 and got[1] == math.inf and math.isnan(got[2])
    assert got[3] == 1 and got[4] == 1
    assert (got[5:8] == math.inf).all(), got[5:8]
    assert (got[8:] == 0).all(), f"e^x below the normal range must be exactly 0, got {got[8:].tolist()}"


def test_no_denormal_results_on_avx512(force_cpu_variant):
    """Below the normal range the result is 0, never a denormal, which would slow every sum it reaches."""
    force_cpu_variant("avx512")
    x = _grid(-104.0, -80.0, 200_003)
    got = _softmax_exp(x)
    denormal = (got != 0) & (got.abs() < NORMAL_MIN)
    assert not denormal.any(), f"denormal e^x at x = {x[denormal][:5].tolist()}"


def test_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="softmax_exp needs x as a contiguous float32"):
        _softmax_exp(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="softmax_exp needs x as a contiguous float32"):
        _softmax_exp(torch.zeros(4, 4).t())
