"""Every fused kernel backend — ``triton`` and ``cpu`` (the compiled C++ of csrc/) — against the fp32 reference:
forward and every gradient over dtypes, head dims, lengths, prefixes, gates, GQA/MQA, masks, strides and varlen;
the saved log-sum-exps; the zero-init property; what autograd saves; strided incoming gradients; torch.compile
through the fused op.

``triton`` runs on CUDA tensors through the compiled, autotuned kernels on a machine with a GPU, and on CPU
tensors under Triton's interpreter without one (conftest.py); under the interpreter a few cases also run at the
compiled tile configurations (128-row tiles, several of them, ragged edges, padded prefix and head dim).

What is particular to one backend is in test_triton_backend.py and test_cpu_backend.py.
"""
import dataclasses

import pytest
import torch

from fastadapter import zero_init_attention, zero_init_attention_reference, zero_init_attention_varlen
from fastadapter.backends import get_backend
from fastadapter.kernels import configs as kernel_configs
from fastadapter.kernels.autotune import forced_configs, launch_plan
from fastadapter.kernels.jit_functions import jit_function
from fastadapter.kernels.layout import device_arch

from attention_cases import (BF16, FP16, FUSED_BACKENDS, INPUT_NAMES, KERNEL_CASES, Case, backend_inputs,
                             check_against_reference, device_for)


def _on_device(case: Case, backend: str) -> Case:
    """On CUDA the triton backend declines float32 (left to sdpa, see test_triton_backend.py): its fp32 cases
    run in bfloat16 there, so that every shape of the grid still goes through the compiled kernels."""
    if device_for(backend) == "cuda" and case.dtype == torch.float32:
        return dataclasses.replace(case, dtype=BF16)
    return case


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_matches_reference(case, backend):
    check_against_reference(_on_device(case, backend), backend, device=device_for(backend))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_matches_reference_long_sequence(backend):
    """Sq = Sk = 1025: many tiles on both sides of the diagonal, one ragged tile at the end."""
    case = Case(batch=1, seqlen_q=1025, seqlen_k=1025, heads_q=1, heads_kv=1, head_dim=64, dtype=BF16)
    check_against_reference(case, backend, device=device_for(backend))


#: Cases for the compiled tile sizes: several 128-row tiles with a ragged last one, P = 10 padded to a 16-slot
#: tile, D = 80 padded to 128, GQA, Sq < Sk, varlen across tile edges; with the first or the last candidate
#: configuration of every kernel.
_TILE_CASE = Case(batch=1, seqlen_q=260, seqlen_k=260, heads_q=2, heads_kv=1, head_dim=80, dtype=BF16)
COMPILED_TILE_CASES = [
    (_TILE_CASE, 0),
    (_TILE_CASE, -1),
    (Case(batch=1, seqlen_q=150, seqlen_k=270, heads_q=1, heads_kv=1, head_dim=64, dtype=FP16), -1),
    (Case(seqlens=[130, 40, 3], heads_q=2, heads_kv=1, head_dim=80, dtype=BF16, gate_shape="rows",
          prefix_batch=3), 0),
]


@pytest.mark.parametrize("case,which", COMPILED_TILE_CASES,
                         ids=[f"{c.id}-{'first' if w == 0 else 'last'}" for c, w in COMPILED_TILE_CASES])
