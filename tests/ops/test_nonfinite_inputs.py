"""Non-finite inputs of zero_init_attention: every backend (``reference``, ``sdpa``, ``cpu``, ``triton`` under the
interpreter) propagates them as PyTorch's attention does. An output row is NaN (or infinite) when a value it
depends on is: its query, a key or value it sees, its sequence's prefix keys and values, its gate. NaN never
crosses from one packed sequence into another, and a row that sees no key at all still gives 0.

Before: the reference (the tests' oracle) turned NaN word probabilities into 0, so a NaN query or key gave a
finite row there; PyTorch's fused CPU SDPA kernel returns a finite row for a NaN query, so ``sdpa`` did too.
"""
import pytest
import torch

from fastadapter import zero_init_attention, zero_init_attention_reference, zero_init_attention_varlen

from attention_cases import BACKENDS

NAN, INF = float("nan"), float("inf")


def attention(backend, *args, **kwargs):
    if backend == "reference":
        return zero_init_attention_reference(*args, **kwargs)
    if "cu_seqlens_q" in kwargs:
        offsets = [kwargs.pop(n) for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
        return zero_init_attention_varlen(*args, *offsets, backend=backend, **kwargs)
    return zero_init_attention(*args, backend=backend, **kwargs)


def nonfinite_rows(out: torch.Tensor) -> list[int]:
    """The positions (dimension -3: a query of ``[B, S, H, D]`` or a token of ``[T, H, D]``) with a non-finite
    value in any head, batch row 0."""
    if out.dim() == 4:
        out = out[0]
    return (~out.isfinite()).any(-1).any(-1).nonzero().flatten().tolist()


def batched_inputs(prefix_len: int, seqlen_q: int = 7, seqlen_k: int = 7, heads: int = 2, head_dim: int = 80):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, seqlen_q, heads, head_dim, generator=g)
    k, v = (torch.randn(1, seqlen_k, heads, head_dim, generator=g) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(1, prefix_len, heads, head_dim, generator=g) for _ in range(2))
    return {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v, "gate": torch.full((heads,), 0.5)}


def poisoned(inputs: dict, name: str, value: float) -> dict:
    inputs = {key: t.clone() for key, t in inputs.items()}
    if name == "gate":
        inputs["gate"][0] = value
    else:
        inputs[name][0, 3 if name in ("q", "k", "v") else 0, 0, 0] = value
    return inputs


# (poisoned input, prefix length, the rows that must be non-finite): the query's own row; every row that sees
# the key (causal: rows 3..6); with a prefix, every row (each reads the whole prefix, and the gate of its head).
CASES = [("q", 4, [3]), ("q", 0, [3]), ("k", 4, [3, 4, 5, 6]), ("k", 0, [3, 4, 5, 6]),
         ("prefix_k", 4, list(range(7))), ("prefix_v", 4, list(range(7))), ("gate", 4, list(range(7))),
         ("gate", 0, [])]


@pytest.mark.parametrize("name, prefix_len, expected", CASES, ids=[f"{n}-P{p}" for n, p, _ in CASES])
def test_every_backend_propagates_nan_to_the_rows_that_depend_on_it(name, prefix_len, expected):
    inputs = poisoned(batched_inputs(prefix_len), name, NAN)
    for backend in BACKENDS:
        out = attention(backend, *inputs.values())
        assert nonfinite_rows(out) == expected, backend


@pytest.mark.parametrize("name, prefix_len, expected", CASES, ids=[f"{n}-P{p}" for n, p, _ in CASES])
def test_every_backend_gives_the_reference_rows_for_an_infinite_input(name, prefix_len, expected):
    """An infinity is not always NaN downstream (``q · k = -inf`` just hides a key), so the rows depend on signs:
    every backend gives the reference's, which lie among the dependent rows (and are all of them for q)."""
    inputs = poisoned(batched_inputs(prefix_len), name, INF)
    rows = nonfinite_rows(attention("reference", *inputs.values()))
    assert set(rows) <= set(expected) and (name != "q" or rows == expected)
    for backend in (b for b in BACKENDS if b != "reference"):
        assert nonfinite_rows(attention(backend, *inputs.values())) == rows, backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [4, 9, 70])
@pytest.mark.parametrize("prefix_len", [0, 4])
@pytest.mark.parametrize("value", [NAN, INF])
def test_a_nonfinite_value_reaches_exactly_the_rows_that_see_it(backend, seqlen, prefix_len, value):
    """A row's output depends only on the keys and values it sees: v poisoned at position 3 makes rows 3.. NaN
    (or infinite) and leaves rows 0..2, which never see it, exactly as they are with a finite value there. (A dense
    product multiplies the hidden value by a probability 0: NaN leaked into every earlier row on reference, sdpa
    and triton, and on cpu at S = 4 but not at S = 9.)"""
    clean = batched_inputs(prefix_len, seqlen_q=seqlen, seqlen_k=seqlen)
    inputs = poisoned(clean, "v", value)
    out = attention(backend, *inputs.values())
    assert nonfinite_rows(out) == list(range(3, seqlen)), backend
    torch.testing.assert_close(out[:, :3], attention(backend, *clean.values())[:, :3], rtol=1e-6, atol=1e-6)


