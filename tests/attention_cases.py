"""Test inputs for zero-init attention and the flash-attention-style comparison against the reference.

A backend passes when, for the output and the gradient of every input, its error against the fp32 reference
is at most twice the error of plain PyTorch computing the same thing in the inputs' dtype (the reference with
``upcast=False``), plus a small floor relative to the reference's own magnitude (``REL_FLOOR · max|ref|``): a
gradient of magnitude 0.05 is held to the same relative standard as one of magnitude 50.

On a machine with CUDA the ``triton`` backend runs on CUDA tensors, compiled (:func:`device_for`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fastadapter import zero_init_attention, zero_init_attention_reference, zero_init_attention_varlen
from fastadapter.backends import all_backends
from fastadapter.kernels.problem import AttentionProblem

#: The package's own backends from the registry, in the automatic choice's order (not those a test registers).
BACKENDS = tuple(b.name for b in all_backends() if type(b).__module__.startswith("fastadapter.backends."))
#: Those of them with their own forward and backward kernels.
FUSED_BACKENDS = tuple(b.name for b in all_backends() if b.name in BACKENDS and b.fused)
#: The floor of the tolerance, relative to the largest magnitude of the reference result itself.
REL_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
INPUT_NAMES = ("q", "k", "v", "prefix_k", "prefix_v", "gate")
#: The cpu backend's kernel variants (FASTADAPTER_CPU_ISA).
VARIANTS = ("avx512", "avx2", "generic")
#: (variant, products) pairs (FASTADAPTER_CPU_GEMM): the generic variant has no register tiles (MKL whatever
#: FASTADAPTER_CPU_GEMM says); AMX tiles are the avx512 variant's, where the CPU has them.
VARIANT_PRODUCTS = [("avx512", "amx"), ("avx512", "tiles"), ("avx512", "mkl"), ("avx2", "tiles"), ("avx2", "mkl"),
                    ("generic", "mkl")]


@dataclass
class Case:
    """One set of inputs. ``seqlens`` set means varlen: q/k/v are packed ``[T, H, D]`` (one ``cu_seqlens``);
    with ``seqlens_k`` too, k/v hold their own sequences (``cu_seqlens_q``/``cu_seqlens_k``, ragged). ``seqused``
    sets ``seqused_k`` (one count per row or sequence)."""

    batch: int = 2
    seqlen_q: int = 97
    seqlen_k: int = 97
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 64
    prefix_len: int = 10
    prefix_batch: int = 1  # 1 (shared) or batch
    gate_shape: str = "heads"  # "heads" [Hq], "scalar" [1], "rows" [B, Hq]
    gate_activation: str = "tanh"
    causal: bool = True
    dtype: torch.dtype = torch.float32
    seqlens: Optional[list[int]] = None
    unused_tail: int = 0  # varlen: packed tokens after the last sequence (cu_seqlens[-1] < T)
    seqlens_k: Optional[list[int]] = None  # varlen: the key sequences' own lengths (separate offsets)
    unused_tail_k: int = 0  # separate offsets: packed key tokens after the last key sequence
    seqused: Optional[list[int]] = None  # seqused_k: the keys each row (dense) or sequence (varlen) reads
    transposed: bool = False  # pass q/k/v as bshd views of bhsd tensors
    softmax_scale: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        shape = (f"T{sum(self.seqlens) + self.unused_tail}-N{len(self.seqlens)}" if self.seqlens else
                 f"B{self.batch}-Sq{self.seqlen_q}-Sk{self.seqlen_k}")
        if self.seqlens_k:
            shape = (f"q{'.'.join(map(str, self.seqlens))}+{self.unused_tail}"
                     f"-k{'.'.join(map(str, self.seqlens_k))}+{self.unused_tail_k}")
        if self.seqused:
            shape += f"-used{'.'.join(map(str, self.seqused))}"
        return (f"{shape}-H{self.heads_q}x{self.heads_kv}-D{self.head_dim}-P{self.prefix_len}x{self.prefix_batch}"
                f"-g{self.gate_shape}-{self.gate_activation}-{'causal' if self.causal else 'full'}-{dt}"
                + ("-T" if self.transposed else ""))

    def make(self, device="cpu", requires_grad=True) -> dict:
        """The inputs as keyword arguments of ``zero_init_attention`` or, varlen, ``zero_init_attention_varlen``
        (:func:`attention` calls the right one; gate non-zero so it matters)."""
        def randn(*shape, transposed=False):
            if transposed:  # allocate [B, H, S, D] and view it as [B, S, H, D]
                t = torch.randn(shape[0], shape[2], shape[1], shape[3], device=device).transpose(1, 2)
            else:
                t = torch.randn(*shape, device=device)
            return t.to(self.dtype).requires_grad_(requires_grad)

        n = len(self.seqlens) if self.seqlens else self.batch
        kw = {}
        if self.seqlens and self.seqlens_k:
            assert len(self.seqlens_k) == n, "seqlens_k needs one length per sequence of seqlens"
            kw["q"] = randn(sum(self.seqlens) + self.unused_tail, self.heads_q, self.head_dim)
            tokens_k = sum(self.seqlens_k) + self.unused_tail_k
            kw["k"] = randn(tokens_k, self.heads_kv, self.head_dim)
            kw["v"] = randn(tokens_k, self.heads_kv, self.head_dim)
            kw["cu_seqlens_q"] = _offsets(self.seqlens).to(device)
            kw["cu_seqlens_k"] = _offsets(self.seqlens_k).to(device)
            kw["max_seqlen_q"] = max(max(self.seqlens), 1)
            kw["max_seqlen_k"] = max(max(self.seqlens_k), 1)
        elif self.seqlens:
            total = sum(self.seqlens) + self.unused_tail
            kw["q"] = randn(total, self.heads_q, self.head_dim)
            kw["k"] = randn(total, self.heads_kv, self.head_dim)
            kw["v"] = randn(total, self.heads_kv, self.head_dim)
            kw["cu_seqlens_q"] = kw["cu_seqlens_k"] = _offsets(self.seqlens).to(device)  # shared offsets
            kw["max_seqlen_q"] = kw["max_seqlen_k"] = max(self.seqlens)
        else:
            kw["q"] = randn(self.batch, self.seqlen_q, self.heads_q, self.head_dim, transposed=self.transposed)
            kw["k"] = randn(self.batch, self.seqlen_k, self.heads_kv, self.head_dim, transposed=self.transposed)
            kw["v"] = randn(self.batch, self.seqlen_k, self.heads_kv, self.head_dim, transposed=self.transposed)
        pb = n if self.prefix_batch != 1 else 1
        kw["prefix_k"] = randn(pb, self.prefix_len, self.heads_kv, self.head_dim)
        kw["prefix_v"] = randn(pb, self.prefix_len, self.heads_kv, self.head_dim)
        gate_shape = {"heads": (self.heads_q,), "scalar": (1,), "rows": (n, self.heads_q)}[self.gate_shape]
        kw["gate"] = (0.5 * torch.randn(*gate_shape, device=device)).requires_grad_(requires_grad)
        if self.seqused is not None:
            assert len(self.seqused) == n, "seqused needs one count per row or sequence"
            kw["seqused_k"] = torch.tensor(self.seqused, dtype=torch.int32, device=device)
        kw["causal"] = self.causal
        kw["gate_activation"] = self.gate_activation
        kw["softmax_scale"] = self.softmax_scale
        return kw


def _offsets(lengths: list[int]) -> torch.Tensor:
    """int32 ``[N+1]`` cumulative starts of sequences of ``lengths``."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def device_for(backend: str) -> str:
    """Where ``backend``'s tests run: the ``triton`` backend on CUDA when there is a GPU (compiled kernels),
    every other backend (and triton without a GPU, under the interpreter) on CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


VARLEN_ARGUMENTS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def attention(**kw):
    """The op on keyword arguments of :meth:`Case.make`: ``zero_init_attention_varlen`` when they hold offsets,
    ``zero_init_attention`` otherwise."""
    if "cu_seqlens_q" in kw:
        offsets = [kw.pop(name) for name in VARLEN_ARGUMENTS]
        q, k, v, prefix_k, prefix_v, gate = (kw.pop(name) for name in INPUT_NAMES)
        return zero_init_attention_varlen(q, k, v, prefix_k, prefix_v, gate, *offsets, **kw)
    return zero_init_attention(**kw)


def problem_of(**kw) -> AttentionProblem:
    """The validated problem of keyword arguments of :meth:`Case.make`, as a backend receives it."""
    if "cu_seqlens_q" in kw:
        offsets = [kw.pop(name) for name in VARLEN_ARGUMENTS]
        return AttentionProblem.from_varlen(*(kw.pop(name) for name in INPUT_NAMES), *offsets, **kw)
    return AttentionProblem.from_dense(**kw)


def backend_inputs(case: Case, device="cpu") -> AttentionProblem:
    """``case``'s inputs validated as a backend receives them (no gradients), for calling a backend directly."""
    return problem_of(**case.make(device, requires_grad=False))