def test_triton_at_compiled_tile_configurations(case, which):
    """The configurations the GPU launches (first or last candidate of every kernel), forced under the
    interpreter too: the multi-tile paths at real tile sizes (and on CUDA, each configuration compiled)."""
    device = device_for("triton")
    if device == "cuda":  # only what this GPU's launch plan keeps (a candidate may not fit its shared memory)
        facts = kernel_configs.KernelFacts.of(backend_inputs(case, device))
        arch, index = device_arch(torch.device(device)), torch.cuda.current_device()
        chosen = {k: launch_plan(k, jit_function(k), facts, arch, index)[0][which] for k in kernel_configs.KERNELS}
    else:
        block_d = max(16, 1 << (case.head_dim - 1).bit_length())
        chosen = {k: kernel_configs.candidates(k, block_d, interpreter=False)[which] for k in kernel_configs.KERNELS}
    assert chosen["forward"].kwargs["BLOCK_M"] >= 64
    with forced_configs(chosen):
        check_against_reference(case, "triton", device=device)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", [Case(seqlen_q=97, seqlen_k=40, prefix_len=0),
                                  Case(batch=1, seqlen_q=12, seqlen_k=5, prefix_len=0),  # decode-sized; rows see no word
                                  Case(seqlens=[5, 30, 1], prefix_batch=3, gate_shape="rows")],
                         ids=lambda c: c.id)
