"""Ragged batches in one call: separate query/key offsets (``cu_seqlens_q``/``cu_seqlens_k``) and ``seqused_k``.

Every backend is held to the fp32 reference on the ragged grid (forward and the gradient of every input), the
reference itself to per-sequence dense calls (the path the rest of the suite trusts), and every backend raises
the same error for malformed ragged arguments, before any kernel runs.
"""
from __future__ import annotations

import pytest
import torch

from attention_cases import BF16, FP16, Case, attention, check_against_reference, device_for
from fastadapter import zero_init_attention, zero_init_attention_reference, zero_init_attention_varlen

BACKENDS = ("reference", "sdpa", "cpu", "triton")
#: The backends held to the reference (the reference itself is held to per-sequence dense calls below).
FAST_BACKENDS = BACKENDS[1:]

#: The ragged grid: prefill chunks (Sq_b < Sk_b), decode over packed caches (Sq_b = 1), empty query and key
#: sequences, Sq_b > Sk_b (rows that see no key), GQA/MQA, per-sample prompts and gates, seqused_k on packed
#: and padded caches, odd sizes (97 keys, head dim 80) and tails of tokens outside every sequence.
RAGGED_CASES = [
    Case(seqlens=[3, 1, 7, 0], seqlens_k=[10, 5, 7, 4], prefix_batch=4, gate_shape="rows", unused_tail=2,
         unused_tail_k=3),
    Case(seqlens=[1, 1, 1], seqlens_k=[33, 1, 97], heads_q=8, heads_kv=2, dtype=BF16),
    Case(seqlens=[5, 0, 9], seqlens_k=[0, 4, 9], dtype=FP16, prefix_len=3),
    Case(seqlens=[12, 4], seqlens_k=[6, 20], causal=False, head_dim=80, heads_kv=1),
    Case(seqlens=[12, 4], seqlens_k=[6, 20], head_dim=80, prefix_len=0),
    Case(seqlens=[4, 6], seqlens_k=[10, 8], seqused=[7, 8], gate_activation="none", dtype=BF16),
    Case(seqlens=[2, 5], seqused=[1, 5], gate_shape="scalar"),
    Case(batch=3, seqlen_q=1, seqlen_k=40, seqused=[40, 17, 1], heads_q=4, heads_kv=1, prefix_batch=3,
         gate_shape="rows"),
    Case(batch=2, seqlen_q=5, seqlen_k=33, seqused=[9, 33], dtype=FP16),
    Case(batch=2, seqlen_q=3, seqlen_k=16, seqused=[0, 2]),
    Case(batch=2, seqlen_q=6, seqlen_k=20, seqused=[11, 3], causal=False, dtype=BF16, head_dim=80),
]


#: Under Triton's interpreter (no GPU) the grid costs minutes: the default run takes these three cases (separate
#: offsets with empty sequences and tails, decode over packed caches, seqused_k over a padded cache), the slow
#: run the rest (tests/kernels/test_triton_ragged.py covers the kernels' own ragged edges).
TRITON_DEFAULT_CASES = (0, 1, 7)


