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
from fastadapter.loaders import CheckpointError
from fastadapter.model import generate
from fastadapter.adapters.adapter import AdapterConfig, adapted_layers, add_adapter, save_adapter

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
    from fastadapter.loaders.load_hf import read_hf_config

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
    from fastadapter.adapters.adapter_v2 import add_adapter_v2

    tiny_family_model("gemma2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this model's norms are 'rmsnorm_plus_one'.*use LLaMA-Adapter V1"):
        add_adapter_v2(load_model(tmp_path), AdapterConfig(prompt_len=2, layers=1))


# -- issue 24: silent wrong results ----------------------------------------------------------------------------


def test_a_sequence_longer_than_the_sliding_window_is_refused(tmp_path):
    """A Mistral with window 16 ran full attention over 24 tokens: logits 0.125 off transformers' from position 17
    on, without a word. Up to the window it equals transformers' MistralForCausalLM; past it, it is refused
    (batched, packed and with a KV cache)."""
    hf = _plain_hf("mistral", sliding_window=16)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.sliding_window == 16 and model.config.max_seq_len == 16
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, :16]), hf(tokens[:, :16]).logits, rtol=1e-5, atol=2e-5)
        with pytest.raises(ValueError, match="24 tokens is longer than the model's sliding attention window "
                                             r"\(16 tokens\)"):
            model(tokens)
        packed = tokens.reshape(1, -1)[:, :40]
        with pytest.raises(ValueError, match="sliding attention window"):
            model(packed, cu_seqlens=torch.tensor([0, 7, 40], dtype=torch.int32))
        separate = model(packed[:, :7])  # short packed sequences still run
        torch.testing.assert_close(model(packed[:, :23], cu_seqlens=torch.tensor([0, 7, 23], dtype=torch.int32))[:, :7],
                                   separate, rtol=1e-5, atol=2e-5)


#: transformers' classes of the families that tiny_family_model leaves out (plain LLaMA pattern).
_PLAIN_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def _plain_hf(family, **overrides):
    """A random 2-layer ``family`` model of :data:`_PLAIN_CLASSES` (hidden 64, 4 query / 2 kv heads, vocab 97),
    weights at scales where they matter, in eval mode."""
    import transformers
    config_class, model_class = _PLAIN_CLASSES[family]
    config = getattr(transformers, config_class)(**{**dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=256), **overrides})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0, 0.5 if parameter.dim() == 1 else 1 if "embed" in name else parameter.shape[1] ** -0.5)
    return model


