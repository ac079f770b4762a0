"""The public op: input validation, backend choice, the sdpa and reference backends, the fused custom-op
plumbing (with a fused test backend), the zero-init property and torch.compile."""
import pytest
import torch

import fastadapter
from fastadapter import (ZeroInitAttention, zero_init_attention, zero_init_attention_reference,
                         zero_init_attention_varlen)
from fastadapter import backends
from fastadapter.backends import Backend, get_backend, register_backend, select_backend
from fastadapter.backends.fused import FusedBackend
from fastadapter.kernels.problem import AttentionProblem
from fastadapter.reference import reference_attention

from attention_cases import BACKENDS, Case, attention, check_against_reference

SDPA_CASES = [
    Case(),
    Case(batch=1, seqlen_q=1, seqlen_k=97, heads_q=8, heads_kv=1),  # decode, MQA, bottom-right causal
    Case(seqlen_q=97, seqlen_k=40),  # Sq > Sk: the first rows see no word
    Case(seqlen_q=33, seqlen_k=33, head_dim=80, prefix_len=0),
    Case(head_dim=72, prefix_batch=2, gate_shape="rows", gate_activation="none"),
    Case(gate_shape="scalar", causal=False, transposed=True),
    Case(seqlens=[5, 40, 1, 17], gate_shape="rows", prefix_batch=4),
    Case(seqlens=[6, 11], unused_tail=3),
    Case(dtype=torch.bfloat16, head_dim=64),
    Case(dtype=torch.float16, seqlen_q=20, seqlen_k=45),
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: c.id)
def test_sdpa_backend_matches_reference(case):
    check_against_reference(case, "sdpa")


def _explicit_backward(q, k, v, pk, pv, gate_rows, grad_out, causal, scale, gate_tanh):
    """DESIGN.md §1's backward formulas, with full score matrices, for one batch (fp32, bhsd inside)."""
    group = q.shape[2] // k.shape[2]
    qh, do = q.float().transpose(1, 2), grad_out.float().transpose(1, 2)
    kh, vh = (t.float().transpose(1, 2).repeat_interleave(group, 1) for t in (k, v))
    pkh, pvh = (t.float().transpose(1, 2).repeat_interleave(group, 1) for t in (pk, pv))
    s_w = scale * qh @ kh.transpose(-1, -2)
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + sk - sq
        s_w = s_w.masked_fill(mask, float("-inf"))
    p_w = torch.softmax(s_w, -1).nan_to_num(0.0)
    p_p = torch.softmax(scale * qh @ pkh.transpose(-1, -2), -1)
    gamma = (torch.tanh(gate_rows) if gate_tanh else gate_rows)[:, :, None, None]
    o_p = p_p @ pvh
    d_p = (do * o_p).sum(-1, keepdim=True)
    d_w = (do * (p_w @ vh)).sum(-1, keepdim=True)  # == rowsum(dO ∘ out) − γ·D_p
    ds_w = p_w * (do @ vh.transpose(-1, -2) - d_w)
    ds_p = p_p * (gamma * (do @ pvh.transpose(-1, -2)) - gamma * d_p)
    dq = scale * (ds_w @ kh + ds_p @ pkh)

    def kv_sum(t, batch):  # [B, Hq, S, D] -> [batch, S, Hkv, D]
        t = t.reshape(t.shape[0], -1, group, *t.shape[2:]).sum(2).transpose(1, 2)
        return t.sum(0, keepdim=True) if batch == 1 else t

    dk, dv = kv_sum(scale * ds_w.transpose(-1, -2) @ qh, k.shape[0]), kv_sum(p_w.transpose(-1, -2) @ do, k.shape[0])
    dpk = kv_sum(scale * ds_p.transpose(-1, -2) @ qh, pk.shape[0])
    dpv = kv_sum(gamma * p_p.transpose(-1, -2) @ do, pk.shape[0])
    dgamma = d_p.sum((2, 3))  # [B, Hq]
    dgamma = dgamma.sum(0, keepdim=True) if gate_rows.shape[0] == 1 else dgamma
    dgate = dgamma * (1 - torch.tanh(gate_rows) ** 2) if gate_tanh else dgamma
    return dq.transpose(1, 2), dk, dv, dpk, dpv, dgate


