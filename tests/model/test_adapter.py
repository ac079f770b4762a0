"""save_adapter / load_adapter: round trip, refusal of another base model, and adapters of other projects
(original LLaMA-Adapter v1, PEFT adaption_prompt, litgpt) giving the same logits."""
import json

import pytest
import torch
from safetensors.torch import save_file

from fastadapter import AdapterConfig, add_adapter, load_adapter, load_model, save_adapter
from fastadapter.adapters import AdapterFileError, adapted_layers
from fastadapter.model import LlamaModel
from fastadapter.adapters.adapter_formats import read_foreign_adapter


@pytest.fixture
def deep_config(make_config):
    """As deep as LLaMA-7B (32 layers, the paper adapts the top 30), but narrow: width 16, 2 query heads over 1 kv
    head, FFN 24."""
    return make_config(dim=16, n_layers=32, n_heads=2, n_kv_heads=1, hidden_dim=24)


def _trained(model, **config):
    """``model`` with an adapter whose prompts and gates look trained (non-zero gates)."""
    add_adapter(model, AdapterConfig(**{"prompt_len": 5, "layers": 3, **config}))
    with torch.no_grad():
        for adapter in adapted_layers(model).values():
            adapter.gate.uniform_(-0.8, 0.8)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture
def tokens(tiny_config):
    return torch.randint(0, tiny_config.vocab_size, (2, 19))


def test_round_trip_restores_the_same_logits(tmp_path, tokens, tiny_config):
    torch.manual_seed(1)
    base_state = LlamaModel(tiny_config).state_dict()
    trained = LlamaModel(tiny_config)
    trained.load_state_dict(base_state)
    _trained(trained, layers=[1, 3], gate_per_head=False, gate_activation="none")
    save_adapter(trained, tmp_path / "a.safetensors")
    fresh = LlamaModel(tiny_config)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert list(adapted_layers(fresh)) == [1, 3]
    assert fresh.adapter_config == AdapterConfig(prompt_len=5, layers=[1, 3], gate_activation="none",
                                                 gate_per_head=False)
    assert torch.equal(_logits(fresh, tokens), _logits(trained, tokens))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        "layers.1.attention.adapter.prompt", "layers.1.attention.adapter.gate",
        "layers.3.attention.adapter.prompt", "layers.3.attention.adapter.gate"]


def test_an_adapter_trained_in_bf16_loads_into_the_fp32_model_and_back(tmp_path, tiny_config):
    """The fingerprint is the same for a model in fp32 and in bf16 (rounded from the same weights): `fastadapter
    train --dtype bf16` then `fastadapter generate` (fp32 on a CPU) refused the adapter as made for another base
    model. A file that hashes the exact embedding rows still loads into the model it was made from."""
    from fastadapter.adapters import adapter_file
    torch.manual_seed(1)
    fp32 = LlamaModel(tiny_config)
    bf16 = LlamaModel(tiny_config)
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    save_adapter(_trained(bf16), tmp_path / "bf16.safetensors")
    load_adapter(fp32, tmp_path / "bf16.safetensors")
    assert torch.equal(adapted_layers(fp32)[1].prompt.detach(), adapted_layers(bf16)[1].prompt.detach().float())
    save_adapter(fp32, tmp_path / "fp32.safetensors")
    load_adapter(bf16, tmp_path / "fp32.safetensors")
    # A file holding the exact rows' fingerprint: loads into that model, not into the other dtype's.
    tensors, meta = adapter_file.read_adapter_file(tmp_path / "fp32.safetensors")
    c = tiny_config
    meta["base_model"]["fingerprint"] = adapter_file.exact_base_model_fingerprint(
        fp32.tok_embeddings.weight, c.n_layers, c.n_heads, c.n_kv_heads)
    adapter_file.write_adapter_file(tmp_path / "exact.safetensors", tensors, meta["config"], meta["base_model"])
    load_adapter(fp32, tmp_path / "exact.safetensors")
    with pytest.raises(AdapterFileError, match="another base model of the same shape"):
        load_adapter(bf16, tmp_path / "exact.safetensors")