def _hf_config_folder(tmp_path, family="llama", **changes):
    """A random ``family`` model saved in ``tmp_path``, its config.json then updated with ``changes``."""
    _plain_hf(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    return tmp_path


def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(tmp_path):
    """``rope_scaling: {rope_type: dynamic}`` beside ``rope_parameters: {rope_type: default}`` ran plain RoPE;
    transformers reads the dynamic scaling. Now the loader reads what transformers reads: dynamic is refused by
    name, and a linear scaling there gives transformers' logits."""
    import transformers
    from fastadapter.model.config import LinearRopeScaling
    dynamic = _hf_config_folder(tmp_path / "dynamic", rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert transformers.AutoConfig.from_pretrained(dynamic).rope_parameters["rope_type"] == "dynamic"
    with pytest.raises(CheckpointError, match="RoPE type 'dynamic' is not supported"):
        load_model(dynamic)
    linear = _hf_config_folder(tmp_path / "linear", rope_scaling={"rope_type": "linear", "factor": 4.0},
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = transformers.AutoModelForCausalLM.from_pretrained(linear).eval()
    assert hf.config.rope_parameters["rope_type"] == "linear"
    model = load_model(linear)
    assert model.config.rope_scaling == LinearRopeScaling(factor=4.0)
    tokens = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=2e-5)


def test_integer_weights_are_refused_by_every_loader_path(tmp_path, capsys):
    """A folder of int8 weights loaded through the CLI (cast to fp32) while load_model refused it. Now every path
    refuses it with the reason: load_model with and without a dtype, and the CLI (one line, exit 2)."""
    from safetensors.torch import load_file, save_file
    from fastadapter.cli import main as cli_main
    folder = _hf_config_folder(tmp_path / "int8")
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors = {k: (v * 10).to(torch.int8) if k.endswith("q_proj.weight") else v for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    for dtype in (None, torch.float32):
        with pytest.raises(CheckpointError, match="tensor 'layers.0.attention.wq.weight' is torch.int8; weights must be "
                                                      "floating point"):
            load_model(folder, dtype=dtype)
    (folder / "tokenizer.json").write_text("{}")  # never read: the model is refused first
    assert cli_main(["generate", "--model", str(folder), "--tokenizer", str(folder / "tokenizer.json"),
                     "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is torch.int8; weights must be floating point" in err


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path):
    """A config.json holding a list raised AttributeError ('list' object has no attribute 'get')."""
    folder = _hf_config_folder(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object of settings .* got a list"):
        load_model(folder)


def test_remove_adapter_restores_the_requires_grad_apply_found(tmp_path):
    """remove_adapter left every base parameter frozen: a model fine-tuned afterwards trained nothing."""
    from fastadapter.integrations.transformers import apply_adapter, remove_adapter
    hf = _plain_hf("llama")
    hf.lm_head.requires_grad_(False)  # a state of the user's own: kept as apply_adapter found it
    found = {name: p.requires_grad for name, p in hf.named_parameters()}
    assert any(found.values()) and not all(found.values())
    apply_adapter(hf, prompt_len=3, layers=2)
    assert not any(p.requires_grad for name, p in hf.named_parameters() if "adapter" not in name)
    apply_adapter(hf, prompt_len=3, layers=1)  # applied twice: the state before the first is the one restored
    remove_adapter(hf)
    assert {name: p.requires_grad for name, p in hf.named_parameters()} == found


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_export_to_peft_refuses_a_family_peft_cannot_load(tmp_path, family):
    """export --to peft wrote a folder for a Qwen2 base that PEFT then rejected ("Unsupported model type for
    adaption prompt: 'qwen2'"). The adapter file records the base's family; the export is refused with the reason
    and the formats that work, and litgpt / v1 still export."""
    from fastadapter.adapters.adapter_export import export_adapter
    from fastadapter.adapters.adapter_file import AdapterFileError, read_adapter_file
    hf = _plain_hf(family) if family in _PLAIN_CLASSES else tiny_family_model(family)
    hf.save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2, gate_activation="none", gate_per_head=False))
    save_adapter(model, tmp_path / "adapter.safetensors")
    assert read_adapter_file(tmp_path / "adapter.safetensors")[1]["base_model"]["family"] == family
    with pytest.raises(AdapterFileError, match=f"a '{family}' model, and PEFT's adaption prompt loads only llama and "
                                               f"mistral models.*export to litgpt or to v1"):
        export_adapter(str(tmp_path / "adapter.safetensors"), str(tmp_path / "peft"), "peft")
    assert not (tmp_path / "peft").exists()
    assert export_adapter(str(tmp_path / "adapter.safetensors"), str(tmp_path / "a.pth"), "litgpt")


def test_export_to_peft_of_a_mistral_adapter_loads_in_peft(tmp_path):
    """The families PEFT adapts still export, and PEFT loads the folder."""
    import peft
    from fastadapter.adapters.adapter_export import export_adapter
    hf = _plain_hf("mistral")
    hf.save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2, gate_activation="none", gate_per_head=False))
    save_adapter(model, tmp_path / "adapter.safetensors")
    export_adapter(str(tmp_path / "adapter.safetensors"), str(tmp_path / "peft"), "peft")
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "peft")
    assert loaded.peft_config["default"].adapter_len == 3
