"""Ragged batches in the Triton kernels (issue 11), beyond the grid every backend runs (test_ragged_attention.py):

* which ragged shapes take the split-KV decode kernels and which the forward kernel, and that both give the
  same ``out`` and log-sum-exps (the backward kernels take either);
* exact zeros where nothing is computed: query tokens after ``cu_seqlens_q[-1]`` (out 0, lse ``-inf``, dq 0),
  keys past ``seqused_k`` or after ``cu_seqlens_k[-1]`` and keys of a sequence without queries (dk = dv = 0),
  rows that see no key (word part 0, ``lse_w = -inf``);
* odd sizes across tile edges (97 query tokens, head dim 80 padded to 128, a ragged last key tile);
* the tiles a GPU launches, run under the interpreter on ragged inputs (slow), and the ahead-of-time launch plan
  of ragged inputs at LLaMA-7B shapes (slow).
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fastadapter.backends import get_backend
from fastadapter.kernels import configs as kernel_configs
from fastadapter.kernels.autotune import forced_configs
from fastadapter.kernels import decode
from fastadapter.kernels.forward import attention_forward

from attention_cases import BF16, FP16, Case, backend_inputs, check_against_reference


@pytest.fixture
def decode_calls(monkeypatch):
    """The inputs the decode kernels' launcher was called with (so a test knows which path ran)."""
    calls = []
    launch = decode.attention_decode

    def counting(inp):
        calls.append(inp)
        return launch(inp)

    monkeypatch.setattr(decode, "attention_decode", counting)
    return calls


#: An unpadded decode step (one query per sequence over its packed cache), the same over a padded cache read up
#: to each row's length (seqused_k), a short chunked step, and what keeps the forward kernel.
DISPATCH = [
    (Case(seqlens=[1, 1, 1], seqlens_k=[9, 1, 40], heads_q=2, heads_kv=1, head_dim=16), True),
    (Case(batch=3, seqlen_q=1, seqlen_k=40, seqused=[9, 1, 40], heads_q=2, heads_kv=1, head_dim=16), True),
    (Case(seqlens=[16, 0], seqlens_k=[30, 5], seqused=[17, 0], heads_q=2, heads_kv=1, head_dim=16), True),
    (Case(seqlens=[17, 1], seqlens_k=[30, 5], heads_q=2, heads_kv=1, head_dim=16), False),  # a prefill chunk
    (Case(seqlens=[3, 5], heads_q=2, heads_kv=1, head_dim=16), False),  # packed self-attention
    (Case(seqlens=[4, 2], seqlens_k=[4, 1], heads_q=2, heads_kv=1, head_dim=16), False),  # no longer cache
    (Case(batch=2, seqlen_q=17, seqlen_k=40, seqused=[3, 40], heads_q=2, heads_kv=1, head_dim=16), False),
]


@pytest.mark.parametrize("case,takes_decode", DISPATCH, ids=[c.id for c, _ in DISPATCH])
def test_which_ragged_shapes_take_the_decode_kernels(case, takes_decode):
    reasons = decode.decode_not_supported_reasons(backend_inputs(case))
    assert (not reasons) == takes_decode, reasons
    if not takes_decode:
        assert reasons[0].startswith(("max_seqlen_q = 17 > 16", "max_seqlen_k = ", "Sq = 17 > 16")), reasons


@pytest.mark.parametrize("case", [c for c, takes in DISPATCH[:3] if takes], ids=lambda c: c.id)
def test_the_decode_kernels_give_the_forward_kernels_results_on_ragged_steps(case, decode_calls):
    """Through the backend (which takes the decode kernels) against the forward kernel on the same inputs: out,
    lse_w, lse_p, with -inf exactly where nothing is visible."""
    inp = backend_inputs(case)
    out, lse_w, lse_p = get_backend("triton").forward(inp)
    assert len(decode_calls) == 1
    ref_out, ref_w, ref_p = attention_forward(inp)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_w, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_p, ref_p, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(lse_w), torch.isneginf(ref_w))


