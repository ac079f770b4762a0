"""The ``triton`` backend under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py): forward and every
gradient against the fp32 reference over dtypes, head dims, lengths, prefixes, gates, GQA/MQA, masks, strides
and varlen; the zero-init property; what autograd saves; torch.compile; the backend's dispatch answers."""
import pytest
import torch

from fastadapter import zero_init_attention, zero_init_attention_reference
from fastadapter._inputs import validate_inputs
from fastadapter.backends import get_backend, select_backend
from fastadapter.kernels import configs as kernel_configs

from attention_cases import INPUT_NAMES, Case, check_against_reference

FP16, BF16 = torch.float16, torch.bfloat16

CASES = [
    # -- dtypes × head dims (64, 80 and the odd 72, padded to 128 inside the kernels)
    Case(),
    Case(head_dim=80, dtype=FP16),
    Case(head_dim=72, dtype=BF16),
    Case(batch=1, seqlen_q=45, seqlen_k=45, head_dim=72, dtype=FP16, gate_shape="rows"),
    Case(batch=1, seqlen_q=33, seqlen_k=33, head_dim=80, dtype=BF16, heads_kv=4, gate_activation="none"),
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case):
    check_against_reference(case, "triton")


def test_triton_matches_reference_long_sequence():
    """Sq = Sk = 1025: many tiles on both sides of the diagonal, one ragged tile at the end."""
    case = Case(batch=1, seqlen_q=1025, seqlen_k=1025, heads_q=1, heads_kv=1, head_dim=64, dtype=BF16)
    check_against_reference(case, "triton")


def _backend_inputs(case: Case, **overrides):
    kw = case.make(requires_grad=False)
    kw.update(overrides)
    return validate_inputs(kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"], kw["gate"],
                           causal=kw["causal"], softmax_scale=kw["softmax_scale"],
                           gate_activation=kw["gate_activation"], cu_seqlens=kw.get("cu_seqlens"),
                           max_seqlen=kw.get("max_seqlen"))


@pytest.mark.parametrize("case", [Case(seqlen_q=97, seqlen_k=40, prefix_len=0),
                                  Case(seqlens=[5, 30, 1], prefix_batch=3, gate_shape="rows")],
                         ids=lambda c: c.id)
def test_saved_log_sum_exps_match_reference(case):
    """lse_w, lse_p as saved for backward: natural log, -inf for rows that see no word and for P = 0."""
    inp = _backend_inputs(case)
    out, lse_w, lse_p = get_backend("triton").forward(inp)
    _, ref_w, ref_p = zero_init_attention_reference(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate,
                                                    causal=inp.causal, return_lse=True,
                                                    cu_seqlens=inp.cu_seqlens,
                                                    max_seqlen=inp.max_seqlen or None)
    assert lse_w.shape == lse_p.shape == inp.lse_shape() and lse_w.dtype == torch.float32
    assert out.is_contiguous() and out.shape == inp.q.shape
    torch.testing.assert_close(lse_w, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_p, ref_p, rtol=1e-5, atol=1e-5)
    if case.seqlen_q > case.seqlen_k and not case.seqlens:
        assert torch.isneginf(lse_w[:, :, :case.seqlen_q - case.seqlen_k]).all()
        assert (out[:, :case.seqlen_q - case.seqlen_k] == 0).all()


def test_zero_gate_gives_exactly_the_output_without_prefix():
    """The zero-init property: gate 0 is bit-for-bit plain attention, and the prompt gets no gradient."""
    case = Case(seqlen_q=40, seqlen_k=40)
    kw = case.make()
    gate = torch.zeros_like(kw["gate"], requires_grad=True)
    out = zero_init_attention(**{**kw, "gate": gate}, backend="triton")
    plain = zero_init_attention(**{**kw, "prefix_k": kw["prefix_k"][:, :0], "prefix_v": kw["prefix_v"][:, :0]},
                                backend="triton")
    assert torch.equal(out, plain)
    out.backward(torch.randn_like(out))
    assert torch.equal(kw["prefix_v"].grad, torch.zeros_like(kw["prefix_v"]))
    assert torch.equal(kw["prefix_k"].grad, torch.zeros_like(kw["prefix_k"]))
    assert gate.grad.abs().sum() > 0  # the gate itself learns from step one


