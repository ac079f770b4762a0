"""The split-KV decode kernels (kernels/decode.py) under Triton's interpreter, and compiled ahead of time.

Decode steps (Sq ≤ 16 query rows over a KV cache) go through the split and merge kernels: the output and every
gradient (the backward kernels take the decode kernels' log-sum-exps) against the fp32 reference; the
log-sum-exps equal the forward kernel's; the split plan crosses chunk boundaries here and fills the SMs on a GPU;
what does not take the decode path; and the compiled kernels neither spill nor exceed shared memory on sm_80 and
sm_90.
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from fastadapter import zero_init_attention
from fastadapter.backends import get_backend
from fastadapter.kernels import decode
from fastadapter.kernels.forward import attention_forward
from fastadapter.kernels.layout import Layout

from attention_cases import BF16, FP16, Case, backend_inputs, check_against_reference

#: Sq 1, 3, 16 × Sk 1, 97, 300 (several chunks, a ragged last chunk), GQA 8x2 and MQA 4x1, D 64 and 80
#: (padded to 128), P 0 and 10, shared and per-sample prompts, gates [Hq] / [1] / [B, Hq], tanh and raw,
#: fp32 / fp16 / bf16, causal and not, strided (bhsd) caches. A single key is fp32 (see attention_cases.py).
DECODE_CASES = [
    Case(batch=2, seqlen_q=1, seqlen_k=300, heads_q=8, heads_kv=2),
    Case(batch=2, seqlen_q=3, seqlen_k=97, heads_q=8, heads_kv=2, head_dim=80, dtype=FP16, prefix_batch=2,
         gate_shape="rows"),
    Case(batch=1, seqlen_q=16, seqlen_k=300, heads_q=8, heads_kv=2, dtype=BF16, gate_activation="none"),
    Case(batch=2, seqlen_q=16, seqlen_k=97, heads_q=8, heads_kv=2, head_dim=80, gate_shape="scalar",
         causal=False, dtype=BF16, prefix_batch=2),
    Case(batch=2, seqlen_q=1, seqlen_k=1, heads_q=4, heads_kv=1),
    Case(batch=1, seqlen_q=16, seqlen_k=1, heads_q=4, heads_kv=1, prefix_len=0),  # rows that see no word
    Case(batch=3, seqlen_q=3, seqlen_k=300, heads_q=4, heads_kv=1, head_dim=80, prefix_len=0, causal=False,
         dtype=FP16),
    Case(batch=2, seqlen_q=1, seqlen_k=97, heads_q=4, heads_kv=1, dtype=BF16, prefix_batch=2, gate_shape="rows",
         gate_activation="none"),
    Case(batch=2, seqlen_q=3, seqlen_k=97, heads_q=8, heads_kv=2, transposed=True, dtype=BF16),
]


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the calls of the decode kernels' launcher (so a test knows the decode path was taken)."""
    calls = []
    launch = decode.attention_decode

    def counting(inp):
        calls.append(inp.seqlen_q)
        return launch(inp)

    monkeypatch.setattr(decode, "attention_decode", counting)
    return calls


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
def test_decode_matches_reference(case, decode_calls):
    check_against_reference(case, "triton")
    assert decode_calls, "the triton backend did not take the decode kernels for a decode step"


@pytest.mark.parametrize("case", DECODE_CASES[:4] + DECODE_CASES[5:6], ids=lambda c: c.id)
def test_log_sum_exps_equal_the_forward_kernels(case):
    """out, lse_w, lse_p as the forward kernel gives them (same shapes, -inf where nothing is visible)."""
    inp = backend_inputs(case)
    out, lse_w, lse_p = decode.attention_decode(inp)
    ref_out, ref_w, ref_p = attention_forward(inp)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and out.is_contiguous()
    assert lse_w.shape == lse_p.shape == inp.lse_shape() and lse_w.dtype == lse_p.dtype == torch.float32
    torch.testing.assert_close(lse_w, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_p, ref_p, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(lse_w), torch.isneginf(ref_w))
    ulp = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[case.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=ulp, atol=ulp)
    if case.causal and case.seqlen_q > case.seqlen_k:
        blind = case.seqlen_q - case.seqlen_k
        assert torch.isneginf(lse_w[:, :, :blind]).all() and not torch.isneginf(lse_w[:, :, blind:]).any()


@pytest.mark.parametrize("case", [
    Case(batch=1, seqlen_q=16, seqlen_k=300, heads_q=8, heads_kv=2, head_dim=80, dtype=BF16, gate_shape="rows"),
    Case(batch=2, seqlen_q=1, seqlen_k=300, heads_q=8, heads_kv=1, dtype=FP16, prefix_batch=2)], ids=lambda c: c.id)