#: Both paths: a decode-like step (max_seqlen_q = 2 over longer caches) and a prefill (17 queries), each with
#: tails of tokens outside every sequence, a sequence with keys but no query, seqused_k below the sequences'
#: lengths, and rows that see no key (bottom-right causal with more queries than keys used).
ZEROS = [
    Case(seqlens=[2, 0, 1], seqlens_k=[9, 6, 4], seqused=[1, 6, 0], unused_tail=3, unused_tail_k=4, heads_q=2,
         heads_kv=1, head_dim=16, prefix_len=3, prefix_batch=3, gate_shape="rows"),
    Case(seqlens=[17, 0, 5], seqlens_k=[20, 6, 40], seqused=[12, 6, 3], unused_tail=3, unused_tail_k=4, heads_q=2,
         heads_kv=1, head_dim=16, prefix_len=3),
]


@pytest.mark.parametrize("case", ZEROS, ids=lambda c: c.id)
def test_what_nothing_sees_is_exactly_zero(case):
    kw = case.make(requires_grad=False)
    inp = backend_inputs(case)
    backend = get_backend("triton")
    out, lse_w, lse_p = backend.forward(inp)
    grad_out = torch.randn(out.shape)
    dq, dk, dv, _, _, _ = backend.backward(inp, out, lse_w, lse_p, grad_out)
    cu_q, cu_k, used = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist(), kw["seqused_k"].tolist()
    tail = slice(cu_q[-1], None)
    assert torch.equal(out[tail], torch.zeros_like(out[tail])) and torch.equal(dq[tail], torch.zeros_like(dq[tail]))
    assert torch.isneginf(lse_w[:, tail]).all() and torch.isneginf(lse_p[:, tail]).all()
    seen = torch.zeros(kw["k"].shape[0], dtype=torch.bool)
    for b in range(len(used)):
        n_q, n_k = cu_q[b + 1] - cu_q[b], used[b]
        if n_q:
            seen[cu_k[b]:cu_k[b] + n_k] = True  # the last query of a sequence sees all its used keys
        rows = torch.arange(n_q)
        blind = rows + n_k - n_q < 0  # bottom-right causal: query i sees keys j <= i + n_k - n_q
        assert torch.isneginf(lse_w[:, cu_q[b]:cu_q[b + 1]][:, blind]).all()
        assert not torch.isneginf(lse_w[:, cu_q[b]:cu_q[b + 1]][:, ~blind]).any()
    assert not seen.all() and seen.any()
    for grad in (dk, dv):
        assert torch.equal(grad[~seen], torch.zeros_like(grad[~seen]))
        assert (grad[seen].abs().amax(dim=(1, 2)) > 0).all()


def test_odd_sizes_across_tile_edges():
    """97 query tokens (one 64-row tile and a ragged one), head dim 80 (padded to 128), keys in 64-key tiles with
    ragged ends of their own (seqused_k below the sequence's length), GQA, per-sample prompts, both tails."""
    check_against_reference(Case(seqlens=[97, 3], seqlens_k=[70, 99], seqused=[61, 99], head_dim=80, heads_q=2,
                                 heads_kv=1, dtype=FP16, unused_tail=2, unused_tail_k=5, prefix_batch=2,
                                 gate_shape="rows"), "triton")


def _compiled_decode_config(monkeypatch):
    """The decode tiles a GPU launches (64-key tiles, 16/64-row stacked tiles), under the interpreter."""
    config = decode.decode_config
    monkeypatch.setattr(decode, "decode_config",
                        lambda layout, element_bytes: config(dataclasses.replace(layout, interpreter=False),
                                                             element_bytes))


@pytest.mark.parametrize("case", [
    Case(batch=3, seqlen_q=1, seqlen_k=260, seqused=[260, 130, 5], heads_q=2, heads_kv=1, head_dim=48, dtype=BF16,
         prefix_batch=3, gate_shape="rows"),
    pytest.param(Case(seqlens=[2, 1, 1], seqlens_k=[300, 0, 129], heads_q=4, heads_kv=2, head_dim=80, dtype=FP16),
                 marks=pytest.mark.slow)], ids=lambda c: c.id)