def test_autograd_saves_inputs_output_and_log_sum_exps_only():
    """No S×S tensor is kept for backward: exactly the inputs, the output and two fp32 [B, Hq, Sq] lse."""
    case = Case(batch=2, seqlen_q=97, seqlen_k=97)
    kw = case.make()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = zero_init_attention(**kw, backend="triton")
    lse_shape = (case.batch, case.heads_q, case.seqlen_q)
    expected = [(tuple(kw[n].shape), kw[n].dtype) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    expected += [((1, case.heads_q), torch.float32), (tuple(out.shape), out.dtype),
                 (lse_shape, torch.float32), (lse_shape, torch.float32)]
    assert sorted(saved, key=str) == sorted(expected, key=str)


def test_backward_honours_strided_grad_out():
    case = Case(seqlen_q=40, seqlen_k=40, heads_q=4, heads_kv=4)
    inp = _backend_inputs(case)
    backend = get_backend("triton")
    out, lse_w, lse_p = backend.forward(inp)
    grad = torch.randn(case.batch, case.heads_q, case.seqlen_q, case.head_dim)
    strided = backend.backward(inp, out, lse_w, lse_p, grad.transpose(1, 2))
    contiguous = backend.backward(inp, out, lse_w, lse_p, grad.transpose(1, 2).contiguous())
    for name, a, b in zip(INPUT_NAMES, strided, contiguous):
        assert torch.equal(a, b), f"d{name} depends on the strides of grad_out"
    assert strided[-1].shape == inp.gate.shape and strided[-1].dtype == torch.float32


class _TinyAttentionBlock(torch.nn.Module):
    """Projections around the op, as a model layer uses it (bshd, GQA, learnable prompt and gate)."""

    def __init__(self, dim=32, heads=4, kv_heads=2, prompt=5):
        super().__init__()
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
        return zero_init_attention(q, k, v, pk, pv, self.gate, backend="triton").reshape(b, s, -1)


def test_torch_compile_fullgraph_through_the_triton_op():
    torch.manual_seed(0)
    block = _TinyAttentionBlock()
    x = torch.randn(2, 19, 32)
    eager = block(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip((p.grad for p in block.parameters()), eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dispatch_answers():
    backend = get_backend("triton")
    assert backend.fused and backend.unavailable_reason() is None
    inp = _backend_inputs(Case(seqlen_q=8, seqlen_k=8))
    assert backend.not_supported_reasons(inp) == []
    reasons = backend.automatic_choice_reasons(inp)
    assert any("interpreter only when asked for by name" in r for r in reasons)
    assert select_backend(inp).name != "triton"  # CPU tensors: the automatic choice passes over triton
    assert select_backend(inp, "triton") is backend

    too_long = _backend_inputs(Case(seqlen_q=8, seqlen_k=8, prefix_len=65))
    assert any("prefix length 65 > 64" in r for r in backend.not_supported_reasons(too_long))
    with pytest.raises(ValueError, match="prefix length 65"):
        zero_init_attention(**Case(seqlen_q=8, seqlen_k=8, prefix_len=65).make(), backend="triton")
    too_wide = _backend_inputs(Case(batch=1, seqlen_q=2, seqlen_k=2, heads_q=1, heads_kv=1, head_dim=264))
    assert any("head_dim 264 > 256" in r for r in backend.not_supported_reasons(too_wide))


def test_unavailable_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = get_backend("triton").unavailable_reason()
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_pruning_keeps_what_fits():
    candidates = kernel_configs.configs("forward", interpreter=False)
    fits_h100 = kernel_configs.prune("forward", candidates, block_d=128, block_p=16, element_bytes=2,
                                     shared_memory_limit=232448, seqlen_bucket=2048)
    fits_a100 = kernel_configs.prune("forward", candidates, block_d=128, block_p=16, element_bytes=2,
                                     shared_memory_limit=166912, seqlen_bucket=2048)
    assert len(fits_a100) < len(fits_h100) == len(candidates)  # 128×128 tiles need Hopper's shared memory
    tiny = kernel_configs.prune("forward", candidates, block_d=256, block_p=64, element_bytes=4,
                                shared_memory_limit=48 * 1024, seqlen_bucket=16)
    assert len(tiny) == 1  # nothing fits: the smallest footprint is kept rather than nothing
    assert len(kernel_configs.configs("backward_dq", interpreter=True)) == 1
    # The autotuner hook reads the launch's keyword arguments (no BLOCK_P for kernels without the prefix).
    pruner = kernel_configs.autotune_pruner("backward_dkdv")
    kept = pruner(kernel_configs.configs("backward_dkdv", interpreter=False), {},
                  Q=torch.empty(1, dtype=BF16), BLOCK_D=128, seqlen_bucket=64)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [(32, 64)]  # 128-key tiles > 64