def test_adapter_of_another_base_model_is_refused(tmp_path, make_config, tiny_config):
    path = tmp_path / "a.safetensors"
    save_adapter(_trained(LlamaModel(tiny_config)), path)
    with pytest.raises(AdapterFileError, match=r"a.safetensors: this adapter was made for another base model "
                                               r"of the same shape \(fingerprint"):
        load_adapter(LlamaModel(tiny_config), path)
    other_shape = LlamaModel(make_config(n_kv_heads=2))
    with pytest.raises(AdapterFileError, match="a.safetensors: .* base model with n_kv_heads=4, but the model "
                                               "has n_kv_heads=2"):
        load_adapter(other_shape, path)


def test_save_without_adapter_and_unknown_files(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="no adapter to save"):
        save_adapter(LlamaModel(tiny_config), tmp_path / "a.safetensors")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"some.weight": torch.zeros(2)}, unknown)
    with pytest.raises(AdapterFileError, match="unknown.safetensors: not an adapter fastadapter knows"):
        load_adapter(LlamaModel(tiny_config), unknown)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_adapter(LlamaModel(tiny_config), tmp_path / "missing.safetensors")


def _twin_models(model_config, **adapter_config):
    """A trained adapted model and an un-adapted copy of its base model."""
    trained = _trained(LlamaModel(model_config), **adapter_config)
    base = LlamaModel(model_config)
    base.load_state_dict({k: v for k, v in trained.state_dict().items() if "adapter" not in k})
    return trained, base


def test_llama_adapter_v1_layout(tmp_path, tokens, tiny_config):
    trained, base = _twin_models(tiny_config, gate_activation="tanh", gate_per_head=True)
    adapters = adapted_layers(trained)
    # Original layout: all prompts in one embedding, block j for the j-th adapted layer; gates [1, H, 1, 1].
    state = {"adapter_query.weight": torch.cat([a.prompt.detach() for a in adapters.values()])}
    for i, a in adapters.items():
        state[f"layers.{i}.attention.gate"] = a.gate.detach().reshape(1, -1, 1, 1).clone()
    torch.save(state, tmp_path / "llama_adapter_len5_layer3.pth")
    load_adapter(base, tmp_path / "llama_adapter_len5_layer3.pth")
    assert base.adapter_config == AdapterConfig(prompt_len=5, layers=[1, 2, 3], gate_activation="tanh")
    torch.testing.assert_close(_logits(base, tokens), _logits(trained, tokens), rtol=0, atol=0)


def _official_v1_file(path, trained, zero_gates=False):
    """What the official v1 extraction saves: one ``adapter_query.weight [P·L, dim]`` and the gate
    ``[1, H, 1, 1]`` of every layer of the model, zero for the layers below the adapted ones."""
    adapters = adapted_layers(trained)
    state = {"adapter_query.weight": torch.cat([a.prompt.detach() for a in adapters.values()]).clone()}
    for i in range(trained.config.n_layers):
        gate = adapters[i].gate.detach() if i in adapters and not zero_gates else torch.zeros(trained.config.n_heads)
        state[f"layers.{i}.attention.gate"] = gate.reshape(1, -1, 1, 1).clone()
    torch.save(state, path)
    return path


@pytest.mark.parametrize("model_config, prompt_len, layers", [
    ("deep_config", 10, 30),  # the paper's 7B layout: [300, dim] rows, 32 gates
    ("tiny_config", 5, 3),  # 15 rows, 4 gates
    ("tiny_config", 6, 2),  # 12 rows: a multiple of the 4 gates, yet P = 6 on 2 layers
], ids=["30-of-32", "3-of-4", "2-of-4"])
def test_official_llama_adapter_v1_file_with_every_layers_gate(tmp_path, request, model_config, prompt_len, layers):
    model_config = request.getfixturevalue(model_config)
    trained, base = _twin_models(model_config, prompt_len=prompt_len, layers=layers, gate_activation="tanh",
                                 gate_per_head=True)
    path = _official_v1_file(tmp_path / "adapter.pth", trained)
    load_adapter(base, path)
    top = list(range(model_config.n_layers - layers, model_config.n_layers))
    assert base.adapter_config == AdapterConfig(prompt_len=prompt_len, layers=top, gate_activation="tanh")
    assert list(adapted_layers(base)) == top
    tokens = torch.randint(0, model_config.vocab_size, (2, 13))
    torch.testing.assert_close(_logits(base, tokens), _logits(trained, tokens), rtol=0, atol=0)
    # The same as the equivalent fastadapter adapter file.
    save_adapter(trained, tmp_path / "a.safetensors")
    native = LlamaModel(model_config)
    native.load_state_dict({k: v for k, v in base.state_dict().items() if "adapter" not in k})
    load_adapter(native, tmp_path / "a.safetensors")
    assert native.adapter_config == base.adapter_config
    torch.testing.assert_close(_logits(native, tokens), _logits(base, tokens), rtol=0, atol=0)


