"""The adapter file format: round trip, atomic writes, the fingerprint, and clear errors for bad files."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fastadapter.adapters.adapter_file import (METADATA_KEY, V2_METADATA_KEY, AdapterFileError, adapter_file_kind,
                                            base_model_fingerprint, exact_base_model_fingerprint,
                                            fingerprint_matches, read_adapter_file, write_adapter_file)

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 16, 3, 4, 2, 40
CONFIG = {"prompt_len": 3, "layers": [1, 2], "gate_activation": "tanh", "gate_per_head": True}


def _base_model(embedding=None):
    embedding = torch.randn(VOCAB, DIM) if embedding is None else embedding
    return {"fingerprint": base_model_fingerprint(embedding, N_LAYERS, N_HEADS, N_KV_HEADS), "dim": DIM,
            "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS, "vocab_size": VOCAB}


def _tensors():
    return {f"layers.{i}.adapter_{part}": torch.randn(*shape)
            for i in (1, 2) for part, shape in (("prompt", (3, DIM)), ("gate", (N_HEADS,)))}


def test_round_trip_keeps_tensors_and_description(tmp_path):
    path = tmp_path / "adapter.safetensors"
    tensors, base = _tensors(), _base_model()
    tensors["layers.1.adapter_prompt"] = tensors["layers.1.adapter_prompt"].to(torch.bfloat16).t().contiguous().t()
    write_adapter_file(path, tensors, {**CONFIG, "layers": (1, 2)}, base)
    read, meta = read_adapter_file(path)
    assert meta == {"format_version": 1, "config": CONFIG, "base_model": base}
    assert set(read) == set(tensors)
    for name, t in tensors.items():
        assert read[name].dtype == torch.float32
        torch.testing.assert_close(read[name], t.float(), rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # the temporary file was renamed, not left behind


def test_write_replaces_atomically_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "adapter.safetensors"
    write_adapter_file(path, _tensors(), CONFIG, _base_model())
    before = path.read_bytes()
    bad = _tensors()
    bad["layers.2.adapter_gate"] = torch.zeros(N_HEADS + 1)
    with pytest.raises(AdapterFileError, match=r"layers\.2\.adapter_gate.*\[5\].*expected \[4\]"):
        write_adapter_file(path, bad, CONFIG, _base_model())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_fingerprint_depends_on_dims_and_embedding_not_on_dtype():
    embedding = torch.randn(VOCAB, DIM)
    fp = base_model_fingerprint(embedding, N_LAYERS, N_HEADS, N_KV_HEADS)
    assert len(fp) == 64
    assert base_model_fingerprint(embedding.clone(), N_LAYERS, N_HEADS, N_KV_HEADS) == fp
    assert base_model_fingerprint(embedding, N_LAYERS + 1, N_HEADS, N_KV_HEADS) != fp
    changed = embedding.clone()
    changed[VOCAB - 1, 0] += 1
    assert base_model_fingerprint(changed, N_LAYERS, N_HEADS, N_KV_HEADS) != fp
    changed = embedding.clone()
    changed[5] += 1  # a row the fingerprint does not read: still the same model as far as it can tell
    assert base_model_fingerprint(changed, N_LAYERS, N_HEADS, N_KV_HEADS) == fp
    exact_bf16 = embedding.to(torch.bfloat16)
    assert (base_model_fingerprint(exact_bf16, N_LAYERS, N_HEADS, N_KV_HEADS)
            == base_model_fingerprint(exact_bf16.float(), N_LAYERS, N_HEADS, N_KV_HEADS))
    # The model in bf16, rounded from the fp32 weights, is the same model (values that bf16 does not hold exactly).
    assert not torch.equal(exact_bf16.float(), embedding)
    assert base_model_fingerprint(exact_bf16, N_LAYERS, N_HEADS, N_KV_HEADS) == fp
    # The exact rows' fingerprint tells the two apart; a check accepts either for the model at hand.
    exact = exact_base_model_fingerprint(embedding, N_LAYERS, N_HEADS, N_KV_HEADS)
    assert exact != fp and exact != exact_base_model_fingerprint(exact_bf16, N_LAYERS, N_HEADS, N_KV_HEADS)
    description = {"fingerprint": fp, "exact_fingerprint": exact}
    assert fingerprint_matches(fp, description) and fingerprint_matches(exact, description)
    assert not fingerprint_matches("0" * 64, description)
    with pytest.raises(ValueError, match="meta device"):
        base_model_fingerprint(torch.empty(VOCAB, DIM, device="meta"), N_LAYERS, N_HEADS, N_KV_HEADS)


def test_llama_7b_defaults_fit_in_5_mb(tmp_path):
    layers = list(range(2, 32))
    tensors = {}
    for i in layers:
        tensors[f"layers.{i}.adapter_prompt"] = torch.zeros(10, 4096)
        tensors[f"layers.{i}.adapter_gate"] = torch.zeros(32)
    base = {"fingerprint": "0" * 64, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32,
            "vocab_size": 32000}
    path = tmp_path / "llama7b.safetensors"
    write_adapter_file(path, tensors, {**CONFIG, "prompt_len": 10, "layers": layers}, base)
    assert sum(t.numel() for t in tensors.values()) == 1_229_760
    assert path.stat().st_size <= 5 * 1024 * 1024


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        read_adapter_file(tmp_path / "nothere.safetensors")


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    write_adapter_file(good, _tensors(), CONFIG, _base_model())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(AdapterFileError, match="truncated.safetensors"):
        read_adapter_file(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 100)
    with pytest.raises(AdapterFileError, match="garbage.safetensors: not a readable safetensors"):
        read_adapter_file(garbage)


def _write_raw(path, tensors, description):
    metadata = None if description is None else {METADATA_KEY: description}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, d: (t, None), "no 'fastadapter' metadata"),
    (lambda t, d: (t, "{not json"), "not valid JSON"),
    (lambda t, d: (t, json.dumps({**d, "format_version": 7})), "format_version 7 is not supported"),
    (lambda t, d: ({**t, "layers.1.adapter_prompt": torch.zeros(3, DIM + 1)}, json.dumps(d)),
     r"'layers\.1\.adapter_prompt' has shape \[3, 17\], expected \[3, 16\]"),
    (lambda t, d: ({k: v for k, v in t.items() if k != "layers.2.adapter_gate"}, json.dumps(d)),
     r"'layers\.2\.adapter_gate' is missing \(expected shape \[4\]\)"),
    (lambda t, d: ({**t, "layers.2.adapter_gate": torch.zeros(N_HEADS, dtype=torch.float64)}, json.dumps(d)),
     "float64, expected torch.float32"),
    (lambda t, d: (t, json.dumps({**d, "config": {**d["config"], "layers": [1, 7]}})),
     "adapted layer 7 does not exist"),
])
def test_bad_contents_are_explained(tmp_path, mutate, message):
    description = {"format_version": 1, "config": CONFIG, "base_model": _base_model()}
    tensors, raw = mutate(_tensors(), description)
    path = tmp_path / "bad.safetensors"
    _write_raw(path, tensors, raw)
    with pytest.raises(AdapterFileError, match=message) as info:
        read_adapter_file(path)
    assert "bad.safetensors" in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_tensor_is_refused_at_read(tmp_path, value):
    """An adapter whose gate held NaN loaded and generated an empty continuation without a word."""
    path = tmp_path / "adapter.safetensors"
    tensors = _tensors()
    tensors["layers.2.adapter_gate"][1] = value
    write_adapter_file(path, tensors, CONFIG, _base_model())
    with pytest.raises(AdapterFileError, match="tensor 'layers.2.adapter_gate' holds NaN or infinite values"):
        read_adapter_file(path)


def test_a_non_finite_foreign_adapter_is_refused_at_load(tmp_path, make_config):
    """The check holds for adapters of other projects too (a litgpt checkpoint here), read through load_adapter."""
    from fastadapter import LlamaModel, load_adapter
    model = LlamaModel(make_config(dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS,
                                   vocab_size=VOCAB, hidden_dim=24, max_seq_len=32))
    state = {f"transformer.h.{i}.attn.adapter_wte.weight": torch.randn(3, DIM) for i in (1, 2)}
    state.update({f"transformer.h.{i}.attn.gating_factor": torch.zeros(1, 1, N_HEADS, 1) for i in (1, 2)})
    state["transformer.h.1.attn.gating_factor"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "litgpt.pth")
    with pytest.raises(AdapterFileError, match="holds NaN or infinite values"):
        load_adapter(model, tmp_path / "litgpt.pth")


def test_the_base_model_family_is_recorded_and_optional(tmp_path):
    """``family`` names the base model's Hugging Face model_type (export --to peft reads it); files without it, as
    written before it existed, still read."""
    path = tmp_path / "adapter.safetensors"
    write_adapter_file(path, _tensors(), CONFIG, {**_base_model(), "family": "qwen2"})
    assert read_adapter_file(path)[1]["base_model"]["family"] == "qwen2"
    write_adapter_file(path, _tensors(), CONFIG, _base_model())
    assert "family" not in read_adapter_file(path)[1]["base_model"]


def test_the_kind_of_an_adapter_file_is_decided_in_one_place(tmp_path):
    """generate, eval and export ask :func:`adapter_file_kind`; it reads the metadata only."""
    v1, multimodal = tmp_path / "v1.safetensors", tmp_path / "mm.safetensors"
    write_adapter_file(v1, _tensors(), CONFIG, _base_model())
    write_adapter_file(multimodal, {**_tensors(), "vision.proj": torch.randn(2, DIM)}, CONFIG, _base_model(),
                       vision={"tower": "clip"})
    v2 = tmp_path / "v2.safetensors"
    save_file({"x": torch.zeros(1)}, str(v2), metadata={V2_METADATA_KEY: "{}"})
    foreign = tmp_path / "peft.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    bad_json = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad_json), metadata={METADATA_KEY: "{not json"})
    not_safetensors = tmp_path / "adapter.pth"
    torch.save({"x": torch.zeros(1)}, not_safetensors)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert [adapter_file_kind(p) for p in (v1, multimodal, v2, foreign, bad_json, not_safetensors, garbage,
                                           tmp_path, tmp_path / "missing.safetensors")] == \
        ["v1", "multimodal", "v2", "other", "v1", "other", "other", "other", "other"]
    with pytest.raises(AdapterFileError, match="not valid JSON"):  # "v1": its reader names what is wrong
        read_adapter_file(bad_json)
