"""save_adapter / load_adapter: round trip, refusal of another base model, and adapters of other projects
(original LLaMA-Adapter v1, PEFT adaption_prompt, litgpt) giving the same logits."""
import json

import pytest
import torch
from safetensors.torch import save_file

from fastadapter import AdapterConfig, add_adapter, load_adapter, load_model, save_adapter
from fastadapter.model import AdapterFileError, LlamaConfig, LlamaModel, adapted_layers

TINY = LlamaConfig(dim=80, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=97, hidden_dim=72)


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
def tokens():
    return torch.randint(0, TINY.vocab_size, (2, 19))


def test_round_trip_restores_the_same_logits(tmp_path, tokens):
    torch.manual_seed(1)
    base_state = LlamaModel(TINY).state_dict()
    trained = LlamaModel(TINY)
    trained.load_state_dict(base_state)
    _trained(trained, layers=[1, 3], gate_per_head=False, gate_activation="none")
    save_adapter(trained, tmp_path / "a.safetensors")
    fresh = LlamaModel(TINY)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert list(adapted_layers(fresh)) == [1, 3]
    assert fresh.adapter_config == AdapterConfig(prompt_len=5, layers=[1, 3], gate_activation="none",
                                                 gate_per_head=False)
    assert torch.equal(_logits(fresh, tokens), _logits(trained, tokens))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        "layers.1.attention.adapter.prompt", "layers.1.attention.adapter.gate",
        "layers.3.attention.adapter.prompt", "layers.3.attention.adapter.gate"]


def test_adapter_of_another_base_model_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(_trained(LlamaModel(TINY)), path)
    with pytest.raises(AdapterFileError, match=r"a.safetensors: this adapter was made for another base model "
                                               r"of the same shape \(fingerprint"):
        load_adapter(LlamaModel(TINY), path)
    other_shape = LlamaModel(LlamaConfig(**{**TINY.__dict__, "n_kv_heads": 2}))
    with pytest.raises(AdapterFileError, match="a.safetensors: .* base model with n_kv_heads=4, but the model "
                                               "has n_kv_heads=2"):
        load_adapter(other_shape, path)


def test_save_without_adapter_and_unknown_files(tmp_path):
    with pytest.raises(ValueError, match="no adapter to save"):
        save_adapter(LlamaModel(TINY), tmp_path / "a.safetensors")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"some.weight": torch.zeros(2)}, unknown)
    with pytest.raises(AdapterFileError, match="unknown.safetensors: not an adapter fastadapter knows"):
        load_adapter(LlamaModel(TINY), unknown)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_adapter(LlamaModel(TINY), tmp_path / "missing.safetensors")


def _twin_models(**adapter_config):
    """A trained adapted model and an un-adapted copy of its base model."""
    trained = _trained(LlamaModel(TINY), **adapter_config)
    base = LlamaModel(TINY)
    base.load_state_dict({k: v for k, v in trained.state_dict().items() if "adapter" not in k})
    return trained, base


def test_llama_adapter_v1_layout(tmp_path, tokens):
    trained, base = _twin_models(gate_activation="tanh", gate_per_head=True)
    adapters = adapted_layers(trained)
    # Original layout: all prompts in one embedding, block j for the j-th adapted layer; gates [1, H, 1, 1].
    state = {"adapter_query.weight": torch.cat([a.prompt.detach() for a in adapters.values()])}
    for i, a in adapters.items():
        state[f"layers.{i}.attention.gate"] = a.gate.detach().reshape(1, -1, 1, 1).clone()
    torch.save(state, tmp_path / "llama_adapter_len5_layer3.pth")
    load_adapter(base, tmp_path / "llama_adapter_len5_layer3.pth")
    assert base.adapter_config == AdapterConfig(prompt_len=5, layers=[1, 2, 3], gate_activation="tanh")
    torch.testing.assert_close(_logits(base, tokens), _logits(trained, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("gate_shape", [(1, 1, 8, 1), (1, 8, 1, 1)], ids=["current", "older"])
def test_litgpt_layout(tmp_path, tokens, gate_shape):
    trained, base = _twin_models(gate_activation="none", gate_per_head=True)
    state = {"transformer.wte.weight": torch.zeros(3)}  # a base weight that an adapter checkpoint may carry
    for i, a in adapted_layers(trained).items():
        state[f"transformer.h.{i}.attn.adapter_wte.weight"] = a.prompt.detach().clone()
        state[f"transformer.h.{i}.attn.gating_factor"] = a.gate.detach().reshape(gate_shape).clone()
    torch.save({"model": state}, tmp_path / "lit_model.pth.adapter")  # Lightning Fabric nests under "model"
    load_adapter(base, tmp_path / "lit_model.pth.adapter", format="litgpt")
    torch.testing.assert_close(_logits(base, tokens), _logits(trained, tokens), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside PEFT
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


def test_foreign_adapter_of_the_wrong_shape_names_the_tensor(tmp_path):
    state = {f"base_model.model.model.layers.{i}.self_attn.adaption_{part}": t
             for i in (2, 3) for part, t in (("prompt", torch.zeros(1, 4, 64)), ("gate", torch.zeros(1)))}
    path = tmp_path / "adapter_model.safetensors"
    save_file(state, path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_layers": 2}))
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors: tensor 'layers.2.adapter_prompt' has "
                                               r"shape \[4, 64\], the model needs \[4, 80\]"):
        load_adapter(LlamaModel(TINY), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_layers": 3}))
    with pytest.raises(AdapterFileError, match="adapter_layers=3 but the file holds 2 layers"):
        load_adapter(LlamaModel(TINY), tmp_path)
