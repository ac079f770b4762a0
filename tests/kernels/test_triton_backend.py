"""What is particular to the ``triton`` backend: its dispatch answers (CPU tensors only under the interpreter, and
only when asked for by name; the prefix and head-dim limits of one tile), what it declines on a GPU (float32,
bf16 before sm_80, inputs no configuration fits), the launch plan built from the compiler's figures, the
autotuning key, deterministic mode and the device guard.

Its correctness against the reference, forward and every gradient, is in test_fused_backends.py, shared with the
``cpu`` backend; the compiler's figures for every GPU architecture are checked in test_kernels_compile.py."""
import dataclasses
import types

import pytest
import torch

from fastadapter import zero_init_attention
from fastadapter.backends import get_backend, select_backend
from fastadapter.backends import triton as triton_backend
from fastadapter.kernels import autotune as kernel_autotune
from fastadapter.kernels import configs as kernel_configs
from fastadapter.kernels import decode as kernel_decode
from fastadapter.kernels import forward as kernel_forward
from fastadapter.kernels.backward_dkdv import zero_init_attention_backward_dkdv_kernel
from fastadapter.kernels.forward import zero_init_attention_forward_kernel
from fastadapter.kernels.jit_functions import jit_function
from fastadapter.kernels.layout import Layout, device_arch, device_guard

from attention_cases import BF16, FP16, Case, backend_inputs


def test_dispatch_answers():
    backend = get_backend("triton")
    assert backend.fused and backend.unavailable_reason() is None
    inp = backend_inputs(Case(seqlen_q=8, seqlen_k=8))
    assert backend.not_supported_reasons(inp) == []
    reasons = backend.automatic_choice_reasons(inp)
    assert any("interpreter only when asked for by name" in r for r in reasons)
    assert select_backend(inp).name != "triton"  # CPU tensors: the automatic choice passes over triton
    assert select_backend(inp, "triton") is backend

    too_long = backend_inputs(Case(seqlen_q=8, seqlen_k=8, prefix_len=65))
    assert any("prefix length 65 > 64" in r for r in backend.not_supported_reasons(too_long))
    with pytest.raises(ValueError, match="prefix length 65"):
        zero_init_attention(**Case(seqlen_q=8, seqlen_k=8, prefix_len=65).make(), backend="triton")
    too_wide = backend_inputs(Case(batch=1, seqlen_q=2, seqlen_k=2, heads_q=1, heads_kv=1, head_dim=264))
    assert any("head_dim 264 > 256" in r for r in backend.not_supported_reasons(too_wide))


def test_unavailable_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = get_backend("triton").unavailable_reason()
    assert reason is not None and "TRITON_INTERPRET=1" in reason


# -- the launch plan: the compiler's figures, no fallback ---------------------------------------------------------

FORWARD = jit_function("forward")


def _fake_measure(figures):
    """A stand-in for compiling: ``figures[config_name] = (spill_bytes, shared_bytes)``, limit 100 000 B."""
    calls = []

    def measure(kernel, fn, config, facts, capability, device_index):
        assert fn is jit_function(kernel)  # the plan compiles the kernel's own function
        calls.append((kernel, kernel_configs.config_name(config), capability))
        spill, shared = figures(kernel, kernel_configs.config_name(config))
        return kernel_configs.Resources(registers=200, spill_bytes=spill, shared_bytes=shared, shared_limit=100_000)
    return measure, calls


@pytest.fixture
def fresh_plans():
    kernel_autotune._plan.cache_clear()
    yield
    kernel_autotune._plan.cache_clear()