class _ReferenceAsFused(FusedBackend):
    """A fused backend made of the reference forward and DESIGN.md's explicit backward formulas: tests the custom
    ops it registers, their autograd formula, their fake kernels — and the backward math every kernel implements."""

    name = "test_fused_reference"

    def not_supported_reasons(self, inp):
        return ["batched inputs only"] if inp.varlen else []

    def forward(self, inp):
        out, lse_w, lse_p = reference_attention(inp, return_lse=True)
        return out.to(inp.dtype).contiguous(), lse_w.contiguous(), lse_p.contiguous()

    def backward(self, inp, out, lse_w, lse_p, grad_out):
        grads = _explicit_backward(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.gate, grad_out,
                                   inp.causal, inp.softmax_scale, inp.gate_tanh)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v,
                                                           inp.gate)))


register_backend(_ReferenceAsFused())


@pytest.mark.parametrize("case", [Case(), Case(seqlen_q=20, seqlen_k=31, heads_kv=1, gate_shape="scalar"),
                                  Case(seqlen_q=9, seqlen_k=5, prefix_batch=2, gate_shape="rows", causal=False,
                                       gate_activation="none")],
                         ids=lambda c: c.id)
def test_fused_op_plumbing(case):
    check_against_reference(case, "test_fused_reference")


def test_fused_op_saves_only_inputs_output_and_lse():
    kw = Case(batch=1, seqlen_q=64, seqlen_k=64).make()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = zero_init_attention(**kw, backend="test_fused_reference")
    shapes = sorted(tuple(t.shape) for t in saved)
    q, k, pk = kw["q"], kw["k"], kw["prefix_k"]
    expected = sorted([tuple(q.shape), tuple(k.shape), tuple(k.shape), tuple(pk.shape), tuple(pk.shape),
                       (1, q.shape[2]), tuple(out.shape), (1, q.shape[2], q.shape[1]),
                       (1, q.shape[2], q.shape[1])])
    assert shapes == expected


def test_torch_compile_fullgraph_through_fused_op():
    module = ZeroInitAttention(4, backend="test_fused_reference")
    with torch.no_grad():
        module.gate.fill_(0.3)
    kw = Case(batch=1, seqlen_q=16, seqlen_k=16).make(requires_grad=False)
    args = (kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"])
    compiled = torch.compile(module, fullgraph=True)  # inductor, as users run it
    torch.testing.assert_close(compiled(*args), module(*args))
    compiled(*args).sum().backward()
    assert module.gate.grad is not None and module.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["sdpa", "reference", "test_fused_reference"])
def test_zero_gate_is_exactly_plain_causal_attention(backend):
    kw = Case(seqlen_q=50, seqlen_k=50).make()
    kw["gate"] = torch.zeros(4, requires_grad=True)
    out = zero_init_attention(**kw, backend=backend)
    plain = zero_init_attention(**{**kw, "prefix_k": kw["prefix_k"][:, :0], "prefix_v": kw["prefix_v"][:, :0]},
                                backend=backend)
    assert torch.equal(out, plain)
    out.backward(torch.randn_like(out))
    assert torch.count_nonzero(kw["prefix_v"].grad) == 0
    assert kw["gate"].grad.abs().sum() > 0  # the gate still learns from zero


