"""The op providers under pytest-benchmark: ``pytest benchmarks/ --benchmark-...``.

One benchmark per provider × mode × sequence length (LLaMA-7B heads: Hq = 32, D = 128, P = 10; fp32 batch 1 on
CPU, bf16 batch 4 on CUDA), with the shape and TFLOP/s in ``extra_info``. Each provider is checked against the
fp32 reference first, so pytest-benchmark never times a wrong implementation.

    pytest benchmarks/ --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    pytest benchmarks/ --bench-seqlens=512,1024,2048 --benchmark-json=ops.json -k "two-sdpa or fastadapter"
    pytest benchmarks/ --benchmark-disable        # each benchmark once: a smoke test
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastadapter.benchmarks.bench_ops import MODES, mode_callable, plan_for
from fastadapter.benchmarks.flops import attention_flops
from fastadapter.benchmarks.op_providers import check_provider, op_providers

_checked: dict[tuple[str, str, torch.dtype], str | None] = {}


def pytest_generate_tests(metafunc):
    if "seqlen" in metafunc.fixturenames:
        seqlens = [int(s) for s in metafunc.config.getoption("--bench-seqlens").split(",") if s]
        metafunc.parametrize("seqlen", seqlens, ids=[f"S{s}" for s in seqlens])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", op_providers(), ids=lambda p: p.name)
def test_op(benchmark, provider, mode, seqlen, bench_device):
    base = plan_for("default", bench_device).sweeps[0].configs[0]
    config = dataclasses.replace(base, seqlen=seqlen)
    reason = provider.skip_reason(config, bench_device)
    if reason:
        pytest.skip(reason)  # e.g. flash-attn without a GPU: these genuinely cannot run here
    key = (provider.name, bench_device, config.dtype)
    if key not in _checked:
        _checked[key] = check_provider(provider, bench_device, config.dtype)
    if _checked[key]:
        pytest.fail(_checked[key])
    torch.manual_seed(0)
    inputs = config.make_inputs(bench_device)
    grad_out = torch.randn_like(inputs[0])
    call = mode_callable(mode, provider.fn, inputs, grad_out)
    if torch.device(bench_device).type == "cuda":
        def timed():
            call()
            torch.cuda.synchronize()
    else:
        timed = call
    benchmark.extra_info.update(config=config.label, mode=mode, provider=provider.name,
                                flops=attention_flops(config.batch, config.heads_q, config.seqlen, config.seqlen,
                                                      config.head_dim, config.prefix_len, mode=mode))
    benchmark(timed)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = benchmark.extra_info["flops"] / benchmark.stats.stats.median / 1e12