def test_saved_log_sum_exps_match_reference(case, backend):
    """lse_w, lse_p as saved for backward: natural log, -inf for rows that see no word and for P = 0."""
    case = _on_device(case, backend)
    inp = backend_inputs(case, device_for(backend))
    out, lse_w, lse_p = get_backend(backend).forward(inp)
    _, ref_w, ref_p = zero_init_attention_reference(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate,
                                                    causal=inp.causal, return_lse=True,
                                                    cu_seqlens_q=inp.cu_seqlens_q, cu_seqlens_k=inp.cu_seqlens_k,
                                                    max_seqlen_q=inp.max_seqlen_q or None,
                                                    max_seqlen_k=inp.max_seqlen_k or None)
    assert lse_w.shape == lse_p.shape == inp.lse_shape() and lse_w.dtype == torch.float32
    assert out.is_contiguous() and out.shape == inp.q.shape
    # On a GPU the fp32 cases run in bf16: the same rounded inputs on both sides, only the summation order differs.
    tol = 1e-5 if case.dtype == torch.float32 else 1e-4
    torch.testing.assert_close(lse_w, ref_w.to(lse_w.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(lse_p, ref_p.to(lse_p.dtype), rtol=tol, atol=tol)
    if case.seqlen_q > case.seqlen_k and not case.seqlens:
        assert torch.isneginf(lse_w[:, :, :case.seqlen_q - case.seqlen_k]).all()
        assert (out[:, :case.seqlen_q - case.seqlen_k] == 0).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", [Case(seqlen_q=40, seqlen_k=40), Case(batch=2, seqlen_q=3, seqlen_k=60)],
                         ids=lambda c: c.id)
def test_zero_gate_gives_exactly_the_output_without_prefix(case, backend):
    """The zero-init property: gate 0 is bit-for-bit plain attention, and the prompt gets no gradient."""
    kw = _on_device(case, backend).make(device_for(backend))
    gate = torch.zeros_like(kw["gate"], requires_grad=True)
    out = zero_init_attention(**{**kw, "gate": gate}, backend=backend)
    plain = zero_init_attention(**{**kw, "prefix_k": kw["prefix_k"][:, :0], "prefix_v": kw["prefix_v"][:, :0]},
                                backend=backend)
    assert torch.equal(out, plain)
    out.backward(torch.randn_like(out))
    assert torch.equal(kw["prefix_v"].grad, torch.zeros_like(kw["prefix_v"]))
    assert torch.equal(kw["prefix_k"].grad, torch.zeros_like(kw["prefix_k"]))
    assert gate.grad.abs().sum() > 0  # the gate itself learns from step one


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_autograd_saves_inputs_output_and_log_sum_exps_only(backend):
    """No S×S tensor is kept for backward: exactly the inputs, the output and two fp32 [B, Hq, Sq] lse."""
    case = _on_device(Case(batch=2, seqlen_q=97, seqlen_k=97), backend)
    kw = case.make(device_for(backend))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = zero_init_attention(**kw, backend=backend)
    lse_shape = (case.batch, case.heads_q, case.seqlen_q)
    expected = [(tuple(kw[n].shape), kw[n].dtype) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    expected += [((1, case.heads_q), torch.float32), (tuple(out.shape), out.dtype),
                 (lse_shape, torch.float32), (lse_shape, torch.float32)]
    assert sorted(saved, key=str) == sorted(expected, key=str)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_backward_honours_strided_grad_out(backend):
    case = _on_device(Case(seqlen_q=40, seqlen_k=40, heads_q=4, heads_kv=4), backend)
    inp = backend_inputs(case, device_for(backend))
    fused = get_backend(backend)
    out, lse_w, lse_p = fused.forward(inp)
    grad = torch.randn(case.batch, case.heads_q, case.seqlen_q, case.head_dim, device=inp.device)
    strided = fused.backward(inp, out, lse_w, lse_p, grad.transpose(1, 2))
    contiguous = fused.backward(inp, out, lse_w, lse_p, grad.transpose(1, 2).contiguous())
    for name, a, b in zip(INPUT_NAMES, strided, contiguous):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"d{name} depends on the strides of grad_out")
    assert strided[-1].shape == inp.gate.shape and strided[-1].dtype == torch.float32


class _TinyAttentionBlock(torch.nn.Module):
    """Projections around the op, as a model layer uses it (bshd, GQA, learnable prompt and gate)."""

    def __init__(self, backend: str, dim=32, heads=4, kv_heads=2, prompt=5):
        super().__init__()
        self.backend = backend
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = torch.nn.Linear(dim, dim, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.prompt = torch.nn.Parameter(torch.randn(1, prompt, dim))
        self.gate = torch.nn.Parameter(torch.full((heads,), 0.3))

    def forward(self, x):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k, v = self.wkv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        pk, pv = self.wkv(self.prompt).view(1, -1, 2, self.kv_heads, self.head_dim).unbind(2)
        return zero_init_attention(q, k, v, pk, pv, self.gate, backend=self.backend).reshape(b, s, -1)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_compile_fullgraph_through_the_fused_op(backend):
    """Compiled first, then eager: the compiled call must not depend on an eager call having run before."""
    torch.manual_seed(0)
    device = device_for(backend)
    dtype = BF16 if device == "cuda" else torch.float32
    block = _TinyAttentionBlock(backend).to(device)
    x = torch.randn(2, 19, 32, device=device)
    if dtype != torch.float32:  # the projections in bf16, the op in bf16 (fp32 is sdpa's on a GPU)
        block, x = block.to(dtype), x.to(dtype)
    compiled = torch.compile(block, fullgraph=True)(x)
    compiled.sum().backward()
    compiled_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    eager = block(x)
    eager.sum().backward()
    # bf16 on a GPU: inductor's projections may round differently from eager ones (one bf16 ulp, 2^-8).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    for got, want in zip(compiled_grads, (p.grad for p in block.parameters())):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_compile_fullgraph_through_the_varlen_entry_point(backend):
    """zero_init_attention_varlen compiled whole: the offsets are checked on the device (``_assert_async``), the
    backend's own custom ops trace through their fake kernels, and the gradients equal eager's."""
    device = device_for(backend)
    kw = Case(seqlens=[5, 9, 3], head_dim=16, prefix_batch=3, gate_shape="rows").make(device)
    names = ("q", "k", "v", "prefix_k", "prefix_v", "gate")

    def run(*tensors):
        q, k, v, pk, pv, gate = tensors
        return zero_init_attention_varlen(q, k, v, pk, pv, gate, kw["cu_seqlens_q"], kw["cu_seqlens_k"],
                                          kw["max_seqlen_q"], kw["max_seqlen_k"], backend=backend)

    results = []
    for fn in (torch.compile(run, fullgraph=True), run):
        leaves = [kw[n].detach().clone().requires_grad_() for n in names]
        out = fn(*leaves)
        out.square().sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (compiled, compiled_grads), (eager, eager_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
