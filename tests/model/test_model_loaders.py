"""Checkpoint loaders: llama2.c .bin, Meta consolidated shards, Hugging Face folders (against transformers' own
logits), memory-light loading, and errors that name the file, the tensor and the expected shape."""
import dataclasses
import json
import shutil

import pytest
import torch

from fastadapter import load_model
from fastadapter.adapters import base_model_fingerprint
from fastadapter.loaders import CheckpointError
from fastadapter.model import Llama3RopeScaling, LlamaModel
from fastadapter.adapters.adapter import base_model_description

from tiny_llama import write_llama2c


@pytest.fixture
def config(make_config):
    """The tiny LLaMA on 2 layers."""
    return make_config(n_layers=2)


# -- llama2.c

def test_llama2c_stories260k_config_and_views_of_one_mapping(shared_data):
    model = load_model(shared_data / "stories260K.bin")
    c = model.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_embeddings and model.output is None and not model.training
    # No copy: consecutive layers' wq are adjacent slices of the same memory-mapped file.
    wq0, wq1 = model.layers[0].attention.wq.weight, model.layers[1].attention.wq.weight
    assert wq1.data_ptr() - wq0.data_ptr() == 4 * 64 * 64


@pytest.mark.parametrize("tied", [True, False])
def test_llama2c_random_checkpoint_matches_its_source(tmp_path, tied, config):
    source = LlamaModel(dataclasses.replace(config, tie_embeddings=tied, max_seq_len=64)).eval()
    write_llama2c(tmp_path / "model.bin", source)
    model = load_model(tmp_path / "model.bin")
    assert model.config == source.config
    tokens = torch.randint(0, config.vocab_size, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), source(tokens), rtol=0, atol=0)


def test_llama2c_truncated_and_padded_files(shared_data, tmp_path):
    data = (shared_data / "stories260K.bin").read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[:600_000])
    with pytest.raises(CheckpointError, match=r"truncated.bin: truncated: array 'w2' of shape \[5, 64, 172\]"):
        load_model(truncated)
    header_only = tmp_path / "header.bin"
    header_only.write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="header.bin: truncated: the llama2.c header needs 28 bytes"):
        load_model(header_only)
    padded = tmp_path / "padded.bin"
    padded.write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match="padded.bin: 8 bytes more than the llama2.c layout"):
        load_model(padded)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a checkpoint fastadapter knows"):
        load_model(tmp_path)


# -- Meta

# How Meta's model-parallel layers cut each weight: column-parallel on dim 0, row-parallel on dim 1, the token
# embedding on dim 1 (LLaMA-1/2 ParallelEmbedding) or on dim 0 (LLaMA-3 VocabParallelEmbedding).
_COLUMN_PARALLEL = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_ROW_PARALLEL = ("wo.weight", "w2.weight")


def _write_meta(folder, model: LlamaModel, shards: int, params_extra=None, embedding_dim=1):
    c = model.config
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": -1, "multiple_of": 8, "norm_eps": c.norm_eps, **(params_extra or {})}
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    state = model.state_dict()

    def piece(name, t, s):
        cut = (embedding_dim if name == "tok_embeddings.weight" else 0 if name.endswith(_COLUMN_PARALLEL)
               else 1 if name.endswith(_ROW_PARALLEL) else None)
        return t.clone() if cut is None else t.chunk(shards, dim=cut)[s].clone()

    for s in range(shards):
        shard = {name: piece(name, t, s) for name, t in state.items()}
        shard["rope.freqs"] = torch.zeros(c.head_dim // 2)  # LLaMA-1 files carry this buffer; it is ignored
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    return folder


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_matches_the_model_that_wrote_it(tmp_path, shards, config):
    config = dataclasses.replace(config, rope_theta=50000.0)
    source = LlamaModel(config).eval()
    model = load_model(_write_meta(tmp_path / "meta", source, shards, {"rope_theta": 50000.0}))
    assert model.config == config
    # Shards are merged along the dimension each layer is parallel over: every weight comes back whole.
    for name, p in source.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
    tokens = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), source(tokens), rtol=0, atol=0)