def _poisoned_cache(fill: float):
    """A padded KV cache [2, 9, 2, 16] whose rows use 4 and 9 slots, decoding 3 queries; the unused slots of
    row 0 (from torch.empty: anything) hold ``fill``. Returns (inputs with fill, inputs with zeros there)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 4, 16, generator=g)
    k, v = (torch.randn(2, 9, 2, 16, generator=g) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(1, 3, 2, 16, generator=g) for _ in range(2))
    used = torch.tensor([4, 9], dtype=torch.int32)
    zeros = {"q": q, "k": k.clone(), "v": v.clone(), "prefix_k": prefix_k, "prefix_v": prefix_v,
             "gate": torch.full((4,), 0.5)}
    zeros["k"][0, 4:] = 0
    zeros["v"][0, 4:] = 0
    filled = {**zeros, "k": zeros["k"].clone(), "v": zeros["v"].clone()}
    filled["k"][0, 4:] = fill
    filled["v"][0, 4:] = fill
    return filled, zeros, used


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [NAN, INF, -INF, 1e30])
def test_unused_cache_slots_past_seqused_k_never_reach_the_output(backend, fill):
    """Keys and values past seqused_k are unused cache slots (torch.empty: anything). sdpa let NaN there reach the
    output (96 non-finite values where the reference had none)."""
    filled, zeros, used = _poisoned_cache(fill)
    leaves = {n: t.clone().requires_grad_() for n, t in filled.items()}
    out = attention(backend, *leaves.values(), seqused_k=used)
    expected = attention(backend, *zeros.values(), seqused_k=used)
    assert torch.isfinite(out).all(), backend
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.backward(torch.ones_like(out))
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), (backend, name)
    assert torch.count_nonzero(leaves["k"].grad[0, 4:]) == 0 and torch.count_nonzero(leaves["v"].grad[0, 4:]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_outside_a_sequence_never_reach_the_output(backend):
    """Varlen with separate offsets: key tokens after cu_seqlens_k[-1] and past a sequence's seqused_k belong to
    no sequence; NaN there changes nothing."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(5, 2, 16, generator=g)
    k, v = (torch.randn(14, 1, 16, generator=g) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(1, 3, 1, 16, generator=g) for _ in range(2))
    offsets = dict(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
                   cu_seqlens_k=torch.tensor([0, 6, 11], dtype=torch.int32), max_seqlen_q=3, max_seqlen_k=6,
                   seqused_k=torch.tensor([4, 5], dtype=torch.int32))
    outside = torch.zeros(14, dtype=torch.bool)
    outside[4:6] = True  # sequence 0 uses keys 0..3 of its 6
    outside[11:] = True  # after the last sequence
    clean = [q, k.masked_fill(outside[:, None, None], 0.0), v.masked_fill(outside[:, None, None], 0.0),
             prefix_k, prefix_v, torch.full((2,), 0.5)]
    dirty = [q, k.masked_fill(outside[:, None, None], NAN), v.masked_fill(outside[:, None, None], NAN),
             prefix_k, prefix_v, torch.full((2,), 0.5)]
    out = attention(backend, *dirty, **dict(offsets))
    assert torch.isfinite(out).all(), backend
    torch.testing.assert_close(out, attention(backend, *clean, **dict(offsets)), rtol=1e-6, atol=1e-6)


def test_rows_that_see_no_key_stay_zero_while_a_nan_query_propagates():
    """Sq = 9 > Sk = 4, P = 0: the first 5 queries see no word and give 0 — but a NaN query among the others
    still gives NaN (the reference used to zero every NaN row, not only the blind ones)."""
    inputs = batched_inputs(0, seqlen_q=9, seqlen_k=4)
    inputs["q"][0, 7, 1, 5] = NAN
    for backend in BACKENDS:
        out = attention(backend, *inputs.values())
        assert nonfinite_rows(out) == [7], backend
        assert torch.equal(out[0, :5], torch.zeros_like(out[0, :5])), backend


@pytest.mark.parametrize("name, expected", [("q", [5]), ("k", [5, 6, 7, 8]), ("v", [5, 6, 7, 8])])
def test_nan_stays_in_its_packed_sequence(name, expected):
    """Varlen, sequences [0, 4) and [4, 9): a NaN at token 5 never reaches the first sequence."""
    g = torch.Generator().manual_seed(5)
    heads, head_dim = 2, 80
    tensors = {key: torch.randn(9, heads, head_dim, generator=g) for key in ("q", "k", "v")}
    prefix_k, prefix_v = (torch.randn(2, 3, heads, head_dim, generator=g) for _ in range(2))
    tensors[name][5, 1, 7] = NAN
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32)
    for backend in BACKENDS:
        out = attention(backend, tensors["q"], tensors["k"], tensors["v"], prefix_k, prefix_v,
                        torch.full((heads,), 0.5), cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                        max_seqlen_q=5, max_seqlen_k=5)
        rows = nonfinite_rows(out)
        assert set(expected) <= set(rows) and min(rows) >= 4, (backend, rows)


def test_sdpa_backend_gradients_stay_finite_for_finite_inputs():
    """The NaN propagation of the sdpa backend adds nothing to a finite output or its gradients."""
    inputs = batched_inputs(4)
    leaves = {key: t.clone().requires_grad_() for key, t in inputs.items()}
    out = attention("sdpa", *leaves.values())
    reference = attention("reference", *inputs.values())
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(bool(t.grad.isfinite().all()) for t in leaves.values())