def test_plan_keeps_only_configurations_that_fit_and_never_falls_back(monkeypatch, fresh_plans):
    """A configuration that spills or needs more shared memory than the device has is never launched; when none
    fits, the plan is empty (the old pruner kept the smallest one, which died with OutOfResources on a GPU)."""
    names = [kernel_configs.config_name(c) for c in kernel_configs.candidates("forward", 128, False, 90)]
    assert len(names) >= 2
    measure, calls = _fake_measure(lambda kernel, name: (0, 50_000) if name == names[1] else (64, 50_000))
    monkeypatch.setattr(kernel_autotune, "_measure", measure)
    facts = kernel_configs.KernelFacts(dtype=BF16, head_dim=128)
    kept, rejected = kernel_autotune.launch_plan("forward", FORWARD, facts, 90)
    assert [kernel_configs.config_name(c) for c in kept] == [names[1]]
    assert rejected == [f"{n}: spills 64 B/thread" for n in names if n != names[1]]
    kernel_autotune.launch_plan("forward", FORWARD, facts, 90)
    assert len(calls) == len(names)  # cached per key: each candidate compiled once

    measure, _ = _fake_measure(lambda kernel, name: (0, 263_000))
    monkeypatch.setattr(kernel_autotune, "_measure", measure)
    wide = kernel_configs.KernelFacts(dtype=BF16, head_dim=256)
    kept, rejected = kernel_autotune.launch_plan("forward", FORWARD, wide, 90)
    assert kept == [] and all("needs 263000 B of shared memory > 100000 B" in r for r in rejected)
    reason = kernel_autotune.decline_reason("forward", FORWARD, wide, 90)
    assert reason.startswith("no forward configuration fits sm_90 (dtype torch.bfloat16, head_dim 256)")


def test_backend_declines_what_no_configuration_fits_and_the_automatic_choice_moves_on(monkeypatch, fresh_plans):
    """On a GPU where no forward configuration fits, the backend says so before anything is launched."""
    measure, _ = _fake_measure(lambda kernel, name: (0, 263_000) if kernel == "forward" else (0, 1000))
    monkeypatch.setattr(kernel_autotune, "_measure", measure)
    monkeypatch.setattr(triton_backend, "_target", lambda inp: (90, None))  # as if the inputs were on an H100
    case = Case(batch=1, seqlen_q=8, seqlen_k=8, head_dim=256, dtype=BF16)
    inp = backend_inputs(case)
    backend = get_backend("triton")
    reasons = backend.not_supported_reasons(inp)
    assert len(reasons) == 1 and "no forward configuration fits sm_90" in reasons[0]
    assert select_backend(inp).name != "triton"
    with pytest.raises(ValueError, match="no forward configuration fits sm_90"):
        zero_init_attention(**case.make(requires_grad=False), backend="triton")
    # A call that needs gradients is also judged on the backward kernels.
    measure, _ = _fake_measure(lambda kernel, name: (8, 1000) if kernel == "backward_dq" else (0, 1000))
    monkeypatch.setattr(kernel_autotune, "_measure", measure)
    kernel_autotune._plan.cache_clear()
    assert backend.not_supported_reasons(inp) == []  # no gradient needed: the forward fits
    with_grad = dataclasses.replace(inp, q=inp.q.clone().requires_grad_(True))
    assert any("no backward_dq configuration fits sm_90" in r for r in backend.not_supported_reasons(with_grad))


def test_float32_and_bf16_before_ampere_are_declined_on_a_gpu(monkeypatch, fresh_plans):
    """fp32 goes to sdpa on every GPU; bf16 needs sm_80. Decided without compiling anything."""
    measure, calls = _fake_measure(lambda kernel, name: (0, 1000))
    monkeypatch.setattr(kernel_autotune, "_measure", measure)
    backend = get_backend("triton")
    fp32 = backend_inputs(Case(batch=1, seqlen_q=8, seqlen_k=8))
    assert any("float32 on a GPU is left to the sdpa backend" in r for r in backend.target_reasons(fp32, 90, None))
    bf16 = backend_inputs(Case(batch=1, seqlen_q=8, seqlen_k=8, dtype=BF16))
    assert backend.target_reasons(bf16, 75, None) == [
        "bfloat16 needs sm_80 or newer (Ampere's tensor cores); this GPU is sm_75"]
    assert calls == []
    fp16 = backend_inputs(Case(batch=1, seqlen_q=8, seqlen_k=8, dtype=FP16))
    assert backend.target_reasons(fp16, 75, None) == []  # fp16 on Turing: judged by the compiler's figures
    assert {kernel for kernel, _, cc in calls} == {"forward"} and {cc for _, _, cc in calls} == {75}
    assert backend.target_reasons(bf16, 60, None)[0].startswith("compute capability sm_60 is older than sm_70")
    # Under the interpreter (CPU tensors) every dtype runs.
    assert backend.not_supported_reasons(fp32) == []