def test_compiled_decode_tiles_over_ragged_caches(case, monkeypatch):
    """Three 128-key chunks of two 64-key tiles over the longest cache (the last ragged); the shorter rows' later
    chunks are empty (the merge must ignore them): the forward kernel's out and log-sum-exps."""
    _compiled_decode_config(monkeypatch)
    inp = backend_inputs(case)
    assert decode.decode_applies(inp)
    compiled = decode.decode_config(decode.Layout.of(inp), 2)
    assert compiled.block_n == 64 and decode.split_plan(decode.Layout.of(inp), None, compiled.block_m,
                                                        compiled.block_n)[1:] == (3, 128)
    out, lse_w, lse_p = decode.attention_decode(inp)
    ref_out, ref_w, ref_p = attention_forward(inp)
    torch.testing.assert_close(lse_w, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_p, ref_p, rtol=1e-5, atol=1e-5)
    ulp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[case.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=ulp, atol=ulp)


#: Ragged inputs at the tile sizes of a GPU: 128-row query tiles (two, the second ragged), 64-key tiles, D = 80
#: padded to 128, P = 10 padded to 16, separate offsets, seqused_k, GQA.
COMPILED_TILE_CASES = [
    (Case(seqlens=[150, 2, 0], seqlens_k=[200, 70, 9], seqused=[190, 70, 9], heads_q=2, heads_kv=1, head_dim=80,
          dtype=BF16, gate_shape="rows", prefix_batch=3, unused_tail=1, unused_tail_k=2), 0),
    (Case(batch=2, seqlen_q=140, seqlen_k=200, seqused=[200, 90], heads_q=2, heads_kv=1, head_dim=64, dtype=FP16),
     -1),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,which", COMPILED_TILE_CASES, ids=lambda c: getattr(c, "id", str(c)))
def test_compiled_tile_sizes_on_ragged_inputs(case, which):
    """Forward and every gradient with the first or the last candidate configuration a GPU may launch."""
    block_d = max(16, 1 << (case.head_dim - 1).bit_length())
    chosen = {k: kernel_configs.candidates(k, block_d, interpreter=False)[which] for k in kernel_configs.KERNELS}
    with forced_configs(chosen):
        check_against_reference(case, "triton")


_PLAN = r"""
import json, sys, torch
from fastadapter.kernels import configs
from fastadapter.kernels.autotune import launch_plan
from fastadapter.kernels.jit_functions import jit_function
shared = sys.argv[3] == "shared"
facts = configs.KernelFacts(dtype=torch.bfloat16, head_dim=int(sys.argv[2]), varlen=True, seqused=not shared,
                            grouped=True, shared_offsets=shared)
rows = {}
for kernel in configs.KERNELS:
    kept, rejected = launch_plan(kernel, jit_function(kernel), facts, int(sys.argv[1]))
    rows[kernel] = [configs.config_name(c) for c in kept]
print(json.dumps(rows))
"""


@pytest.mark.slow
@pytest.mark.parametrize("capability,head_dim,offsets", [(80, 128, "separate"), (90, 128, "separate"),
                                                         (80, 80, "separate"), (90, 128, "shared")])
def test_ragged_inputs_have_a_configuration_of_every_kernel_ahead_of_time(capability, head_dim, offsets):
    """Varlen with its own key offsets, seqused_k and GQA (what an unpadded Hugging Face batch gives) compiles for
    sm_80 and sm_90 with a configuration of every kernel that spills nothing: the backend runs it rather than
    declining it (the compiler's figures, read from the cubins in a child process without the interpreter). On
    sm_90 it needs the 16-row dk/dv fallback; packed self-attention with GQA (one cu_seqlens) keeps the 32-row
    tiles there, as before the key offsets had their own pointer."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PLAN, str(capability), str(head_dim), offsets],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    plans = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(plans) == set(kernel_configs.KERNELS)
    for kernel, kept in plans.items():
        assert kept, f"no {kernel} configuration fits sm_{capability} at D = {head_dim} for ragged inputs"
    if offsets == "shared":
        assert "BLOCK_M=32 BLOCK_N=64 warps=8 stages=2" in plans["backward_dkdv"]
