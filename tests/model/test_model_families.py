"""Qwen3, Gemma2, Gemma3 (text), Olmo and SmolLM3 folders in the thin model: tiny random models built from each
family's transformers config (its distinguishing features on, see ``hf_folders.FAMILY_FEATURES``), saved with
``save_pretrained`` and loaded with ``fastadapter.load_model``, compute transformers' logits batched and packed,
generate what transformers generates greedily, start as the base model when adapted, and compute with an
adapter what the transformers integration computes with the same adapter file. Unsupported features are refused
by name."""
import json

import pytest
import torch

from fastadapter import load_model
from fastadapter.model import CheckpointError, generate
from fastadapter.model.adapter import AdapterConfig, adapted_layers, add_adapter, save_adapter

from hf_folders import FAMILY_CLASSES, tiny_family_model

FAMILIES = sorted(FAMILY_CLASSES)


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request, tmp_path_factory):
    """``(family, transformers model, folder)``: the model saved in the folder."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = tiny_family_model(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_family_config_reads_the_features(family_pair):
    family, _, folder = family_pair
    config = load_model(folder).config
    expected = {
        "qwen3": dict(explicit_head_dim=24, qk_norm=True, max_seq_len=256),
        "gemma2": dict(explicit_head_dim=24, norm="rmsnorm_plus_one", sandwich_norms=True, mlp_activation="gelu_tanh",
                       scale_embeddings=True, attention_scale=20 ** -0.5, final_logit_softcap=30.0, max_seq_len=64,
                       tie_embeddings=True),
        "gemma3_text": dict(explicit_head_dim=24, qk_norm=True, sandwich_norms=True, final_logit_softcap=None,
                            rope_theta=1e6, local_rope_theta=1e4, local_rope_layers=(0, 2), max_seq_len=64),
        "olmo": dict(norm="layernorm_no_params", clip_qkv=0.5, norm_eps=1e-5, max_seq_len=256),
        "smollm3": dict(layers_without_rope=(1,), max_seq_len=256),
    }[family]
    assert {key: getattr(config, key) for key in expected} == expected
    if family == "gemma3_text":
        assert config.rope_scaling.factor == 4.0


def test_family_logits_equal_transformers(family_pair):
    _, hf, folder = family_pair
    model = load_model(folder)
    tokens = torch.randint(0, 97, (2, 60))  # within the 64-token window of the Gemma models
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=2e-5)


def test_family_packed_sequences_equal_separate_calls(family_pair):
    _, hf, folder = family_pair
    model = load_model(folder)
    first, second = torch.randint(0, 97, (1, 23)), torch.randint(0, 97, (1, 37))
    cu_seqlens = torch.tensor([0, 23, 60], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat([first, second], dim=1), cu_seqlens=cu_seqlens)
        expected = torch.cat([hf(first).logits, hf(second).logits], dim=1)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=2e-5)


def test_family_cached_generation_equals_transformers_greedy(family_pair):
    _, hf, folder = family_pair
    model = load_model(folder)
    prompts = [torch.randint(3, 97, (7,)).tolist(), torch.randint(3, 97, (12,)).tolist()]
    ours = generate(model, prompts, max_new_tokens=6)  # both rows in one batch, KV cache of different lengths
    for prompt, tokens in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


def test_family_adapter_starts_as_the_base_and_matches_the_transformers_integration(family_pair, tmp_path):
    from fastadapter.integrations.transformers import load_adapter as hf_load_adapter, remove_adapter

    _, hf, folder = family_pair
    model = load_model(folder)
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        base = model(tokens)
        add_adapter(model, AdapterConfig(prompt_len=3, layers=2))
        torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)  # zero gates: exactly the base model
        for adapter in adapted_layers(model).values():
            adapter.gate.normal_(0, 1)
        adapted = model(tokens)
    assert (adapted - base).abs().max() > 1e-2  # the prompt now changes the output: the check below is not vacuous
    save_adapter(model, tmp_path / "adapter.safetensors")
    # The same file in the Hugging Face model, adapted by the integration (q/k norms on the prompt's keys, the
    # clamp on its keys and values, exactly as the thin model).
    hf_load_adapter(hf, tmp_path / "adapter.safetensors")
    try:
        with torch.no_grad():
            torch.testing.assert_close(adapted, hf(tokens).logits, rtol=1e-5, atol=2e-5)
    finally:
        remove_adapter(hf)


@pytest.mark.parametrize("family, overrides, max_seq_len", [
    ("qwen3", dict(use_sliding_window=True, sliding_window=48, max_window_layers=1), 48),  # layers 1 and 2 slide
    ("smollm3", dict(use_sliding_window=True, sliding_window=48), 48),  # its NoPE layer slides
    ("smollm3", dict(sliding_window=48), 256),  # a window without use_sliding_window: every layer attends fully
    ("gemma2", dict(sliding_window=100, layer_types=["full_attention"] * 3), 256),  # no sliding layer
], ids=["qwen3-window", "smollm3-window", "smollm3-window-off", "gemma2-no-sliding-layer"])
def test_sliding_windows_cap_max_seq_len(tmp_path, family, overrides, max_seq_len):
    """Sequences no longer than the window see their whole past, so the loader caps max_seq_len at the window of
    a model with sliding layers, and full causal attention then equals transformers' windowed attention."""
    hf = tiny_family_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.max_seq_len == max_seq_len
    tokens = torch.randint(0, 97, (2, min(max_seq_len, 60)))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=2e-5)