def test_compiled_tile_sizes_under_the_interpreter(case, monkeypatch):
    """The tiles a GPU launches (64 stacked rows, 64-key tiles, D = 80 padded to 128), three chunks of two key
    tiles each, the last ragged: the same results as the forward kernel."""
    config = decode.decode_config
    monkeypatch.setattr(decode, "decode_config",
                        lambda layout, element_bytes: config(dataclasses.replace(layout, interpreter=False),
                                                             element_bytes))
    inp = backend_inputs(case)
    layout = Layout.of(inp)
    compiled = config(dataclasses.replace(layout, interpreter=False), 2)
    assert compiled.block_n == 64 and compiled.block_m == (64 if case.seqlen_q == 16 else 16)
    assert decode.split_plan(layout, None, compiled.block_m, compiled.block_n)[1:] == (3, 128)
    out, lse_w, lse_p = decode.attention_decode(inp)
    ref_out, ref_w, ref_p = attention_forward(inp)
    torch.testing.assert_close(lse_w, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_p, ref_p, rtol=1e-5, atol=1e-5)
    ulp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[case.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=ulp, atol=ulp)


def test_zero_gate_is_exactly_attention_without_prefix():
    case = Case(batch=2, seqlen_q=1, seqlen_k=97, heads_q=8, heads_kv=2, dtype=BF16)
    kw = case.make(requires_grad=False)
    gated = zero_init_attention(**{**kw, "gate": torch.zeros_like(kw["gate"])}, backend="triton")
    plain = zero_init_attention(**{**kw, "prefix_k": kw["prefix_k"][:, :0], "prefix_v": kw["prefix_v"][:, :0]},
                                backend="triton")
    assert torch.equal(gated, plain)


def _layout(batch, seqlen_q, seqlen_k, heads_q, heads_kv, interpreter):
    return Layout(batch=batch, heads_q=heads_q, heads_kv=heads_kv, group=heads_q // heads_kv, seqlen_q=seqlen_q,
                  seqlen_k=seqlen_k, prefix_len=10, head_dim=128, block_d=128, block_p=16, varlen=False,
                  interpreter=interpreter)


def test_split_plan_under_the_interpreter_crosses_chunks():
    # 300 keys: 3 chunks of 128 (4 key tiles each), the last ragged (44 keys); 97 keys: 64 + 33.
    assert decode.split_plan(_layout(2, 1, 300, 8, 2, True), None, 16, 32) == (1, 3, 128)
    assert decode.split_plan(_layout(2, 1, 97, 8, 2, True), None, 16, 32) == (1, 2, 64)
    assert decode.split_plan(_layout(2, 1, 1, 8, 2, True), None, 16, 32) == (1, 1, 32)
    # 16 rows of 4 heads stacked: 64 rows in two 32-row tiles under the interpreter.
    assert decode.split_plan(_layout(1, 16, 300, 8, 2, True), None, 32, 32)[0] == 2


@pytest.mark.parametrize("batch,heads_kv,seqlen_k", [(1, 8, 8192), (1, 32, 2048), (1, 8, 300), (64, 32, 2048),
                                                     (4, 8, 100000)])
def test_split_plan_fills_the_device(batch, heads_kv, seqlen_k):
    sms = 132
    row_tiles, splits, chunk = decode.split_plan(_layout(batch, 1, seqlen_k, 32, heads_kv, False), sms, 16, 64)
    assert row_tiles == 1 and chunk % 64 == 0
    assert (splits - 1) * chunk < seqlen_k <= splits * chunk  # every key in exactly one chunk, none empty
    assert 1 <= splits <= decode.MAX_SPLITS
    if splits > 1:
        assert chunk >= decode.MIN_CHUNK_KEYS
    programs = splits * batch * heads_kv
    enough_keys = seqlen_k >= decode.MIN_CHUNK_KEYS * 2 * sms // (batch * heads_kv)
    if batch * heads_kv < sms and enough_keys:
        assert programs >= sms, f"{programs} programs leave SMs idle"  # batch 1 fills the device
    if batch * heads_kv >= 2 * sms:
        assert splits == 1  # a big batch needs no split


def test_what_takes_the_decode_path():
    assert decode.decode_applies(backend_inputs(Case(batch=1, seqlen_q=16, seqlen_k=40)))
    longer = backend_inputs(Case(batch=1, seqlen_q=17, seqlen_k=40))
    assert "Sq = 17 > 16" in decode.decode_not_supported_reasons(longer)[0]
    packed = backend_inputs(Case(seqlens=[3, 1]))  # packed self-attention: no longer key cache
    assert "max_seqlen_k = 3 <= max_seqlen_q = 3" in decode.decode_not_supported_reasons(packed)[0]
    with pytest.raises(ValueError, match="Sq = 17 > 16 query rows"):
        decode.attention_decode(longer)


