"""``decode_linear``: the compiled few-row linear of a decoding step (csrc/decode_linear.h) against ``F.linear``, on
every kernel variant this CPU runs, and the cases it must leave to ``F.linear``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastadapter.decode_linear as decode_linear_module
from fastadapter import _cpu_extension
from fastadapter.decode_linear import decode_linear, runs_kernel
from fastadapter.linear import Linear

pytestmark = pytest.mark.skipif(_cpu_extension.unavailable_reason() is not None,
                                reason="fastadapter._C is not built")

VARIANTS = ("avx512", "avx2", "generic")
#: (rows, in features, out features): odd sizes, tails of K under one vector, tails of N under one tile.
SHAPES = [(8, 512, 1000), (2, 97, 7), (16, 1025, 33), (3, 80, 1), (5, 8, 2), (4, 3, 5), (1, 64, 64)]


def _tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """fp32: summation order only; bf16/fp16: one rounding of the result (both sides accumulate in fp32)."""
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return scale * {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_op_matches_linear_in_fp32(variant, dtype, shape, with_bias, force_cpu_variant):
    force_cpu_variant(variant)
    rows, features, outputs = shape
    generator = torch.Generator().manual_seed(rows * 1000 + features)
    x = torch.randn(rows, features, generator=generator).to(dtype)
    weight = (torch.randn(outputs, features, generator=generator) / features ** 0.5).to(dtype)
    bias = torch.randn(outputs, generator=generator).to(dtype) if with_bias else None
    reference = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    out = torch.ops.fastadapter_cpu.decode_linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == (rows, outputs)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=_tolerance(dtype, reference))


@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 3), (2, 4, 0)], ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}")
def test_op_without_elements(shape):
    rows, features, outputs = shape
    x, weight, bias = torch.randn(rows, features), torch.randn(outputs, features), torch.randn(outputs)
    torch.testing.assert_close(torch.ops.fastadapter_cpu.decode_linear(x, weight, bias), F.linear(x, weight, bias))


@pytest.mark.parametrize("args, message", [
    ((torch.randn(2, 4), torch.randn(3, 5), None), r"x \[M, K\] and weight \[N, K\] with one K"),
    ((torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), None),
     "float32, bfloat16 or float16"),
    ((torch.randn(2, 4), torch.randn(3, 4, dtype=torch.bfloat16), None), "of one dtype"),
    ((torch.randn(2, 4), torch.randn(4, 3).t(), None), "contiguous"),
    ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(2)), r"bias must be \[3\]"),
])
def test_op_checks_say_what_was_expected(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastadapter_cpu.decode_linear(*args)


def test_function_runs_the_kernel_for_decode_shapes_only():
    weight = torch.randn(12, 16)
    assert runs_kernel(torch.randn(8, 1, 16), weight)  # a decoding step of 8 sequences
    assert not runs_kernel(torch.randn(1, 1, 16), weight)  # one row: MKL's matrix-vector product
    assert not runs_kernel(torch.randn(1, 17, 16), weight)  # a prefill: MKL's GEMM
    assert not runs_kernel(torch.randn(8, 16, dtype=torch.float64), weight.double())
    assert not runs_kernel(torch.randn(8, 16), weight.t().contiguous().t())  # a transposed view
    assert not runs_kernel(torch.randn(8, 16, requires_grad=True), weight)  # records a gradient
    with torch.no_grad():
        assert runs_kernel(torch.randn(8, 16, requires_grad=True), weight)
    assert not runs_kernel(torch.randn(8, 16), torch.nn.Parameter(weight))  # a trainable weight
    assert not runs_kernel(torch.randn(8, 16, device="meta"), weight.to("meta"))


def test_function_and_module_equal_linear_and_keep_its_gradients(monkeypatch):
    """Through the kernel (no grad) and through F.linear (grad): the same values; a gradient flows as nn.Linear's."""
    torch.manual_seed(0)
    layer = Linear(40, 24, bias=True)
    plain = torch.nn.Linear(40, 24, bias=True)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, torch.nn.Linear) and list(layer.state_dict()) == ["weight", "bias"]
    # 2-D rows, strided 2-D rows (every other row of a batch) and a decoding step's [B, 1, K]
    with torch.no_grad():
        for rows in (torch.randn(6, 40), torch.randn(12, 40)[::2], torch.randn(3, 2, 40)):
            assert runs_kernel(rows, layer.weight, layer.bias)
            torch.testing.assert_close(layer(rows), plain(rows), rtol=0, atol=1e-5)
            assert layer(rows).shape == plain(rows).shape
    x = torch.randn(3, 2, 40)
    x.requires_grad_(True)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(plain(x).square().sum(), x)[0]
    x_grad = x.grad
    torch.testing.assert_close(x_grad, expected)
    assert layer.weight.grad is not None
    monkeypatch.setattr(decode_linear_module, "ENABLED", False)
    with torch.no_grad():
        assert not runs_kernel(x, layer.weight)
        torch.testing.assert_close(decode_linear(x, layer.weight, layer.bias), plain(x))