def test_v1_prompt_length_from_the_caller_the_file_name_or_the_paper(tmp_path, tiny_config, deep_config):
    # An untrained official file (every gate zero): the zero gates cannot tell P = 5, L = 3 from P = 15, L = 1.
    trained, _ = _twin_models(tiny_config, prompt_len=5, layers=3)
    path = _official_v1_file(tmp_path / "adapter.pth", trained, zero_gates=True)
    with pytest.raises(AdapterFileError, match=r"adapter.pth: cannot tell the prompt length P and the adapted layers "
                                               r"L: adapter_query.weight has 15 rows \(P·L\), gates for layers 0-3 "
                                               r"\(all zero: 0-3\), the model has 4 layers; .*candidates: P=15, L=1; "
                                               r"P=5, L=3\. Pass prompt_len"):
        load_adapter(LlamaModel(tiny_config), path)
    config, tensors, _ = read_foreign_adapter(str(path), "llama_adapter_v1", tiny_config, prompt_len=5)
    assert (config["prompt_len"], config["layers"]) == (5, [1, 2, 3])
    assert torch.equal(tensors["layers.1.adapter_prompt"], adapted_layers(trained)[1].prompt.detach())
    with pytest.raises(AdapterFileError, match=r"adapter.pth: prompt_len=4 does not fit: adapter_query.weight has "
                                               r"15 rows"):
        read_foreign_adapter(str(path), "llama_adapter_v1", tiny_config, prompt_len=4)
    # The official releases are named after P and L.
    named = _official_v1_file(tmp_path / "llama_adapter_len5_layer3_release.pth", trained, zero_gates=True)
    load_adapter(base := LlamaModel(tiny_config), named)
    assert base.adapter_config.layers == (1, 2, 3)
    # Otherwise the paper's recipe, P = 10 on the top 30 of 32 layers, when it is the only one that fits.
    deep, _ = _twin_models(deep_config, prompt_len=10, layers=30)
    deep_file = _official_v1_file(tmp_path / "zero.pth", deep, zero_gates=True)
    with pytest.warns(UserWarning, match=r"zero.pth: guessed P=10 on the top 30 layers from the paper's recipe"):
        load_adapter(base := LlamaModel(deep_config), deep_file)
    assert base.adapter_config == AdapterConfig(prompt_len=10, layers=list(range(2, 32)))