# -- autotuning key, deterministic mode -----------------------------------------------------------------------

def test_autotune_key_has_the_group_the_prefix_tile_the_lengths_and_the_architecture():
    """Separate query and key buckets (a decode-like call over a long cache is not tuned as a long prefill) and
    whether ``seqused_k`` is read."""
    for kernel in (zero_init_attention_forward_kernel, zero_init_attention_backward_dkdv_kernel):
        assert {"group", "ARCH", "HEAD_DIM", "seqlen_q_bucket", "seqlen_k_bucket", "HAS_SEQUSED",
                "VARLEN"} <= set(kernel.keys)
    assert "BLOCK_P" in zero_init_attention_forward_kernel.keys


def test_tiles_longer_than_the_query_or_the_key_sequences_are_dropped():
    """``_short_enough``: 128-row query tiles are not timed for 40 queries over 4096 keys, and 64-key tiles not for
    a 16-key cache; when nothing is short enough every configuration stays."""
    c = kernel_configs._config
    configs = [c(128, 64, 8, 3), c(64, 64, 8, 2), c(64, 32, 4, 2), c(32, 16, 4, 1)]
    names = lambda kept: [kernel_configs.config_name(x) for x in kept]  # noqa: E731
    few_queries = kernel_autotune._short_enough(configs, dict(seqlen_q_bucket=64, seqlen_k_bucket=4096))
    assert names(few_queries) == names(configs[1:])
    short_cache = kernel_autotune._short_enough(configs, dict(seqlen_q_bucket=4096, seqlen_k_bucket=16))
    assert names(short_cache) == names(configs[3:])
    assert names(kernel_autotune._short_enough(configs[:1], dict(seqlen_q_bucket=16, seqlen_k_bucket=16))) == \
        names(configs[:1])


def test_device_arch_is_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert device_arch(torch.device("cuda", 1)) == 86
    assert device_arch(torch.device("cpu")) == 0
    assert Layout.of(backend_inputs(Case(batch=1, seqlen_q=4, seqlen_k=4))).common_constexprs()["ARCH"] == 0


class _Kernel:
    """Records how :func:`kernel_autotune.launch` launched it: through the autotuner, or one configuration."""

    def __init__(self):
        self.launches = []
        self.fn = _Recorder(self.launches, "config")  # the jitted function under the autotuner

    def __getitem__(self, grid):
        return lambda **kw: self.launches.append(("autotuner", kw))


class _Recorder:
    def __init__(self, launches, how):
        self.launches, self.how = launches, how

    def __getitem__(self, grid):
        return lambda **kw: self.launches.append((self.how, kw))


def _cuda_launch_args():
    q = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=BF16)
    return dict(Q=q, HEAD_DIM=128, BLOCK_P=16, HAS_PREFIX=True, VARLEN=False, CAUSAL=True, GATE_TANH=True, group=4,
                ARCH=90, seqlen_q_bucket=2048, seqlen_k_bucket=2048, HAS_SEQUSED=True)


def test_deterministic_mode_launches_a_fixed_configuration_per_key(monkeypatch):
    a, b = kernel_configs.candidates("forward", 128, interpreter=False)[:2]
    asked = []

    def plan(kernel, fn, facts, capability, device_index=None):
        asked.append((kernel, fn, facts, capability, device_index))
        return [a, b], []
    monkeypatch.setattr(kernel_autotune, "launch_plan", plan)
    monkeypatch.setattr(kernel_autotune, "interpreting", lambda: False)
    monkeypatch.delenv("FASTADAPTER_DETERMINISTIC", raising=False)
    kernel = _Kernel()
    kernel_autotune.launch("forward", kernel, None, _cuda_launch_args())
    assert kernel.launches[-1][0] == "autotuner"  # timing decides
    monkeypatch.setenv("FASTADAPTER_DETERMINISTIC", "1")
    assert kernel_autotune.deterministic()
    for _ in range(2):
        kernel_autotune.launch("forward", kernel, None, _cuda_launch_args())
        how, kw = kernel.launches[-1]
        assert how == "config" and kw["BLOCK_M"] == a.kwargs["BLOCK_M"] and kw["BLOCK_N"] == a.kwargs["BLOCK_N"]
        assert kw["num_warps"] == a.num_warps and kw["num_stages"] == a.num_stages
    assert asked[-1][1] is kernel.fn  # the plan compiles the function under the autotuner
    facts = asked[-1][2]
    assert asked[-1][3:] == (90, 0) and facts.grouped and facts.dtype == BF16 and facts.head_dim == 128
    assert facts.seqused  # the plan is keyed on seqused_k too
    monkeypatch.setenv("FASTADAPTER_DETERMINISTIC", "0")
    torch.use_deterministic_algorithms(True)
    try:
        assert kernel_autotune.deterministic()
    finally:
        torch.use_deterministic_algorithms(False)
    assert not kernel_autotune.deterministic()