def test_module_compiles_with_fullgraph():
    layer = Linear(24, 10)
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), F.linear(x, layer.weight, layer.bias))


def test_thin_model_decoding_is_the_same_with_and_without_the_kernel(monkeypatch, make_config):
    """Generation of a batch of prompts of different lengths: the same logits at every step and the same tokens
    with the kernel (8 rows per decoding step) as with F.linear."""
    from fastadapter import AdapterConfig, LlamaModel, add_adapter, generate
    from fastadapter.model.kv_cache import KVCache

    torch.manual_seed(0)
    config = make_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, max_seq_len=64)
    model = LlamaModel(config).eval()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2))
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.adapter.gate.fill_(0.5)
    prompts = [[5, 9, 13], [7], [2, 3, 4, 5, 6, 7, 8], [11, 12], [20, 21, 22, 23], [30], [40, 41], [50, 51, 52]]

    def step_logits():
        cache = KVCache(config, len(prompts), 16, dtype=torch.float32)
        lengths = [len(p) for p in prompts]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        packed = torch.tensor([t for p in prompts for t in p])[None]
        with torch.no_grad():
            outputs = [model(packed, cu_seqlens=cu, cache=cache, logits_positions=cu[1:].long() - 1)]
            for token in range(3):
                outputs.append(model(torch.full((len(prompts), 1), 60 + token), cache=cache))
        return outputs

    calls = []
    real = torch.ops.fastadapter_cpu.decode_linear
    monkeypatch.setattr(decode_linear_module.torch.ops.fastadapter_cpu, "decode_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    with_kernel = step_logits()
    # The decoding steps (8 rows) and the projection of the 4-token prompts; never the 26-token prefill.
    assert {shape[0] for shape in calls} == {len(prompts), 4}
    monkeypatch.setattr(decode_linear_module, "ENABLED", False)
    without = step_logits()
    for got, expected in zip(with_kernel, without):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    monkeypatch.setattr(decode_linear_module, "ENABLED", True)
    tokens = generate(model, prompts, max_new_tokens=4)
    monkeypatch.setattr(decode_linear_module, "ENABLED", False)
    assert generate(model, prompts, max_new_tokens=4) == tokens


def test_benchmark_suite_times_both_providers_on_the_same_result():
    from fastadapter.benchmarks import bench_decode_linear
    rows = bench_decode_linear.run(False, "cpu", preset="smoke", log=lambda line: None)
    # F.linear, decode_linear's choice, and the kernel itself in every variant this CPU runs
    variants = bench_decode_linear._variants()
    assert "generic" in variants
    assert [r["provider"] for r in rows] == ["F.linear", "decode_linear"] + [f"kernel-{v}" for v in variants]
    assert all(math.isfinite(r["median_ms"]) and math.isfinite(r["gb_per_s"]) for r in rows)  # timed: measured
    assert all(r["max_abs_err"] < 1e-4 for r in rows[1:])
    assert bench_decode_linear.run(False, "cuda", preset="smoke", log=lambda line: None)[0]["skipped"]


def test_benchmark_suite_on_an_emulated_avx2_cpu_times_no_wider_variant(monkeypatch):
    """bench_decode_linear --emulate avx2 times the kernel's AVX2 and generic variants only: an AVX2-only CPU has
    no AVX-512 variant to time."""
    from fastadapter.benchmarks import bench_decode_linear
    from fastadapter.benchmarks.emulated_cpu import EMULATIONS
    for name, value in EMULATIONS["avx2"].items():
        monkeypatch.setenv(name, value)
    assert bench_decode_linear._variants() == ["avx2", "generic"]


def test_benchmark_suite_without_the_library_says_why_in_a_row(monkeypatch):
    """A build without fastadapter._C (FASTADAPTER_SKIP_BUILD=1) gets a skipped row with the reason, not a suite
    skipped or failed (the README's main command runs every suite in such a venv)."""
    from fastadapter.benchmarks import bench_decode_linear
    monkeypatch.setattr(_cpu_extension, "unavailable_reason", lambda: "fastadapter._C was not built")
    rows = bench_decode_linear.run(False, "cpu", preset="smoke", log=lambda line: None)
    assert rows == [{"suite": "decode_linear", "provider": "decode_linear", "mode": "forward", "config": "-",
                     "median_ms": None, "skipped": "fastadapter._C was not built"}]


def test_dtypes_with_native_products_stay_on_linear(monkeypatch):
    """bf16 (fp16) runs on F.linear where torch has the CPU's own bf16 (fp16) products — there F.linear streams the
    weight faster than the kernel, on every variant — and on the kernel elsewhere; fp32 always on the kernel."""
    weight = torch.randn(24, 16)
    for native in (True, False):
        monkeypatch.setattr(decode_linear_module, "_NATIVE_PRODUCTS",
                            {torch.bfloat16: native, torch.float16: native})
        for dtype in (torch.bfloat16, torch.float16):
            assert runs_kernel(torch.randn(8, 16, dtype=dtype), weight.to(dtype)) is (not native)
        assert runs_kernel(torch.randn(8, 16), weight)