def _edited_folder(tmp_path, family, **config_changes):
    folder = tmp_path / family
    tiny_family_model(family).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.parametrize("family, changes, message", [
    ("gemma2", dict(attn_logit_softcapping=50.0),
     "attn_logit_softcapping=50.0 is not supported: the fused zero-init attention has no soft-capping of the "
     "attention scores"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True is not supported: the thin model's projections have no "
                                         "bias"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True is not supported: "
                                                            "fastadapter's attention is causal"),
    ("olmo", dict(hidden_act="gelu"), "hidden activation 'gelu' is not supported for olmo (expected 'silu')"),
    ("gemma3_text", dict(model_type="gemma3"), "a multimodal Gemma3 config (model_type 'gemma3') needs a "
                                               "'text_config' object"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 1e4}}),
     "a scaled RoPE on Gemma3's sliding layers is not supported"),
    ("smollm3", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "RoPE type 'dynamic' is not supported (fastadapter knows 'default', 'llama3', 'linear' and 'yarn')"),
], ids=["gemma2-attention-softcap", "qwen3-attention-bias", "gemma3-bidirectional", "olmo-gelu",
        "gemma3-no-text-config", "gemma3-scaled-local-rope", "dynamic-rope"])
def test_unsupported_features_are_refused_by_name(tmp_path, family, changes, message):
    folder = _edited_folder(tmp_path, family, **changes)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(folder)


def test_multimodal_gemma3_folder_loads_its_language_model(tmp_path):
    """Gemma3 4B+ ship as Gemma3ForConditionalGeneration (``model_type`` gemma3): its language model loads from
    ``text_config`` and the ``language_model.`` tensors, and computes the multimodal model's text-only logits."""
    import transformers

    text = tiny_family_model("gemma3_text", vocab_size=300).config.to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=297, eoi_token_index=298, image_token_index=299)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # weights at a scale where a misplaced one shows (see tiny_family_model)
        for name, parameter in hf.model.language_model.named_parameters():
            parameter.normal_(0, 0.5 if parameter.dim() == 1 else 1 if "embed" in name else parameter.shape[1] ** -0.5)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    model = load_model(tmp_path)
    assert model.config.local_rope_layers == (0, 2) and model.config.rope_scaling.factor == 4.0
    tokens = torch.randint(0, 297, (2, 50))  # text tokens only
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=1e-5, atol=2e-5)


def test_gemma3_4b_config_json_with_a_partial_text_config(tmp_path):
    """Google's Gemma3-4B config.json lists only what differs from Gemma3TextConfig's defaults in its text_config:
    the rest (heads, head width, vocabulary, RoPE bases, window pattern) comes from those defaults."""
    from fastadapter.model.load_hf import read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}}))
    config = read_hf_config(str(tmp_path))
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim, config.vocab_size) == \
        (2560, 34, 8, 4, 256, 262_208)
    assert config.max_seq_len == 1024  # the window
    assert (config.rope_theta, config.rope_scaling.factor, config.local_rope_theta) == (1e6, 8.0, 1e4)
    assert config.local_rope_layers == tuple(i for i in range(34) if (i + 1) % 6)  # five of every six layers
    assert config.attention_scale == 256 ** -0.5 and config.tie_embeddings and config.final_logit_softcap is None


def test_v2_is_refused_on_norms_other_than_rmsnorm(tmp_path):
    from fastadapter.model.adapter_v2 import add_adapter_v2

    tiny_family_model("gemma2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this model's norms are 'rmsnorm_plus_one'.*use LLaMA-Adapter V1"):
        add_adapter_v2(load_model(tmp_path), AdapterConfig(prompt_len=2, layers=1))