def test_v1_gate_activation_can_be_the_raw_gate_of_the_inference_code(tmp_path, tokens, caplog, tiny_config):
    trained, base = _twin_models(tiny_config, prompt_len=5, layers=3, gate_activation="none")
    path = _official_v1_file(tmp_path / "adapter.pth", trained)
    with caplog.at_level("INFO", logger="fastadapter"):
        config, _, _ = read_foreign_adapter(str(path), "llama_adapter_v1", tiny_config)
    assert config["gate_activation"] == "tanh"  # the default: the original training code
    assert "tanh(gate), as the original LLaMA-Adapter v1 training code" in config["gate_activation_reason"]
    assert "adapter.pth: llama_adapter_v1 adapter, gates applied as tanh(gate)" in caplog.text
    # load_adapter passes the choice through, and says on the model which activation it used and why.
    load_adapter(base, path)
    assert base.adapter_source["gate_activation"] == "tanh"
    assert "its inference code multiplies by the raw gate" in base.adapter_source["gate_activation_reason"]
    assert not torch.equal(_logits(base, tokens), _logits(trained, tokens))
    load_adapter(base, path, gate_activation="none")
    assert base.adapter_source == {"path": str(path), "format": "llama_adapter_v1", "gate_activation": "none",
                                   "gate_activation_reason": "the raw gate, as the caller asked"}
    torch.testing.assert_close(_logits(base, tokens), _logits(trained, tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="gate_activation must be 'tanh' or 'none', got 'sigmoid'"):
        load_adapter(base, path, gate_activation="sigmoid")


def test_a_fastadapter_file_keeps_the_activation_it_was_trained_with(tmp_path, tiny_config):
    trained, base = _twin_models(tiny_config, gate_activation="tanh")
    save_adapter(trained, tmp_path / "a.safetensors")
    load_adapter(base, tmp_path / "a.safetensors", gate_activation="tanh")  # the same: allowed
    assert base.adapter_source["gate_activation"] == "tanh"
    with pytest.raises(ValueError, match=r"a.safetensors: this fastadapter adapter was trained with "
                                         r"gate_activation='tanh'; gate_activation='none' applies to adapters of "
                                         r"other projects"):
        load_adapter(base, tmp_path / "a.safetensors", gate_activation="none")
    add_adapter(base, AdapterConfig(layers=2))
    assert base.adapter_source is None  # a fresh adapter comes from no file


def test_v1_gate_of_a_layer_the_model_lacks(tmp_path, tiny_config):
    trained, _ = _twin_models(tiny_config, prompt_len=5, layers=3)
    path = _official_v1_file(tmp_path / "adapter.pth", trained)
    state = torch.load(path)
    state["layers.4.attention.gate"] = torch.zeros(1, 8, 1, 1)
    torch.save(state, path)
    with pytest.raises(AdapterFileError, match=r"adapter.pth: tensor 'layers.4.attention.gate' is for layer 4, but "
                                               r"the model has 4 layers"):
        load_adapter(LlamaModel(tiny_config), path)


def _litgpt_file(path, trained, gate_shape=(1, 1, 8, 1)):
    state = {"transformer.wte.weight": torch.zeros(3)}  # a base weight that an adapter checkpoint may carry
    for i, a in adapted_layers(trained).items():
        state[f"transformer.h.{i}.attn.adapter_wte.weight"] = a.prompt.detach().clone()
        state[f"transformer.h.{i}.attn.gating_factor"] = a.gate.detach().reshape(gate_shape).clone()
    torch.save({"model": state}, path)  # Lightning Fabric nests under "model"
    return path


@pytest.mark.parametrize("gate_shape", [(1, 1, 8, 1), (1, 8, 1, 1)], ids=["current", "older"])
def test_litgpt_layout(tmp_path, tokens, gate_shape, tiny_config):
    trained, base = _twin_models(tiny_config, gate_activation="none", gate_per_head=True)
    path = _litgpt_file(tmp_path / "lit_model.pth.adapter", trained, gate_shape)
    with pytest.warns(UserWarning, match=r"lit_model.pth.adapter: litgpt >= 0.5.5 projects .* litgpt's prefix keys "
                                         r"differ from these on heads 0-3, 6-7 and its prefix values on heads 0-5 of "
                                         r"this model"):
        load_adapter(base, path, format="litgpt")
    assert base.adapter_source["gate_activation"] == "none"
    torch.testing.assert_close(_logits(base, tokens), _logits(trained, tokens), rtol=0, atol=0)


def _litgpt_prefix_kv(attention, prompt):
    """What litgpt >= 0.5.5's adapter computes as the prefix keys and values, transcribed from reading
    ``litgpt/adapter.py`` and ``litgpt/model.py`` (0.5.13): the fused ``qkv`` weight is ``[Wq; Wk; Wv]`` (all query
    heads, then the keys, then the values), and the adapter views the prompt's output as ``[G, r + 2, head_size]``
    and splits each group into r queries, one key, one value. Returns ``[G, P, head_size]`` each."""
    fused = torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight])
    out = prompt @ fused.T  # [P, (H + 2G)·hs]
    groups, per_group = attention.n_kv_heads, attention.n_heads // attention.n_kv_heads
    out = out.view(prompt.shape[0], groups, per_group + 2, attention.head_dim).permute(1, 2, 0, 3)
    _, keys, values = out.split((per_group, 1, 1), dim=1)
    return keys[:, 0], values[:, 0]