def test_llama3_shards_split_the_embedding_along_the_vocabulary(tmp_path, config):
    scaling = Llama3RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_seq_len=32)
    config = dataclasses.replace(config, vocab_size=98, rope_theta=500000.0, rope_scaling=scaling)
    source = LlamaModel(config).eval()
    params = {"vocab_size": 98, "rope_theta": 500000.0, "use_scaled_rope": True,
              "rope_scaling": {"factor": 4.0, "high_freq_factor": 2.0, "original_max_position_embeddings": 32}}
    folder = _write_meta(tmp_path / "meta", source, 2, params, embedding_dim=0)
    assert torch.load(folder / "consolidated.01.pth")["tok_embeddings.weight"].shape == (49, 80)
    model = load_model(folder)
    assert model.config == config
    assert torch.equal(model.tok_embeddings.weight, source.tok_embeddings.weight)
    tokens = torch.randint(0, 98, (2, 100))  # past the scaled wavelengths
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), source(tokens), rtol=0, atol=0)
    # LLaMA-1's vocab_size -1: the shards tell the vocabulary.
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    assert load_model(folder).config.vocab_size == 98
    # Shapes that fit neither layout.
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": 100}))
    with pytest.raises(CheckpointError, match=r"meta \(2 shards\): tensor 'tok_embeddings.weight' has shapes "
                                              r"\[\[49, 80\], \[49, 80\]\] in consolidated.00.pth, "
                                              r"consolidated.01.pth, expected \[100, 80/2\] each .* or "
                                              r"\[100/2, 80\] each .* vocab_size=100"):
        load_model(folder)