def test_prefill_and_packed_batches_keep_the_forward_kernel(decode_calls):
    backend = get_backend("triton")
    backend.forward(backend_inputs(Case(batch=1, seqlen_q=17, seqlen_k=40, heads_q=2, heads_kv=1)))
    backend.forward(backend_inputs(Case(seqlens=[3, 1], heads_q=2, heads_kv=1)))
    assert decode_calls == []
    backend.forward(backend_inputs(Case(batch=1, seqlen_q=2, seqlen_k=40, heads_q=2, heads_kv=1)))
    assert decode_calls == [2]


#: Shared memory a block may opt in to: A100 (sm_80) 163 KB, A10/L4 (sm_86/sm_89) 99 KB, H100 (sm_90) 227 KB
#: (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_90": 232448}


def _check_compiled(rows, archs, shapes=tuple(decode.DECODE_COMPILE_SHAPES)):
    expected = {(k, s, a) for k in ("decode_split", "decode_merge") for s in shapes for a in archs}
    assert {(r["kernel"], r["shape"], r["arch"]) for r in rows} == expected
    for row in rows:
        what = f"{row['kernel']} {row['shape']} [{row['config']}] on {row['arch']}"
        assert row["spill_bytes"] == 0 and row["local_memory_instructions"] == 0, f"{what} spills"
        assert 0 < row["registers"] <= 255, f"{what} uses {row['registers']} registers"
        assert 0 < row["shared_bytes"] <= SHARED_MEMORY_LIMIT[row["arch"]], f"{what}: {row['shared_bytes']} B"
        assert row["tensor_cores"], f"{what}: no tensor-core instructions"  # q·kᵀ, p·v and the prefix


DENSE_SHAPES = tuple(s for s in decode.DECODE_COMPILE_SHAPES if s not in decode.RAGGED_DECODE_SHAPES)


def test_compiled_for_sm80_and_sm90_without_spills():
    """bf16, D = 128, P = 10 at LLaMA-7B heads: every launch compiles, no spills, fits shared memory. The ragged
    steps (a padded cache read up to each row's seqused_k; varlen over packed caches) on sm_90 here, on sm_80
    under -m slow."""
    rows = decode.compile_decode_kernels(("sm_80", "sm_90"), shapes=DENSE_SHAPES)
    _check_compiled(rows, ("sm_80", "sm_90"), DENSE_SHAPES)
    splits = {r["arch"]: int(r["config"].split("splits=")[1]) for r in rows if r["shape"] == "llama7b-Sq1-Hkv8"}
    assert splits["sm_90"] > 1  # batch 1 decode is split over the keys
    ragged = decode.compile_decode_kernels(("sm_90",), shapes=decode.RAGGED_DECODE_SHAPES)
    _check_compiled(ragged, ("sm_90",), decode.RAGGED_DECODE_SHAPES)
    # 8 rows of 8 kv heads: fewer chunks than batch 1 needs to fill the 132 SMs, but still more than one.
    ragged_splits = {int(r["config"].split("splits=")[1]) for r in ragged}
    assert len(ragged_splits) == 1 and 1 < ragged_splits.pop() < splits["sm_90"]


@pytest.mark.slow
def test_ragged_decode_steps_compile_for_sm80_without_spills():
    _check_compiled(decode.compile_decode_kernels(("sm_80",), shapes=decode.RAGGED_DECODE_SHAPES), ("sm_80",),
                    decode.RAGGED_DECODE_SHAPES)


def test_widest_head_dim_fits_the_smallest_shared_memory():
    """bf16, D = 256 on sm_86 (A10, RTX 3090: 99 KB of shared memory per block): no spills, fits."""
    _check_compiled(decode.compile_decode_kernels(("sm_86",), (("bf16", 256, 10),)), ("sm_86",))


def test_compile_report_lists_the_decode_kernels():
    """``python -m fastadapter.kernels.report --decode``: one table row per compiled decode launch, read from the
    cubins (the same rows as :func:`decode.compile_decode_kernels`)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastadapter.kernels.report", "--decode", "--archs", "sm_90"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["kernel", "config", "arch"]
    rows = lines[2:]
    expected = decode.compile_decode_kernels(("sm_90",))
    assert len(rows) == len(expected) and {r.split()[0] for r in rows} == {"decode_split", "decode_merge"}
    for row in rows:
        assert " sm_90 " in row and "MMA" in row, row  # tensor cores (HMMA or HGMMA) in every launch
    assert {r["shape"] for r in expected} == {row.split()[-1] for row in rows}