@pytest.mark.parametrize("n_heads, n_kv_heads, expected_key_groups", [
    (8, 4, [False, False, True, False]),  # r = 2: group 2's keys land on their true block 10
    (8, 2, [False, False]),
    (6, 6, [False] * 6),
    (3, 3, [False, True, False]),  # r = 1: group 1's keys land on their true block 4
    (8, 1, [True]),
], ids=["gqa", "gqa4", "mha", "mha-3", "mqa"])
def test_litgpt_prefix_rows_are_right_only_for_multi_query_attention(make_config, n_heads, n_kv_heads,
                                                                     expected_key_groups):
    from fastadapter.adapters.adapter_formats import litgpt_mismatched_heads, litgpt_prefix_blocks

    config = make_config(dim=48, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=11, hidden_dim=8)
    torch.manual_seed(0)
    model = add_adapter(LlamaModel(config), AdapterConfig(prompt_len=5, layers=1))
    attention = model.layers[0].attention
    prompt = attention.adapter.prompt.detach()
    with torch.no_grad():
        ours_k, ours_v = attention.adapter.prefix_kv(attention.wk, attention.wv, n_kv_heads, config.head_dim)
        lit_k, lit_v = _litgpt_prefix_kv(attention, prompt)
    # The blocks litgpt_prefix_blocks names are those the transcription reads.
    fused_out = (prompt @ torch.cat([attention.wq.weight, attention.wk.weight, attention.wv.weight]).T).detach()
    blocks = fused_out.view(prompt.shape[0], -1, config.head_dim)
    key_blocks, value_blocks = litgpt_prefix_blocks(n_heads, n_kv_heads)
    torch.testing.assert_close(lit_k, blocks[:, key_blocks].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(lit_v, blocks[:, value_blocks].transpose(0, 1), rtol=0, atol=0)
    def same(a, b):  # up to the rounding of two matmul shapes; the wrong rows differ by O(1)
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    same_keys = [same(lit_k[g], ours_k[0, :, g]) for g in range(n_kv_heads)]
    same_values = [same(lit_v[g], ours_v[0, :, g]) for g in range(n_kv_heads)]
    # The values are right only for the last group; the keys almost never (both only for multi-query attention).
    assert same_values == [g == n_kv_heads - 1 for g in range(n_kv_heads)]
    assert same_keys == expected_key_groups
    per_group = n_heads // n_kv_heads
    wrong_keys, wrong_values = litgpt_mismatched_heads(n_heads, n_kv_heads)
    assert wrong_values == list(range((n_kv_heads - 1) * per_group))
    assert wrong_keys == [h for h in range(n_heads) if not same_keys[h // per_group]]


def test_litgpt_import_is_exact_and_silent_for_multi_query_models(tmp_path, recwarn, deep_config):
    trained, base = _twin_models(deep_config, gate_activation="none", gate_per_head=True, layers=2)
    path = _litgpt_file(tmp_path / "mqa.pth", trained, gate_shape=(1, 1, 2, 1))
    load_adapter(base, path, format="litgpt")
    assert not [w for w in recwarn if "litgpt" in str(w.message)]


def test_peft_adaption_prompt_gives_peft_logits(tmp_path, tokens):
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(HFConfig(hidden_size=80, intermediate_size=72, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=97)).eval()
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, AdaptionPromptConfig(adapter_len=6, adapter_layers=3, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "adaption_gate" in name:
                p.fill_(0.9)
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
    model = load_model(tmp_path / "base")
    load_adapter(model, tmp_path / "peft")
    assert model.adapter_config == AdapterConfig(prompt_len=6, layers=[1, 2, 3], gate_activation="none",
                                                 gate_per_head=False)
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=1e-5, atol=1e-5)
    # The weights file alone is enough too.
    load_adapter(model, tmp_path / "peft" / "adapter_model.safetensors")
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=1e-5, atol=1e-5)


def test_foreign_adapter_of_the_wrong_shape_names_the_tensor(tmp_path, tiny_config):
    state = {f"base_model.model.model.layers.{i}.self_attn.adaption_{part}": t
             for i in (2, 3) for part, t in (("prompt", torch.zeros(1, 4, 64)), ("gate", torch.zeros(1)))}
    path = tmp_path / "adapter_model.safetensors"
    save_file(state, path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_layers": 2}))
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors: tensor 'layers.2.adapter_prompt' has "
                                               r"shape \[4, 64\], the model needs \[4, 80\]"):
        load_adapter(LlamaModel(tiny_config), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_layers": 3}))
    with pytest.raises(AdapterFileError, match="adapter_layers=3 but the file holds 2 layers"):
        load_adapter(LlamaModel(tiny_config), tmp_path)