def _grid():
    for backend in FAST_BACKENDS:
        for index, case in enumerate(RAGGED_CASES):
            slow = (backend == "triton" and not torch.cuda.is_available() and index not in TRITON_DEFAULT_CASES)
            yield pytest.param(case, backend, id=f"{backend}-{case.id}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("case,backend", list(_grid()))
def test_ragged_inputs_match_the_reference_with_every_gradient(case, backend):
    check_against_reference(case, backend, device=device_for(backend))


def _per_sequence_reference(kw: dict) -> torch.Tensor:
    """The ragged output assembled from one dense reference call per sequence (Sq_b queries over its Sk_b keys,
    bottom-right causal), the layout every other test of the suite checks."""
    q, k, v, pk, pv, gate = (kw[n].detach() for n in ("q", "k", "v", "prefix_k", "prefix_v", "gate"))
    options = dict(causal=kw["causal"], gate_activation=kw["gate_activation"], softmax_scale=kw["softmax_scale"])
    used = kw["seqused_k"].tolist() if "seqused_k" in kw else None
    varlen = q.dim() == 3
    if varlen:
        cu_q, cu_k = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
        rows = len(cu_q) - 1
    else:
        rows = q.shape[0]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b in range(rows):
        if varlen:
            q_b, k_lo, k_hi = q[cu_q[b]:cu_q[b + 1]], cu_k[b], cu_k[b + 1]
            k_b, v_b = k[k_lo:k_hi], v[k_lo:k_hi]
        else:
            q_b, k_b, v_b = q[b], k[b], v[b]
        if used is not None:
            k_b, v_b = k_b[:used[b]], v_b[:used[b]]
        pick = (lambda t: t[b:b + 1] if t.shape[0] > 1 else t)
        gate_b = gate[b] if gate.dim() == 2 else gate
        if q_b.shape[0] == 0:
            continue
        if k_b.shape[0] == 0:  # no key: only the gated prefix part; one zero key and value add nothing
            k_b = v_b = torch.zeros_like(q_b[:1, :k.shape[-2]])
        o_b = zero_init_attention_reference(q_b[None], k_b[None], v_b[None], pick(pk), pick(pv), gate_b,
                                            **options)[0]
        if varlen:
            out[cu_q[b]:cu_q[b + 1]] = o_b
        else:
            out[b] = o_b
    return out


@pytest.mark.parametrize("case", RAGGED_CASES, ids=[c.id for c in RAGGED_CASES])
def test_the_ragged_reference_equals_one_dense_call_per_sequence(case):
    kw = case.make("cpu", requires_grad=False)
    got = zero_init_attention_reference(**kw)
    torch.testing.assert_close(got, _per_sequence_reference(kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "cpu", "triton"])
def test_one_offsets_tensor_for_q_and_k_equals_two_equal_tensors(backend):
    """One tensor passed as cu_seqlens_q and cu_seqlens_k is packed self-attention (decided once, in the bundle;
    the Triton kernels then read the key offsets from the query offsets): the same as two equal tensors."""
    kw = Case(seqlens=[7, 1, 12], prefix_batch=3, gate_shape="rows", head_dim=16).make("cpu", requires_grad=False)
    shared = attention(**kw, backend=backend)
    separate = attention(**{**kw, "cu_seqlens_k": kw["cu_seqlens_q"].clone()}, backend=backend)
    torch.testing.assert_close(separate, shared, rtol=1e-5, atol=1e-5)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


_SHARED = _i32(0, 6)


def _ragged_kw():
    q = torch.randn(6, 4, 8)
    k = torch.randn(9, 2, 8)
    pk = torch.randn(1, 3, 2, 8)
    return dict(q=q, k=k, v=k, prefix_k=pk, prefix_v=pk, gate=torch.zeros(4))


#: Malformed ragged arguments, the error they raise and (a regex of) its message: the same on every backend.
BAD_RAGGED = [
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=None, max_seqlen_q=4, max_seqlen_k=7), TypeError,
     r"cu_seqlens_k must be an int32 tensor \[N\+1\], got NoneType"),
    (dict(cu_seqlens_q=_SHARED, cu_seqlens_k=_SHARED, max_seqlen_q=6, max_seqlen_k=6), ValueError,
     "varlen q and k sharing one offsets tensor must hold the same tokens"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 9), max_seqlen_q=4, max_seqlen_k=9), ValueError,
     "the same number of sequences, got 2 and 1"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 10), max_seqlen_q=4, max_seqlen_k=6), ValueError,
     "cu_seqlens_k ends at 10, past the 9 packed tokens of k and v"),
    (dict(cu_seqlens_q=_i32(0, 2, 7), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=5, max_seqlen_k=5), ValueError,
     "cu_seqlens_q ends at 7, past the 6 packed tokens of q"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=4), ValueError,
     r"max_seqlen_k = 4 is shorter than the longest packed sequence \(5 tokens\)"),
    # The Triton grid is sized from max_seqlen_k too: 2**40 hung it. At most the tokens of k.
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=2 ** 40), ValueError,
     r"max_seqlen_k = 1099511627776 is more than the 9 packed tokens of k and v"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=2 ** 31 - 1, max_seqlen_k=5),
     ValueError, r"max_seqlen_q = 2147483647 is more than the 6 packed tokens of q"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=None, max_seqlen_k=5), ValueError,
     "max_seqlen_q must be a positive int with cu_seqlens_q, got None"),
    (dict(cu_seqlens_q=_i32(0, 4, 2), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=5), ValueError,
     r"cu_seqlens_q must never decrease, got cu_seqlens_q\[1\] = 4 > cu_seqlens_q\[2\] = 2"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=torch.tensor([0, 4, 9]), max_seqlen_q=4, max_seqlen_k=5),
     TypeError, "cu_seqlens_k must be an int32 tensor"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=5,
          seqused_k=_i32(4, 6)), ValueError, r"seqused_k\[1\] = 6 is more than the 5 keys sequence 1 holds"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=5,
          seqused_k=_i32(-1, 2)), ValueError, r"seqused_k must be >= 0, got seqused_k\[0\] = -1"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=5,
          seqused_k=_i32(1, 2, 3)), ValueError, r"seqused_k must have shape \[2\]"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=5,
          seqused_k=torch.tensor([1, 2])), TypeError, "seqused_k must be an int32 tensor"),
    (dict(cu_seqlens_q=_i32(0, 2, 6), cu_seqlens_k=_i32(0, 4, 9), max_seqlen_q=4, max_seqlen_k=5,
          seqused_k=_i32(1, 0, 2, 0)[::2]), ValueError, "seqused_k must be contiguous"),
]


@pytest.mark.parametrize("args,error,message", BAD_RAGGED, ids=[m for *_, m in BAD_RAGGED])
@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_ragged_arguments_raise_the_same_error_on_every_backend(backend, args, error, message):
    with pytest.raises(error, match=message):
        zero_init_attention_varlen(**_ragged_kw(), **args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seqused_k_beyond_a_padded_cache_is_an_error(backend):
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 5, 2, 8)
    pk = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match=r"seqused_k\[0\] = 6 is more than the 5 keys sequence 0 holds"):
        zero_init_attention(q, k, k, pk, pk, torch.zeros(4), seqused_k=_i32(6, 2), backend=backend)