def test_the_autotuners_pruner_plans_the_function_it_decorates(monkeypatch):
    """Late binding, no import cycle: the pruner of each autotuned kernel asks the plan about the very
    ``@triton.jit`` function under that autotuner (the one :func:`jit_function` names), keeps what the plan keeps
    and drops tiles longer than the sequences."""
    small, large = kernel_configs.candidates("forward", 128, interpreter=False)[:2][::-1]
    asked = []

    def plan(kernel, fn, facts, capability, device_index=None):
        asked.append((kernel, fn))
        return [small, large], []
    monkeypatch.setattr(kernel_autotune, "launch_plan", plan)
    monkeypatch.setattr(kernel_autotune, "interpreting", lambda: False)
    kept = zero_init_attention_forward_kernel.early_config_prune([large, small], _cuda_launch_args())
    assert asked == [("forward", zero_init_attention_forward_kernel.fn)]
    assert zero_init_attention_forward_kernel.fn is jit_function("forward")
    assert [kernel_configs.config_name(c) for c in kept] == [kernel_configs.config_name(c) for c in (large, small)]
    zero_init_attention_backward_dkdv_kernel.early_config_prune([small], _cuda_launch_args())
    assert asked[-1] == ("backward_dkdv", zero_init_attention_backward_dkdv_kernel.fn)


def test_forced_configurations_replace_the_autotuner_and_are_checked():
    kernel = _Kernel()
    config = kernel_configs.candidates("forward", 128, interpreter=False)[1]
    with kernel_autotune.forced_configs({"forward": config}):
        kernel_autotune.launch("forward", kernel, None, _cuda_launch_args())
    assert kernel.launches[-1][0] == "config" and kernel.launches[-1][1]["BLOCK_N"] == config.kwargs["BLOCK_N"]
    kernel_autotune.launch("forward", kernel, None, dict(_cuda_launch_args(), Q=torch.empty(1)))
    assert kernel.launches[-1][0] == "autotuner"  # the override ends with the block
    with pytest.raises(ValueError, match="unknown kernels"):
        with kernel_autotune.forced_configs({"decoder": config}):
            pass


# -- the device guard ---------------------------------------------------------------------------------------------

def test_launches_run_under_the_inputs_device(monkeypatch):
    """Every launch enters the inputs' device (a model split over GPUs), not the current one."""
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    entered = []
    real = kernel_forward.device_guard

    def recording(device):
        entered.append(device)
        return real(device)
    monkeypatch.setattr(kernel_forward, "device_guard", recording)
    monkeypatch.setattr(kernel_decode, "device_guard", recording)
    prefill = backend_inputs(Case(batch=1, seqlen_q=20, seqlen_k=20, heads_q=1, heads_kv=1, head_dim=16))
    step = backend_inputs(Case(batch=1, seqlen_q=1, seqlen_k=20, heads_q=1, heads_kv=1, head_dim=16))
    assert not kernel_decode.decode_applies(prefill) and kernel_decode.decode_applies(step)
    for inp in (prefill, step):  # the forward kernel, then the split-KV decode kernels
        get_backend("triton").forward(inp)
    assert entered == [prefill.device, step.device]


def test_inputs_on_different_devices_are_an_error_naming_them():
    kw = Case(batch=1, seqlen_q=4, seqlen_k=4).make(requires_grad=False)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        zero_init_attention(**{**kw, "k": kw["k"].to("meta")}, backend="triton")
