"""The implementations the op-level benchmark compares, and the shapes it runs them on.

A provider is one way to compute zero-init attention: a baseline of ``benchmarks/baselines.py`` (what people run
today) or one backend of ``fastadapter.zero_init_attention``. Each says why it cannot run on this device or this
shape (``skip_reason``), so the benchmark prints "skipped: why" instead of silently leaving a line out.

Every provider computes the same function (gate activation ``tanh``), so that the benchmark can check each one
against the fp32 reference before timing it (:func:`check_provider`): a fast wrong answer is never reported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import baselines

#: The eager baselines materialise fp32 ``[B, Hq, Sq, P + Sk]`` scores (and as many probabilities, and their
#: gradients in the backward); above this many bytes of scores they are skipped on CPU, where one call takes
#: tens of seconds to minutes: at LLaMA-7B heads, S = 2048 (0.5 GiB) runs and S = 4096 (2 GiB) is skipped. On a
#: GPU the cap is the device memory instead (see ``_eager_skip_reason``).
CPU_EAGER_SCORE_BYTES_CAP = 600 << 20

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class OpConfig:
    """One attention shape: q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]``, prefix ``[1, P, Hkv, D]``, gate ``[Hq]``,
    causal self-attention (``Sq == Sk == S``)."""

    batch: int
    seqlen: int
    heads_q: int = 32
    heads_kv: int = 32
    head_dim: int = 128
    prefix_len: int = 10
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        """``B1-S512-H32x8-D128-P10-fp32``: the shape as it appears in tables and JSON."""
        return (f"B{self.batch}-S{self.seqlen}-H{self.heads_q}x{self.heads_kv}-D{self.head_dim}-P{self.prefix_len}"
                f"-{_DTYPE_NAMES[self.dtype]}")

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.dtype]

    def eager_score_bytes(self) -> int:
        """Bytes of the fp32 score matrix the eager baselines materialise."""
        return 4 * self.batch * self.heads_q * self.seqlen * (self.prefix_len + self.seqlen)

    def make_inputs(self, device, requires_grad: bool = True) -> tuple[torch.Tensor, ...]:
        """``(q, k, v, prefix_k, prefix_v, gate)`` drawn from N(0, 1) (the gate N(0, 0.25), non-zero so the prefix
        matters), leaves requiring grad."""
        def randn(*shape, std=1.0):
            t = (std * torch.randn(*shape, device=device, dtype=torch.float32)).to(self.dtype)
            return t.requires_grad_(requires_grad)

        b, s, hq, hkv, d, p = self.batch, self.seqlen, self.heads_q, self.heads_kv, self.head_dim, self.prefix_len
        gate = (0.5 * torch.randn(hq, device=device)).requires_grad_(requires_grad)
        return (randn(b, s, hq, d), randn(b, s, hkv, d), randn(b, s, hkv, d), randn(1, p, hkv, d),
                randn(1, p, hkv, d), gate)


AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class OpProvider:
    """One implementation: ``fn(q, k, v, prefix_k, prefix_v, gate) -> out [B, S, Hq, D]``."""

    name: str
    fn: AttentionFn
    description: str
    #: ``(config, device) -> why this provider cannot or should not run it``, or None when it runs.
    skip: Callable[[OpConfig, str], Optional[str]]
    #: Why it has no backward on ``device`` (``device -> reason``, None when it has one): only its forward is
    #: timed and checked there.
    no_backward: Callable[[str], Optional[str]] = lambda device: None

    def skip_reason(self, config: OpConfig, device) -> Optional[str]:
        return self.skip(config, str(device))


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _eager_skip_reason(config: OpConfig, device: str) -> Optional[str]:
    score_bytes = config.eager_score_bytes()
    if _is_cuda(device):
        # Scores, probabilities and their gradients: ~4 score-sized tensors alive in the backward.
        budget = torch.cuda.get_device_properties(device).total_memory
        if 4 * score_bytes > 0.9 * budget:
            return f"needs ~{4 * score_bytes / 2**30:.1f} GiB of fp32 scores, more than this GPU has"
        return None
    if score_bytes > CPU_EAGER_SCORE_BYTES_CAP:
        return (f"materialises {score_bytes / 2**30:.1f} GiB of fp32 scores per tensor: capped at "
                f"{CPU_EAGER_SCORE_BYTES_CAP / 2**20:.0f} MiB on CPU (minutes per call)")
    return None


def _import_problem(module: str) -> Optional[str]:
    """Why ``module`` (``xformers.ops``: its package is what is installed) cannot be used here: not installed,
    or installed but failing to import; None when it imports. The import itself is tried: a wheel built for
    another torch or CUDA is found by ``find_spec`` and only fails when loaded (an undefined symbol in its
    extension)."""
    package = module.split(".")[0]
    try:
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
        importlib.import_module(module)
    except Exception as error:  # ImportError, OSError of a shared library, RuntimeError of its set-up, ...
        message = (str(error).strip().splitlines() or [""])[0][:300]
        return f"{module} is installed but fails to import: {type(error).__name__}: {message}"
    return None


def _needs_cuda_module(module: str, label: str) -> Callable[[OpConfig, str], Optional[str]]:
    def skip(config: OpConfig, device: str) -> Optional[str]:
        if not _is_cuda(device):
            return f"{label} runs on CUDA only"
        problem = _import_problem(module)
        if problem:
            return problem
        if module == "flash_attn" and config.dtype not in (torch.float16, torch.bfloat16):
            return "flash_attn_func takes fp16/bf16 only"
        return None
    return skip


def _fastadapter_provider(backend: str) -> OpProvider:
    from fastadapter import zero_init_attention
    from fastadapter.backends import get_backend
    from fastadapter.kernels.problem import AttentionProblem

    def fn(q, k, v, prefix_k, prefix_v, gate):
        return zero_init_attention(q, k, v, prefix_k, prefix_v, gate, backend=backend)

    def skip(config: OpConfig, device: str) -> Optional[str]:
        if backend == "triton" and not _is_cuda(device):
            # Triton on CPU tensors is its interpreter: a correctness tool, thousands of times slower.
            return "Triton kernels are benchmarked on CUDA only (on CPU they would run in the interpreter)"
        try:
            chosen = get_backend(backend)
        except ValueError:
            return f"backend {backend!r} is not built here"
        reason = chosen.unavailable_reason()
        if reason:
            return reason
        # Backends restrict head_dim, prefix length and dtype, never the sequence: a one-token probe on the real
        # device answers for the whole shape without allocating it.
        probe = dataclasses.replace(config, batch=1, seqlen=1).make_inputs(device, requires_grad=False)
        inp = AttentionProblem.from_dense(*probe)
        reasons = chosen.not_supported_reasons(inp)
        return "; ".join(reasons) or None

    return OpProvider(f"fastadapter-{backend}", fn, f"fastadapter.zero_init_attention(backend={backend!r})", skip)


_COMPILED: dict[str, Callable] = {}
#: The providers that torch.compile each shape they run.
COMPILED_PROVIDERS = ("compiled-eager-v1", "flex-attention")


def compiled_eager_v1(q, k, v, prefix_k, prefix_v, gate):
    """``eager_v1`` under ``torch.compile`` (inductor): what a user gets by compiling the original code."""
    if "eager_v1" not in _COMPILED:
        # The timing harness runs backward repeatedly over one graph (retain_graph=True), which AOTAutograd's
        # donated buffers forbid; its backward is compiled lazily, at the first backward, so the knob is set for
        # the (benchmark) process rather than around this call.
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
        _COMPILED["eager_v1"] = torch.compile(baselines.eager_v1)
    return _COMPILED["eager_v1"](q, k, v, prefix_k, prefix_v, gate, gate_tanh=True)


def _flex_skip_reason(config: OpConfig, device: str) -> Optional[str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as error:
        return f"this torch has no flex_attention ({error})"
    return None


def _flex_no_backward(device: str) -> Optional[str]:
    if torch.device(device).type == "cpu":
        return f"flex_attention has no CPU backward in torch {torch.__version__}"
    return None


def op_providers() -> list[OpProvider]:
    """Every provider, baselines first. Whether one runs is decided per shape and device by ``skip_reason``."""
    def always(config, device):
        return None

    return [
        OpProvider("eager-v1", lambda *a: baselines.eager_v1(*a, gate_tanh=True),
                   "original LLaMA-Adapter: concatenated fp32 scores, a softmax per slice", _eager_skip_reason),
        OpProvider("compiled-eager-v1", compiled_eager_v1,
                   "eager-v1 under torch.compile (inductor)", _eager_skip_reason),
        OpProvider("flex-attention", flex_two_calls,
                   "two torch.compile'd flex_attention calls (words causal, prefix), gated sum",
                   _flex_skip_reason, no_backward=_flex_no_backward),
        OpProvider("peft-style", lambda *a: baselines.peft_style(*a, gate_tanh=True),
                   "PEFT adaption_prompt: SDPA + eager fp32 prefix softmax", always),
        OpProvider("two-sdpa", lambda *a: baselines.two_sdpa(*a, gate_tanh=True),
                   "litgpt / LLaMA-Adapter V2: sdpa(words) + gate * sdpa(prefix)", always),
        OpProvider("two-flash-attn", lambda *a: baselines.two_flash_attn(*a, gate_tanh=True),
                   "LLaMA2-Accessory: two flash_attn_func calls", _needs_cuda_module("flash_attn", "flash-attn")),
        OpProvider("xformers", lambda *a: baselines.xformers_mea(*a, gate_tanh=True),
                   "two xformers memory_efficient_attention calls", _needs_cuda_module("xformers.ops", "xformers")),
        _fastadapter_provider("cpu"),
        _fastadapter_provider("triton"),
        _fastadapter_provider("sdpa"),
    ]


def check_provider(provider: OpProvider, device, dtype: torch.dtype = torch.float32,
                   check_grads: bool = True) -> Optional[str]:
    """Compare ``provider`` with the fp32 reference on a tiny GQA shape (output and every gradient).

    Returns None when it agrees, otherwise what differs — a benchmark must not time a wrong implementation.
    Tolerance: 1e-3 relative to the largest magnitude of each reference result in fp32; 3e-2 in fp16/bf16.
    """
    from fastadapter import zero_init_attention_reference
    config = OpConfig(batch=2, seqlen=37, heads_q=4, heads_kv=2, head_dim=32, prefix_len=5, dtype=dtype)
    torch.manual_seed(1234)
    inputs = config.make_inputs(device)
    grad_out = torch.randn(config.batch, config.seqlen, config.heads_q, config.head_dim, device=device)
    reference_inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    expected = zero_init_attention_reference(*reference_inputs, causal=True, gate_activation="tanh")
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out)
    got = provider.fn(*inputs)
    results = [("out", got, expected)]
    if check_grads:
        grads = torch.autograd.grad(got, inputs, grad_out.to(got.dtype), allow_unused=True)
        names = ("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate")
        results += list(zip(names, grads, expected_grads))
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    for name, value, ref in results:
        if value is None:
            return f"{provider.name}: {name} is missing (no gradient reached the input)"
        if value.shape != ref.shape:
            return f"{provider.name}: {name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        error = (value.float() - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        if not error <= tolerance * scale:
            return f"{provider.name}: {name} differs from the fp32 reference by {error:.2e} (> {tolerance * scale:.1e})"
    return None


# -- The GPU acceptance run's implementations (benchmarks/gpu_acceptance/) ----------------------------------------
# The acceptance run times these on CUDA, on dense and packed batches; it adapts them to its inputs and implements
# none itself. flex_attention needs torch.compile to be fast (eager flex is its math reference).


def fastadapter_triton(q, k, v, prefix_k, prefix_v, gate, seqused_k=None, **varlen) -> torch.Tensor:
    """The triton backend: ``zero_init_attention`` (dense, optionally ``seqused_k``), or
    ``zero_init_attention_varlen`` when ``cu_seqlens_q``, ``cu_seqlens_k``, ``max_seqlen_q`` and ``max_seqlen_k``
    are given (``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]``)."""
    from fastadapter import zero_init_attention, zero_init_attention_varlen
    if varlen:
        return zero_init_attention_varlen(q, k, v, prefix_k, prefix_v, gate, varlen["cu_seqlens_q"],
                                          varlen["cu_seqlens_k"], varlen["max_seqlen_q"], varlen["max_seqlen_k"],
                                          seqused_k=seqused_k, backend="triton")
    return zero_init_attention(q, k, v, prefix_k, prefix_v, gate, seqused_k=seqused_k, backend="triton")


def triton_forward_kernel(q, k, v, prefix_k, prefix_v, gate) -> torch.Tensor:
    """The Triton forward kernel alone (128-row query tiles, no split over the cache): what decode ran before the
    split-KV decode kernels. Causal, tanh gate; ``[B, Sq, Hq, D]``."""
    from fastadapter.kernels.forward import attention_forward
    from fastadapter.kernels.problem import AttentionProblem
    return attention_forward(AttentionProblem.from_dense(q, k, v, prefix_k, prefix_v, gate))[0]


@contextlib.contextmanager
def sdpa_flash_only(device):
    """SDPA restricted to its flash backend on CUDA (the baseline people run); on CPU PyTorch's own choice. Yields
    the name of what runs."""
    if not _is_cuda(str(device)):
        yield "default (CPU: no flash backend)"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        yield "flash"


_COMPILED_FLEX = []


def flex_attention_callable(compiled: bool) -> Callable:
    """``flex_attention`` compiled (one graph per shape, as users run it), or eager (its math reference, for
    CPU smoke runs, where compiling would take longer than the run)."""
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        def eager(*args, **kwargs):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
                return flex_attention(*args, **kwargs)
        return eager
    if not _COMPILED_FLEX:
        import torch._dynamo
        for knob in ("cache_size_limit", "recompile_limit"):  # one graph per shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0]


def word_block_mask(length: int, device, document: Optional[torch.Tensor] = None):
    """flex_attention's block mask of causal self-attention over ``length`` tokens; with ``document`` (the
    sequence index of every packed token, ``[length]``), causal within each sequence only. Built once per shape,
    as users do."""
    from torch.nn.attention.flex_attention import create_block_mask
    if document is None:
        def mask(b, h, i, j):
            return i >= j
    else:
        def mask(b, h, i, j):
            return (i >= j) & (document[i] == document[j])
    return create_block_mask(mask, None, None, length, length, device=device)


def flex_two_calls(q, k, v, prefix_k, prefix_v, gate, block_mask=None, *, compiled: bool = True) -> torch.Tensor:
    """The op in ``flex_attention``: words under ``block_mask`` (default: causal, bottom-right aligned, built once per
    shape; :func:`word_block_mask` builds the packed-sequence one), the prefix as a second unmasked call over the P
    prompt keys, ``out = O_w + tanh(gate)·O_p`` (the two softmaxes are separate, which one flex call over
    cat(prefix, words) cannot express). q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``, prefix ``[1, P, Hkv, D]``,
    gate ``[Hq]``; returns ``[B, Sq, Hq, D]``. On CPU (no flex backward in this torch) the inputs are detached."""
    if block_mask is None:
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        key = ("mask", seqlen_q, seqlen_k, str(q.device))
        if key not in _COMPILED:
            from torch.nn.attention.flex_attention import create_block_mask
            offset = seqlen_k - seqlen_q

            def causal(b, h, i, j):
                return j <= i + offset
            _COMPILED[key] = create_block_mask(causal, None, None, seqlen_q, seqlen_k, device=q.device)
        block_mask = _COMPILED[key]
    if _flex_no_backward(str(q.device)):  # flex_attention refuses inputs that require grad there
        q, k, v, prefix_k, prefix_v, gate = (t.detach() for t in (q, k, v, prefix_k, prefix_v, gate))
    flex = flex_attention_callable(compiled)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = flex(qh, kh, vh, block_mask=block_mask, enable_gqa=True)
    batch = q.shape[0]
    out_p = flex(qh, prefix_k.transpose(1, 2).expand(batch, -1, -1, -1),
                 prefix_v.transpose(1, 2).expand(batch, -1, -1, -1), enable_gqa=True)
    return (out + torch.tanh(gate).to(out.dtype)[None, :, None, None] * out_p).transpose(1, 2)