def _run(fn, kw: dict, grad_out: torch.Tensor):
    """Output and the gradients of every input of ``fn(**kw)`` against ``grad_out`` (fresh leaves)."""
    leaves = {name: kw[name].detach().clone().requires_grad_(True) for name in INPUT_NAMES}
    out = fn(**{**kw, **leaves})
    grads = torch.autograd.grad(out, [leaves[n] for n in INPUT_NAMES], grad_out.to(out.dtype),
                                allow_unused=True)
    # An input the output does not depend on (the prefix and gate when P == 0) has a zero gradient; a backend
    # that forgets a gradient the reference has is caught by the comparison.
    grads = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(INPUT_NAMES, grads)]
    return out.detach(), dict(zip(INPUT_NAMES, grads))


def check_against_reference(case: Case, backend: str, device="cpu", check_grads: bool = True) -> None:
    """Assert that ``backend`` matches the fp32 reference on ``case`` (forward and every gradient)."""
    kw = case.make(device)
    grad_out = torch.randn(kw["q"].shape, device=device)

    def fast(**a):
        return attention(**a, backend=backend)

    def ref_lowp(**a):
        return zero_init_attention_reference(**a, upcast=False)

    def ref_fp32(**a):
        return zero_init_attention_reference(**{**a, **{n: a[n].float() for n in INPUT_NAMES}})

    if not check_grads:
        with torch.no_grad():
            outs = [f(**kw) for f in (fast, ref_lowp, ref_fp32)]
        _assert_within("out", case, *outs)
        return
    (o, g), (o_pt, g_pt), (o_ref, g_ref) = (_run(f, kw, grad_out) for f in (fast, ref_lowp, ref_fp32))
    assert o.dtype == case.dtype and o.shape == kw["q"].shape
    _assert_within("out", case, o, o_pt, o_ref)
    # A gradient that is exactly 0 by cancellation (one visible key: P = 1, so dS = P ∘ (dO vᵀ − D) = 0) has no
    # magnitude of its own; a flash-style backward computes D = rowsum(dO ∘ out) from the rounded output, so it
    # leaves rounding of the size of the cancelling terms, those of the word gradients. It is held to the
    # relative standard of the largest word gradient of the case.
    word_scale = max((g_ref[n].abs().max().item() for n in ("q", "k", "v") if g_ref[n].numel()), default=0.0)
    for name in INPUT_NAMES:
        assert g[name].shape == kw[name].shape, f"{backend}: d{name} has shape {tuple(g[name].shape)}"
        _assert_within(f"d{name}", case, g[name], g_pt[name], g_ref[name], zero_scale=word_scale)