@pytest.mark.parametrize("params, expected", [
    ({"use_scaled_rope": True}, Llama3RopeScaling()),  # LLaMA-3.1: Meta's fixed values
    ({"use_scaled_rope": True, "rope_scaling_factor": 32.0}, Llama3RopeScaling(factor=32.0)),  # LLaMA-3.2 1B/3B
    ({"rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                       "original_max_position_embeddings": 4096}},
     Llama3RopeScaling(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_seq_len=4096)),
    ({"use_scaled_rope": False, "rope_scaling": {"factor": 16.0}}, None),
    ({}, None),
], ids=["use_scaled_rope", "flat-factor", "rope_scaling", "explicitly-off", "none"])
def test_meta_rope_scaling_from_params_json(tmp_path, params, expected, config):
    model = load_model(_write_meta(tmp_path / "meta", LlamaModel(config), 1, {"rope_theta": 500000.0, **params}))
    assert model.config.rope_scaling == expected
    assert model.config.rope_theta == 500000.0


def test_meta_rope_scaling_errors(tmp_path, config):
    folder = _write_meta(tmp_path / "meta", LlamaModel(config), 1, {"rope_scaling": {"factor": 8.0, "beta": 1.0}})
    with pytest.raises(CheckpointError, match=r"params.json: unknown rope_scaling keys \['beta'\]"):
        load_model(folder)
    (folder / "params.json").write_text(json.dumps({"dim": 80, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4,
                                                    "multiple_of": 8, "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(CheckpointError, match="params.json: RoPE scaling type 'yarn' is not supported"):
        load_model(folder)


def test_meta_errors_name_file_tensor_and_shape(tmp_path, config):
    folder = _write_meta(tmp_path / "meta", LlamaModel(config), 2)
    shard = torch.load(folder / "consolidated.01.pth")
    del shard["layers.1.feed_forward.w2.weight"]
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: tensor 'layers.1.feed_forward.w2.weight' is "
                                              r"missing \(expected shape \[80, 72\]"):
        load_model(folder)
    data = (folder / "consolidated.00.pth").read_bytes()
    (folder / "consolidated.00.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot be read .* truncated or corrupt"):
        load_model(folder)


def test_meta_shape_mismatch(tmp_path, config):
    folder = _write_meta(tmp_path / "meta", LlamaModel(config), 1)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_kv_heads": 8}))
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.attention.wk.weight' has shape \[40, 80\], "
                                              r"expected \[80, 80\]"):
        load_model(folder)


# -- Hugging Face

def _hf_model(**overrides):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    kwargs = dict(hidden_size=80, intermediate_size=72, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=97, max_position_embeddings=512)
    return LlamaForCausalLM(HFConfig(**{**kwargs, **overrides})).eval()


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


@pytest.mark.parametrize("overrides, shard", [
    (dict(rope_theta=10000.0), None),  # LLaMA 2 style, one file
    (dict(rope_theta=10000.0), "40KB"),  # sharded with model.safetensors.index.json
    (dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True), None),  # LLaMA 3.2 style
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), None),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "rope_theta": 10000.0}), None),  # attention factor 0.1 ln 4 + 1 on cos and sin
    (dict(head_dim=16), None),  # a head width other than hidden / heads (Mistral-Nemo's 128 for 5120 / 32)
], ids=["llama2", "sharded", "llama3-scaled-tied", "linear-rope", "yarn-rope", "explicit-head-dim"])
def test_hf_folder_gives_transformers_logits(tmp_path, overrides, shard):
    hf = _hf_model(**overrides)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    assert model.config.tie_embeddings == overrides.get("tie_word_embeddings", False)
    assert (model.config.rope_scaling is not None) == ("rope_scaling" in overrides or "rope_parameters" in overrides)
    # The adapter fingerprint reads the embedding, which no loader transforms: HF's own tensor gives the same.
    c = model.config
    assert base_model_description(model)["fingerprint"] == base_model_fingerprint(
        hf.model.embed_tokens.weight, c.n_layers, c.n_heads, c.n_kv_heads)
    tokens = torch.randint(0, 97, (2, 200))  # past the scaled wavelengths of the llama3 case
    with torch.no_grad():
        expected = hf(tokens).logits
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_hf_errors_name_file_tensor_and_shape(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "truncated")

    shutil.copytree(tmp_path / "good", tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'layers.0.feed_forward.w1.weight' has "
                                              r"shape \[72, 80\], expected \[96, 80\]"):
        load_model(tmp_path / "wide")

    (tmp_path / "good" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        load_model(tmp_path / "good")


def test_dtype_conversion(shared_data):
    model = load_model(shared_data / "stories260K.bin", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(torch.tensor([[1, 403, 407]]))
    assert logits.dtype == torch.bfloat16


@pytest.mark.parametrize("index, message", [
    ("{not json", "model.safetensors.index.json: not valid JSON"),
    ('{"metadata": {}}', "model.safetensors.index.json: no 'weight_map' object"),
    ('{"weight_map": ["model.safetensors"]}', "'weight_map' must map tensor names to shard file names"),
    ('{"weight_map": {"lm_head.weight": "../outside.safetensors"}}',
     "shard '../outside.safetensors' is not a file of the model folder"),
    ('{"weight_map": {"lm_head.weight": "/etc/outside.safetensors"}}',
     "shard '/etc/outside.safetensors' is not a file of the model folder"),
], ids=["not-json", "no-weight-map", "weight-map-list", "dot-dot", "absolute"])
def test_hf_shard_index_is_checked(tmp_path, index, message):
    """A malformed index is a CheckpointError naming it (it was a JSONDecodeError / KeyError traceback), and a
    shard outside the model folder is refused (it was loaded from wherever ``../`` pointed)."""
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "model")
    # A real shard outside the folder: the old loader read it.
    shutil.copy(tmp_path / "model" / "model.safetensors", tmp_path / "outside.safetensors")
    (tmp_path / "model" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_model(tmp_path / "model")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_weights_are_refused_at_load(tmp_path, value, config):
    source = LlamaModel(config).eval()
    with torch.no_grad():
        source.layers[1].feed_forward.w2.weight[3, 5] = value
    write_llama2c(tmp_path / "model.bin", source)
    with pytest.raises(CheckpointError, match=r"model.bin: tensor 'layers.1.feed_forward.w2.weight' holds NaN or "
                                              r"infinite values"):
        load_model(tmp_path / "model.bin")


def test_all_finite_checks_every_slice():
    from fastadapter.loaders.weights import all_finite

    weight = torch.zeros(7, 13)
    assert all_finite(weight, chunk_elements=10)
    weight[6, 12] = float("nan")  # the very last value, in the last (short) slice
    assert not all_finite(weight, chunk_elements=10)
    assert not all_finite(weight.t(), chunk_elements=10)  # non-contiguous
    assert all_finite(torch.zeros(0, 4)) and all_finite(torch.arange(5))


def _hf_family_model(family: str, **overrides):
    """A tiny random Hugging Face model of ``family`` (head dim 10, GQA, vocab 97)."""
    import transformers
    config_class, model_class = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    kwargs = dict(hidden_size=80, intermediate_size=72, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=97, max_position_embeddings=512)
    config = getattr(transformers, config_class)(**{**kwargs, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random biases: zero biases would not show a loader that drops or misplaces them
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family, overrides, max_seq_len", [
    ("mistral", dict(sliding_window=None), 512),
    ("mistral", dict(sliding_window=300), 300),  # the window caps max_seq_len: runs within it are exact
    ("qwen2", dict(tie_word_embeddings=True), 512),  # q/k/v biases, tied output as Qwen2-0.5B
    ("qwen2", dict(use_sliding_window=True, sliding_window=256, max_window_layers=0), 256),
], ids=["mistral", "mistral-window", "qwen2-tied", "qwen2-window"])
def test_hf_families_give_transformers_logits(tmp_path, family, overrides, max_seq_len):
    hf = _hf_family_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.qkv_bias == (family == "qwen2")
    assert model.config.max_seq_len == max_seq_len
    tokens = torch.randint(0, 97, (2, 200))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_hf_unknown_family_names_the_supported_ones(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(CheckpointError, match="model_type is 'phi3'; fastadapter loads llama, mistral, qwen2, qwen3, "
                                              "gemma2, gemma3_text, olmo, smollm3 models"):
        load_model(tmp_path)


def test_qwen2_missing_bias_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    _hf_family_model("qwen2").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'layers.1.attention.wk.bias' is missing \(expected shape "
                                              r"\[40\]\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("parameters", [
    {"rope_type": "linear", "factor": 8.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2,
     "truncate": False},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.707},  # DeepSeek's attention factor from mscale / mscale_all_dim
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "attention_factor": 1.3},
], ids=["linear", "yarn", "yarn-betas-untruncated", "yarn-mscale", "yarn-attention-factor"])
def test_rope_scalings_equal_transformers_rope_init(tmp_path, parameters):
    """The inverse frequencies and cos/sin factor read from a config.json equal those of transformers' own
    ``ROPE_INIT_FUNCTIONS`` for the same config."""
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fastadapter.loaders.load_hf import read_hf_config
    from fastadapter.model.rope import rope_attention_factor, rope_inverse_frequencies

    hf_config = HFConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=16384,
                         rope_parameters={**parameters, "rope_theta": 50000.0})
    hf_config.save_pretrained(tmp_path)
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](hf_config)
    config = read_hf_config(str(tmp_path))
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=1e-6, atol=0)
    assert rope_attention_factor(config.rope_scaling) == pytest.approx(expected_factor, rel=1e-12)
    assert not torch.allclose(inv_freq, rope_inverse_frequencies(config.head_dim, config.rope_theta))  # scaled