def test_module_starts_at_zero_and_scalar_gate():
    module = ZeroInitAttention(8, gate_per_head=False, gate_activation="none")
    assert module.gate.shape == (1,) and torch.count_nonzero(module.gate) == 0
    kw = Case(heads_q=8, heads_kv=2, seqlen_q=9, seqlen_k=9).make(requires_grad=False)
    out = module(kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"])
    assert out.shape == kw["q"].shape
    packed = Case(seqlens=[4, 7], heads_q=8, heads_kv=2).make(requires_grad=False)
    with torch.no_grad():
        module.gate.fill_(0.4)
    out = module.forward_varlen(packed["q"], packed["k"], packed["v"], packed["prefix_k"], packed["prefix_v"],
                                packed["cu_seqlens_q"], packed["cu_seqlens_k"], 7, 7)
    expected = zero_init_attention_varlen(packed["q"], packed["k"], packed["v"], packed["prefix_k"],
                                          packed["prefix_v"], module.gate, packed["cu_seqlens_q"],
                                          packed["cu_seqlens_k"], 7, 7, gate_activation="none")
    torch.testing.assert_close(out, expected)


def test_automatic_choice_and_env_override(monkeypatch):
    kw = Case(batch=1, seqlen_q=4, seqlen_k=4).make(requires_grad=False)
    inp = AttentionProblem.from_dense(*(kw[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "gate")))
    assert select_backend(inp).name in ("cpu", "sdpa")  # never the Triton interpreter on its own
    monkeypatch.setenv("FASTADAPTER_BACKEND", "reference")
    assert select_backend(inp).name == "reference"
    monkeypatch.setenv("FASTADAPTER_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        select_backend(inp)


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    class _Never(Backend):
        name = "test-never"

        def not_supported_reasons(self, inp):
            return ["it never runs anything"]

    register_backend(_Never())
    kw = Case(batch=1, seqlen_q=4, seqlen_k=4).make(requires_grad=False)
    with pytest.raises(ValueError, match=r"backend 'test-never' cannot run these inputs \(q \[1, 4, 4, 64\] "
                                         r"float32 on cpu; .*\): it never runs anything"):
        zero_init_attention(**kw, backend="test-never")


def test_no_backend_error_names_the_shapes_dtypes_devices_and_every_reason(monkeypatch):
    """As xformers' dispatch: the message says what the inputs were, and why each backend passed."""
    class _Refuses(Backend):
        def __init__(self, name):
            self.name = name

        def not_supported_reasons(self, inp):
            return [f"{self.name} refuses"]

    monkeypatch.setattr(backends.registry, "_REGISTRY", {n: _Refuses(n) for n in ("cpu", "reference")})
    monkeypatch.delenv("FASTADAPTER_BACKEND", raising=False)
    kw = Case(batch=2, seqlen_q=5, seqlen_k=7, head_dim=16, dtype=torch.bfloat16).make(requires_grad=False)
    with pytest.raises(ValueError) as error:
        zero_init_attention(**kw)
    message = str(error.value)
    for expected in ("no backend can run these inputs", "q [2, 5, 4, 16] bfloat16 on cpu",
                     "k [2, 7, 2, 16] bfloat16 on cpu", "prefix_k [1, 10, 2, 16] bfloat16 on cpu",
                     "gate [1, 4] float32 on cpu", "causal=True", "cpu: cpu refuses", "reference: reference refuses"):
        assert expected in message, (expected, message)


def _inputs(**overrides):
    kw = Case(batch=2, seqlen_q=6, seqlen_k=6, heads_q=4, heads_kv=2, head_dim=8, prefix_len=3).make(
        requires_grad=False)
    kw.update(overrides)
    return kw


BAD_INPUTS = [
    (dict(k=torch.randn(3, 6, 2, 8), v=torch.randn(3, 6, 2, 8)), ValueError, "k has batch 3 but q has 2"),
    (dict(k=torch.randn(2, 6, 3, 8), v=torch.randn(2, 6, 3, 8)), ValueError,
     r"query heads \(4\) must be a multiple of the key/value heads \(3\)"),
    (dict(k=torch.randn(2, 6, 2, 16), v=torch.randn(2, 6, 2, 16)), ValueError, "k has head_dim 16 but q has 8"),
    (dict(v=torch.randn(2, 5, 2, 8)), ValueError, "k and v must have the same shape"),
    (dict(prefix_k=torch.randn(3, 3, 2, 8), prefix_v=torch.randn(3, 3, 2, 8)), ValueError,
     "prefix batch must be 1 .* or 2"),
    (dict(prefix_k=torch.randn(1, 3, 4, 8), prefix_v=torch.randn(1, 3, 4, 8)), ValueError,
     r"prefix_k must have shape \[1 or 2, P, 2, 8\]"),
    (dict(gate=torch.zeros(3)), ValueError, r"gate must have shape \[4\] .* \[1\] .* \[2, 4\]"),
    (dict(gate=torch.zeros(4, dtype=torch.long)), TypeError, "gate must be a floating-point tensor"),
    (dict(k=torch.randn(2, 6, 2, 8, dtype=torch.float64)), TypeError, "k has dtype torch.float64 but q has"),
    (dict(q=torch.randn(2, 6, 4, 8, dtype=torch.float64)), TypeError, "supported dtypes are float16"),
    (dict(q=torch.randn(2, 6, 8)), ValueError, r"q must have 4 dimensions \[B, Sq, Hq, D\]"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(gate_activation="sigmoid"), ValueError, "gate_activation must be one of"),
    (dict(gate=torch.zeros(4, device="meta")), ValueError, "gate is on meta but q is on cpu"),
    (dict(causal="no"), TypeError, "causal must be a bool"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be a positive finite number"),
    (dict(softmax_scale=-0.125), ValueError, "softmax_scale must be a positive finite number"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be a positive finite number"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a positive finite number"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a positive float"),
    (dict(attn_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool)), ValueError, "pass causal=False with it"),
    (dict(attn_mask=torch.ones(2, 1, 6, 5, dtype=torch.bool), causal=False), ValueError,
     r"attn_mask must have shape \[1 or 2, 1 or 4, 6, 6\]"),
    (dict(attn_mask=torch.ones(2, 1, 6, 6, dtype=torch.int32), causal=False), TypeError,
     "attn_mask must be bool .* or an additive float mask"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_says_what_was_wrong(overrides, error, message, backend):
    """Checked once, before any backend: every backend refuses alike (a scale of 0 or below used to give NaN on
    sdpa and numbers elsewhere; ``causal='no'`` ran causal)."""
    with pytest.raises(error, match=message):
        zero_init_attention(**_inputs(**overrides), backend=backend)


def test_the_dense_op_takes_no_offsets():
    """Packed sequences have their own entry point, zero_init_attention_varlen."""
    with pytest.raises(TypeError, match="cu_seqlens"):
        zero_init_attention(**_inputs(), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), max_seqlen=6)


@pytest.mark.parametrize("backend", ["cpu", "test_fused_reference"])
def test_second_order_gradients_of_a_fused_backend_say_they_are_not_supported(backend):
    kw = Case(batch=1, seqlen_q=5, seqlen_k=5, head_dim=16).make()
    out = zero_init_attention(**kw, backend=backend)
    (dq,) = torch.autograd.grad(out.square().sum(), kw["q"], create_graph=True)
    with pytest.raises(NotImplementedError, match=f"'{backend}' backend has no second-order gradient"):
        dq.sum().backward()


def test_second_order_gradients_of_the_reference_backend_run():
    kw = Case(batch=1, seqlen_q=5, seqlen_k=5, head_dim=16).make()
    out = zero_init_attention(**kw, backend="reference")
    (dq,) = torch.autograd.grad(out.square().sum(), kw["q"], create_graph=True)
    dq.sum().backward()
    assert kw["k"].grad is not None and torch.isfinite(kw["k"].grad).all()


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_masked_mode_follows_the_mask_on_the_composition_backends(mask_kind):
    """``attn_mask`` in place of the causal rule: a causal mask gives the causal op; a sliding window (query i
    sees keys i-2..i) gives the reference; the fused backends decline it, so the automatic choice runs sdpa."""
    kw = Case(batch=2, seqlen_q=9, seqlen_k=9, head_dim=16).make(requires_grad=False)
    row, col = torch.arange(9)[:, None], torch.arange(9)[None, :]
    causal, window = col <= row, (col <= row) & (col >= row - 2)
    if mask_kind == "additive":
        def as_mask(m):
            return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)[None, None]
    else:
        def as_mask(m):
            return m[None, None]
    expected = zero_init_attention(**kw, backend="reference")
    for backend in ("sdpa", "reference", None):
        masked = zero_init_attention(**{**kw, "causal": False}, attn_mask=as_mask(causal), backend=backend)
        torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
    windowed = zero_init_attention(**{**kw, "causal": False}, attn_mask=as_mask(window), backend="sdpa")
    by_hand = zero_init_attention_reference(**{**kw, "causal": False}, attn_mask=window[None, None])
    torch.testing.assert_close(windowed, by_hand, rtol=1e-5, atol=1e-5)
    for backend in ("cpu", "triton"):
        with pytest.raises(ValueError, match="an explicit attn_mask"):
            zero_init_attention(**{**kw, "causal": False}, attn_mask=as_mask(window), backend=backend)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


#: Malformed packed-sequence boundaries for T = 8 tokens: each would read or write out of bounds in a kernel, or
#: (sdpa, reference) return the wrong number of rows, or (triton, short max_seqlen) silently skip rows.
BAD_CU_SEQLENS = [
    (_i32(-3, 5, 8), 8, ValueError, "cu_seqlens_q must start at 0, got -3"),
    (_i32(0, 5, 12), 8, ValueError, "cu_seqlens_q ends at 12, past the 8 packed tokens"),
    (_i32(0, 6, 3, 8), 8, ValueError,
     r"cu_seqlens_q must never decrease, got cu_seqlens_q\[1\] = 6 > cu_seqlens_q\[2\] = 3"),
    (_i32(0, 9, 5, 9, 8, 9)[::2], 8, ValueError, "cu_seqlens_q must be contiguous"),
    (torch.tensor([0, 5, 8]), 8, TypeError, r"cu_seqlens_q must be an int32 tensor .N\+1., got dtype torch.int64"),
    (_i32(0, 5, 8).float(), 8, TypeError, "got dtype torch.float32"),
    ([0, 5, 8], 8, TypeError, r"cu_seqlens_q must be an int32 tensor .N\+1., got list"),
    (_i32(8), 8, ValueError, r"shape \[N\+1\] with N >= 1, got shape \(1,\)"),
    (_i32(0, 5, 8), 4, ValueError, r"max_seqlen_q = 4 is shorter than the longest packed sequence \(5 tokens\)"),
    (_i32(0, 5, 8), None, ValueError, "max_seqlen_q must be a positive int with cu_seqlens_q, got None"),
    (_i32(0, 5, 8), 0, ValueError, "max_seqlen_q must be a positive int with cu_seqlens_q, got 0"),
    (_i32(0, 5, 8), 5.0, ValueError, "max_seqlen_q must be a positive int with cu_seqlens_q, got 5.0"),
    # The Triton grid is sized from max_seqlen: 2**31 - 1 hung it; it is at most the tokens of the batch.
    (_i32(0, 5, 8), 2 ** 31 - 1, ValueError, r"max_seqlen_q = 2147483647 is more than the 8 packed tokens of q"),
    (_i32(0, 5, 8), 2 ** 40, ValueError, r"max_seqlen_q = 1099511627776 is more than the 8 packed tokens"),
    (_i32(0, 5, 8), 9, ValueError, r"max_seqlen_q = 9 is more than the 8 packed tokens"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_seqlens,max_seqlen,error,message", BAD_CU_SEQLENS, ids=[m for *_, m in BAD_CU_SEQLENS])
def test_bad_varlen_boundaries_raise_the_same_error_on_every_backend(backend, cu_seqlens, max_seqlen, error,
                                                                     message):
    q, k = torch.randn(8, 4, 8), torch.randn(8, 2, 8)
    pk = torch.randn(1, 3, 2, 8)
    with pytest.raises(error, match=message):
        zero_init_attention_varlen(q, k, k, pk, pk, torch.zeros(4), cu_seqlens, cu_seqlens, max_seqlen,
                                   max_seqlen, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_seqlen_shorter_than_a_sequence_is_an_error_not_missing_rows(backend):
    """A 150-token sequence with max_seqlen = 8: the Triton grid used to cover 8 rows and leave 142 zero."""
    q, k = torch.randn(160, 2, 16), torch.randn(160, 1, 16)
    pk = torch.randn(1, 3, 1, 16)
    cu = _i32(0, 150, 160)
    with pytest.raises(ValueError, match=r"max_seqlen_q = 8 is shorter than the longest packed sequence \(150 tokens\)"):
        zero_init_attention_varlen(q, k, k, pk, pk, torch.zeros(2), cu, cu, 8, 8, backend=backend)


#: Zero-size inputs: no query row (dk, dv must be exact zeros), no key, no sequence, empty packed sequences.
ZERO_SIZE_CASES = [
    Case(batch=2, seqlen_q=0, seqlen_k=17, head_dim=16),
    Case(batch=1, seqlen_q=0, seqlen_k=5, head_dim=16, prefix_len=0, causal=False),
    Case(batch=2, seqlen_q=6, seqlen_k=0, head_dim=16, causal=False),
    Case(batch=0, seqlen_q=7, seqlen_k=7, head_dim=16),
    Case(seqlens=[0, 9, 0], head_dim=16, gate_shape="rows", prefix_batch=3, unused_tail=2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ZERO_SIZE_CASES, ids=lambda c: c.id)
def test_zero_size_inputs_give_the_reference_and_zero_gradients(case, backend):
    """Every backend: what the reference gives (zeros where nothing is seen), never uninitialised memory."""
    kw = case.make()
    out = attention(**kw, backend=backend)
    assert out.shape == kw["q"].shape and torch.isfinite(out).all()
    out.backward(torch.randn_like(out))
    # An input the output does not depend on (the prompt when P = 0) may get no gradient at all: that is 0.
    grads = {n: kw[n].grad if kw[n].grad is not None else torch.zeros_like(kw[n])
             for n in ("q", "k", "v", "prefix_k", "prefix_v", "gate")}
    for name, grad in grads.items():
        assert grad.shape == kw[name].shape and torch.isfinite(grad).all(), name
    if kw["q"].numel() == 0:
        for name in ("k", "v", "prefix_k", "prefix_v", "gate"):
            assert torch.count_nonzero(grads[name]) == 0, f"{backend}: d{name} of no query row is not 0"
    check_against_reference(case, backend)


def test_reference_lse_and_upcast():
    kw = Case(batch=1, seqlen_q=5, seqlen_k=5, dtype=torch.bfloat16).make(requires_grad=False)
    out, lse_w, lse_p = zero_init_attention_reference(**kw, return_lse=True)
    assert out.dtype == torch.float32 and lse_w.shape == (1, 4, 5) and lse_p.dtype == torch.float32
    assert zero_init_attention_reference(**kw, upcast=False).dtype == torch.bfloat16


def test_get_backend_lists_known_names():
    with pytest.raises(ValueError, match="known backends"):
        get_backend("nope")