def _assert_within(what: str, case: Case, got, plain, ref, zero_scale: float = 0.0) -> None:
    assert got.shape == ref.shape, f"{case.id}: {what} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    ref = ref.float()
    err = (got.float() - ref).abs().max().item()
    err_plain = (plain.float() - ref).abs().max().item()
    magnitude = ref.abs().max().item() or zero_scale
    floor = REL_FLOOR[case.dtype] * magnitude
    assert err <= 2 * err_plain + floor, (f"{case.id}: {what} error {err:.3e} exceeds 2 x plain PyTorch's "
                                          f"{err_plain:.3e} + {floor:.1e}")


FP16, BF16 = torch.float16, torch.bfloat16

#: The grid every fused kernel (triton, cpu) is checked on against the reference.
KERNEL_CASES = [
    # -- dtypes × head dims (64, 80, 96, 128 and the odd 72, padded to 128 inside the Triton kernels)
    Case(),
    Case(head_dim=80, dtype=FP16),
    Case(head_dim=72, dtype=BF16),
    Case(batch=1, seqlen_q=45, seqlen_k=45, head_dim=72, dtype=FP16, gate_shape="rows"),
    Case(batch=1, seqlen_q=33, seqlen_k=33, head_dim=80, dtype=BF16, heads_kv=4, gate_activation="none"),
    Case(batch=1, seqlen_q=40, seqlen_k=40, head_dim=96, dtype=FP16),
    Case(batch=1, seqlen_q=40, seqlen_k=40, head_dim=128, dtype=BF16, heads_q=2, heads_kv=1),  # LLaMA-7B's D
    Case(batch=1, seqlen_q=20, seqlen_k=20, head_dim=128),
    # -- lengths: decode (Sq = 1), a single key, Sq < Sk (bottom-right causal), Sq > Sk (rows that see no word).
    # A single key is fp32: there plain PyTorch's word gradient is exactly 0, while a flash-style backward
    # carries the rounding of the saved output through D_w = rowsum(dO ∘ out), so the 2x rule cannot hold in
    # half precision (FlashAttention shares this; the error is that of rounding `out` to the dtype).
    Case(batch=1, seqlen_q=1, seqlen_k=97, heads_q=8, heads_kv=1),
    Case(batch=1, seqlen_q=1, seqlen_k=40, heads_q=4, heads_kv=1, dtype=BF16),
    Case(batch=2, seqlen_q=1, seqlen_k=1),
    Case(batch=1, seqlen_q=7, seqlen_k=1, causal=False),
    Case(seqlen_q=40, seqlen_k=97, dtype=FP16),
    Case(seqlen_q=97, seqlen_k=40),
    Case(batch=1, seqlen_q=70, seqlen_k=5, dtype=BF16, heads_kv=1),
    # -- prefix: none, the paper's 10, the largest tile (64), one per sample
    Case(batch=1, seqlen_q=50, seqlen_k=50, prefix_len=0),
    Case(batch=1, seqlen_q=50, seqlen_k=50, prefix_len=0, dtype=BF16, causal=False),
    Case(batch=2, seqlen_q=30, seqlen_k=30, prefix_len=64, dtype=FP16),
    Case(batch=2, seqlen_q=30, seqlen_k=30, prefix_len=64, prefix_batch=2, gate_shape="rows"),
    Case(batch=3, seqlen_q=20, seqlen_k=20, prefix_len=3, prefix_batch=3, dtype=BF16),
    # -- gates: per head, scalar, per sample; tanh and raw
    Case(batch=2, seqlen_q=25, seqlen_k=25, gate_shape="scalar", gate_activation="none", dtype=FP16),
    Case(batch=2, seqlen_q=25, seqlen_k=25, gate_shape="rows", gate_activation="none"),
    # -- GQA (2 query heads per kv head), MQA (one kv head), MHA
    Case(batch=1, seqlen_q=33, seqlen_k=33, heads_q=6, heads_kv=1, dtype=BF16),
    Case(batch=1, seqlen_q=33, seqlen_k=33, heads_q=3, heads_kv=3, causal=False),
    # -- strided (bshd views of bhsd tensors), custom scale
    Case(transposed=True),
    Case(batch=2, seqlen_q=20, seqlen_k=50, transposed=True, dtype=BF16, gate_shape="scalar"),
    Case(batch=1, seqlen_q=30, seqlen_k=30, softmax_scale=0.3, head_dim=80, causal=False),
    # -- varlen: shared and per-sequence prompts and gates, a sequence of one token, non-causal
    Case(seqlens=[5, 40, 1, 17], gate_shape="rows", prefix_batch=4, unused_tail=3),
    Case(seqlens=[33, 64, 2], dtype=BF16, head_dim=72),
    Case(seqlens=[20, 9], dtype=FP16, causal=False, gate_shape="scalar", prefix_len=0),
    Case(seqlens=[97, 3], heads_q=4, heads_kv=1, prefix_len=64, prefix_batch=2, gate_activation="none"),
]
