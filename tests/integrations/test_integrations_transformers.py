"""``fastadapter.integrations.transformers``: LLaMA-Adapter on tiny random Llama, Mistral and Qwen2 models (GQA).

The references are the unpatched model (a zero gate must change nothing), PEFT's ``adaption_prompt`` (a raw
scalar gate computes what PEFT computes; Qwen2 is run through PEFT's Llama code path, which fits it), the same
rows without padding, generation without a cache, and fastadapter's own LLaMA loaded from the same weights.
"""
import copy
import logging
import sys
import warnings

import pytest
import torch
import transformers

from fastadapter.integrations import _versions
from fastadapter.integrations import _attention_mask
from fastadapter.integrations._attention_mask import BatchLayout, batch_layout
from fastadapter.integrations._llama_pattern import UnsupportedAttentionError
from fastadapter.integrations.transformers import (AdapterAttention, adapted_layers, apply_adapter, load_adapter,
                                                   remove_adapter, save_adapter)
from fastadapter.adapters.adapter_file import AdapterFileError

from hf_models import VOCAB, peft_reference, random_tokens, tiny_model

FAMILIES = ("llama", "mistral", "qwen2")


def _adapted_with_gate(model, gate: float = 0.5, **kwargs):
    """apply_adapter with every gate set to ``gate`` (a zero gate would hide the prefix)."""
    apply_adapter(model, **kwargs)
    with torch.no_grad():
        for attn in adapted_layers(model).values():
            attn.adapter.gate.fill_(gate)
    return model


def _copy_peft_parameters(peft_model, model):
    """Give ``model`` (apply_adapter'ed, raw scalar gate) the prompts and gates of ``peft_model``."""
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for i, attn in adapted_layers(model).items():
            prefix = f"base_model.model.model.layers.{i}.self_attn."
            attn.adapter.prompt.copy_(peft_params[prefix + "adaption_prompt"][0])
            attn.adapter.gate.copy_(peft_params[prefix + "adaption_gate"])


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gate_changes_nothing_and_lower_layers_stay(family):
    model = tiny_model(family)
    tokens = random_tokens()
    expected = model(tokens).logits
    lower = model.model.layers[0].self_attn
    apply_adapter(model, prompt_len=5, layers=2)
    assert model.model.layers[0].self_attn is lower
    assert sorted(adapted_layers(model)) == [1, 2]
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"model.layers.{i}.self_attn.adapter.{p}" for i in (1, 2) for p in ("gate", "prompt")]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_gradients_equal_peft(family, monkeypatch):
    base = tiny_model(family)
    ours = _adapted_with_gate(copy.deepcopy(base), prompt_len=5, layers=2, gate_activation="none",
                              gate_per_head=False)
    peft_model = peft_reference(base, monkeypatch=monkeypatch)
    _copy_peft_parameters(peft_model, ours)
    tokens = random_tokens()
    out_peft = peft_model(tokens, labels=tokens)
    out_ours = ours(tokens, labels=tokens)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_ours.loss, out_peft.loss, atol=1e-5, rtol=1e-5)
    out_peft.loss.backward()
    out_ours.loss.backward()
    peft_params = dict(peft_model.named_parameters())
    for i, attn in adapted_layers(ours).items():
        prefix = f"base_model.model.model.layers.{i}.self_attn."
        torch.testing.assert_close(attn.adapter.prompt.grad, peft_params[prefix + "adaption_prompt"].grad[0],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attn.adapter.gate.grad, peft_params[prefix + "adaption_gate"].grad,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_unpadded_rows(family):
    model = _adapted_with_gate(tiny_model(family), prompt_len=5, layers=2)
    rows = [random_tokens(1, 11, seed=2)[0], random_tokens(1, 7, seed=3)[0]]
    batch = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for b, row in enumerate(rows):
        batch[b, 11 - len(row):] = row
        mask[b, 11 - len(row):] = 1
    # The prompt has no position but the queries do: q·prefix_k depends on absolute positions, so the padded rows
    # must count positions from their first real token (as generate() does).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(logits).all()
    for b, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(logits[b, 11 - len(row):], alone, atol=2e-5, rtol=1e-4)


def test_generate_with_caches_equals_without_and_equals_peft(monkeypatch):
    base = tiny_model("llama")
    ours = _adapted_with_gate(copy.deepcopy(base), prompt_len=5, layers=2, gate_activation="none",
                              gate_per_head=False)
    peft_model = peft_reference(base, monkeypatch=monkeypatch)
    _copy_peft_parameters(peft_model, ours)
    prompt = random_tokens(1, 6, seed=4)
    settings = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = ours.generate(prompt, **settings)
    uncached = ours.generate(prompt, use_cache=False, **settings)
    # A static cache prefills with no mask and keys beyond the prompt (its empty tail): they must stay unseen.
    static = ours.generate(prompt, cache_implementation="static", **settings)
    reference = peft_model.generate(input_ids=prompt, **settings)
    assert cached.tolist() == uncached.tolist() == static.tolist() == reference.tolist()


def count_op_calls(monkeypatch):
    """Record every zero_init_attention call of the integrations (its keyword arguments) and refuse the
    masked-SDPA fallback: a padded batch must run the fused op."""
    calls = []
    dense, varlen = _attention_mask.zero_init_attention, _attention_mask.zero_init_attention_varlen

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return dense(*args, **kwargs)

    def counting_varlen(*args, **kwargs):
        calls.append({**kwargs, "cu_seqlens_q": args[6], "cu_seqlens_k": args[7]})
        return varlen(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a padded batch took the explicit-mask path")

    monkeypatch.setattr(_attention_mask, "zero_init_attention", counting)
    monkeypatch.setattr(_attention_mask, "zero_init_attention_varlen", counting_varlen)
    monkeypatch.setattr(_attention_mask, "masked_zero_init_attention", refuse)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_generation_makes_one_ragged_call_per_layer_and_equals_rows_alone(family, monkeypatch):
    """Prefill and every decode step of a left-padded batch: one varlen zero_init_attention call per adapted layer
    (no per-row loop, no SDPA pair), and each row generates what it generates alone."""
    model = _adapted_with_gate(tiny_model(family), gate=0.8, prompt_len=5, layers=2)
    short, long = random_tokens(1, 4, seed=5)[0], random_tokens(1, 7, seed=6)[0]
    batch = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    calls = count_op_calls(monkeypatch)
    together = model.generate(batch, attention_mask=mask, **settings)
    assert len(calls) == 2 * 6  # 2 adapted layers x (prefill + 5 decode steps)
    assert all(c.get("cu_seqlens_q") is not None and c.get("cu_seqlens_k") is not None for c in calls)
    assert together[0, 7:].tolist() == model.generate(short[None], **settings)[0, 4:].tolist()
    assert together[1, 7:].tolist() == model.generate(long[None], **settings)[0, 7:].tolist()


def test_layout_is_read_once_per_forward(monkeypatch):
    """The mask is read into offsets once per forward (kept on the shared mask tensor), not once per layer."""
    model = _adapted_with_gate(tiny_model("llama", num_hidden_layers=4), prompt_len=3, layers=3)
    reads = []
    real = _attention_mask._read_layout
    monkeypatch.setattr(_attention_mask, "_read_layout", lambda *a: reads.append(a[1:]) or real(*a))
    mask = (torch.arange(9)[None] >= torch.tensor([[2], [0], [5]])).long()
    model(random_tokens(3, 9), attention_mask=mask)
    assert reads == [(9, 9)]
    causal = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    assert batch_layout(causal, 4, 4) is batch_layout(causal, 4, 4)  # kept on the tensor
    causal[..., 3, 0] = False  # changed in place: read again
    assert batch_layout(causal, 4, 4).kind == "masked"


def test_gradient_checkpointing_gives_the_same_gradients():
    tokens = random_tokens()
    grads = []
    for checkpointing in (False, True):
        model = _adapted_with_gate(tiny_model("llama"), prompt_len=5, layers=2)
        model.train()
        if checkpointing:
            # transformers 5.23 renamed gradient_checkpointing_enable (5.17, the oldest supported, has only that)
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
            assert model.model.gradient_checkpointing
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
        assert grads[0][name].abs().sum() > 0, name


def test_eager_model_takes_the_fused_path_and_equals_sdpa_model():
    tokens = random_tokens()
    sdpa = _adapted_with_gate(tiny_model("llama"), prompt_len=5, layers=2)
    eager = _adapted_with_gate(tiny_model("llama", attn_implementation="eager"), prompt_len=5, layers=2)
    eager.load_state_dict(sdpa.state_dict())
    torch.testing.assert_close(eager(tokens).logits, sdpa(tokens).logits, atol=2e-5, rtol=1e-4)


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def test_layout_recognises_the_causal_mask_and_names_the_fallbacks():
    causal = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)[None, None]
    assert batch_layout(None, 5, 7).kind == "causal"
    assert batch_layout(causal.clone(), 5, 7).kind == "causal"
    assert batch_layout(_additive(causal), 5, 7).kind == "causal"
    # A soft additive bias (not 0 / -inf) must keep the explicit path, and say why.
    soft = batch_layout(_additive(causal) * 1e-30, 5, 7)
    assert soft.kind == "masked" and "soft bias" in soft.reason
    per_head = batch_layout(causal.expand(1, 2, 5, 7).clone(), 5, 7)
    assert per_head.kind == "masked" and "per head" in per_head.reason
    window = causal.clone()
    window[..., 4, 0] = False  # a sliding window that cuts into the causal window
    assert batch_layout(window, 5, 7).kind == "masked"
    with pytest.raises(TypeError, match="4D attention mask"):
        batch_layout(torch.ones(1, 7), 5, 7)
    with pytest.raises(ValueError, match="does not cover"):
        batch_layout(causal.clone(), 5, 8)


def test_layout_of_a_left_padded_mask_is_two_sequences_per_row():
    causal = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)
    left = causal[None].repeat(3, 1, 1)
    left[1, :, :2] = False  # row 1: two pad keys
    left[2, :, :4] = False  # row 2: four (its first two queries see no key)
    for mask in (left[:, None].clone(), _additive(left[:, None])):
        layout = batch_layout(mask, 5, 7)
        assert layout.kind == "left"
        assert layout.cu_seqlens_q.tolist() == [0, 0, 5, 5, 10, 10, 15]
        assert layout.cu_seqlens_k.tolist() == [0, 0, 7, 9, 14, 18, 21]
        assert (layout.blind is None) == (mask.dtype == torch.bool)
    assert batch_layout(_additive(left[:, None]), 5, 7).blind[:, :, 0, 0].nonzero().tolist() == [[2, 0], [2, 1]]
    empty = left.clone()
    empty[0] = False
    assert batch_layout(empty[:, None], 5, 7).reason == "a row with no key at all"


def test_layout_of_a_right_padded_mask_sets_the_padding_queries_apart():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    right = causal[None].repeat(2, 1, 1)
    right[1, :, 4:] = False  # row 1: 4 real tokens, then padding
    layout = batch_layout(right[:, None].clone(), 6, 6)
    assert layout.kind == "right"
    assert layout.cu_seqlens_q.tolist() == layout.cu_seqlens_k.tolist() == [0, 6, 6, 10, 12]
    assert layout.pad_rows.tolist() == [10, 11]
    assert layout.pad_cu_seqlens_q.tolist() == [0, 0, 0, 2, 2]
    padded_keys_seen = right.clone()
    padded_keys_seen[1, 5, 4] = True  # a padding query that sees a padding key
    assert batch_layout(padded_keys_seen[:, None], 6, 6).kind == "masked"


def test_sliding_window_mask_is_honoured():
    model = tiny_model("mistral", sliding_window=4)
    tokens = random_tokens(2, 11)
    expected = model(tokens).logits
    apply_adapter(model, prompt_len=5, layers=2)
    torch.testing.assert_close(model(tokens).logits, expected, atol=2e-5, rtol=1e-4)


def test_save_load_round_trip_and_wrong_base_model(tmp_path):
    model = _adapted_with_gate(tiny_model("llama"), gate=0.3, prompt_len=5, layers=2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    tokens = random_tokens()
    fresh = load_adapter(tiny_model("llama"), path)
    assert fresh.adapter_config.to_dict(3) == model.adapter_config.to_dict(3)
    torch.testing.assert_close(fresh(tokens).logits, model(tokens).logits, atol=0, rtol=0)
    with pytest.raises(AdapterFileError, match="another base model"):
        load_adapter(tiny_model("llama", seed=1), path)
    with pytest.raises(AdapterFileError, match="n_kv_heads"):
        load_adapter(tiny_model("llama", num_key_value_heads=4), path)


def test_adapter_moves_between_hf_and_fastadapter_llama(tmp_path):
    import fastadapter
    hf = _adapted_with_gate(tiny_model("llama"), gate=0.6, prompt_len=5, layers=2)
    remove_adapter(hf)
    hf.save_pretrained(tmp_path / "hf")
    _adapted_with_gate(hf, gate=0.6, prompt_len=5, layers=2)
    save_adapter(hf, tmp_path / "adapter.safetensors")
    thin = fastadapter.load_model(tmp_path / "hf")
    fastadapter.load_adapter(thin, tmp_path / "adapter.safetensors")
    tokens = random_tokens()
    torch.testing.assert_close(thin(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)
    fastadapter.save_adapter(thin, tmp_path / "back.safetensors")
    again = load_adapter(tiny_model("llama"), tmp_path / "back.safetensors")
    torch.testing.assert_close(again(tokens).logits, hf(tokens).logits, atol=0, rtol=0)


def test_remove_adapter_restores_the_original_modules():
    model = tiny_model("qwen2")
    originals = [layer.self_attn for layer in model.model.layers]
    apply_adapter(model, prompt_len=3, layers=[0, 2])
    assert isinstance(model.model.layers[0].self_attn, AdapterAttention)
    apply_adapter(model, prompt_len=4, layers=1)  # replaces the first adapter
    assert sorted(adapted_layers(model)) == [2]
    remove_adapter(model)
    assert [layer.self_attn for layer in model.model.layers] == originals


_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("make, reason", [
    (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**_SMALL)), r"Phi3Attention.*fused qkv projection"),
    (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**_SMALL)),  # soft-capping 50 by default
     r"Gemma2Attention.*logit soft-capping \(attn_logit_softcapping=50"),
    (lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**_SMALL)),
     r"GraniteAttention.*not one of the classes"),
], ids=["fused-qkv", "softcapping", "not-allowlisted"])
def test_unsupported_attention_is_refused_with_the_reason(make, reason):
    """By allowlist: a class of the Llama structure that was not checked is refused, not warned about."""
    model = make()
    with pytest.raises(UnsupportedAttentionError, match=reason + r".*Supported attention classes: LlamaAttention"):
        apply_adapter(model, prompt_len=3, layers=1)
    assert not adapted_layers(model)


def test_unsupported_transformers_version_is_named(monkeypatch):
    # sys.modules' entry, which may be another object than the name imported above (transformers' lazy module).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.0")
    with pytest.raises(_versions.UnsupportedVersionError, match=r"transformers 4\.46\.0 is older.*5\.17\.x to 5\.23\.x"):
        apply_adapter(tiny_model("llama"), prompt_len=3, layers=1)


@pytest.mark.parametrize("version", ["5.17.0", "5.20.1", "5.23.0", "5.23.4"])
def test_every_transformers_version_of_the_supported_range_is_accepted_silently(monkeypatch, version):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _versions.require_supported_version("transformers")


def test_a_newer_transformers_is_a_warning_once_not_an_error(monkeypatch):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.30.0.dev0")
    monkeypatch.setattr(_versions, "_warned", set())
    with pytest.warns(_versions.UntestedVersionWarning, match=r"transformers 5\.30\.0\.dev0 is newer.*5\.23\.x"):
        model = apply_adapter(tiny_model("llama"), prompt_len=3, layers=1)
    assert adapted_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        apply_adapter(tiny_model("llama"), prompt_len=3, layers=1)


def test_an_installed_package_that_fails_to_import_is_reported_with_its_own_error(monkeypatch):
    """Not "install peft" when peft is installed: the message carries the import's real error."""
    import importlib
    real_import = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "peft":
            raise ModuleNotFoundError("Could not import module 'BloomPreTrainedModel'", name="transformers.models")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_versions.importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"peft, which is installed but failed to import: ModuleNotFoundError: "
                                          r"Could not import module 'BloomPreTrainedModel'") as raised:
        _versions.require_supported_version("peft")
    assert "pip install" not in str(raised.value)
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setattr(_versions.importlib, "import_module", real_import)
    with pytest.raises(ImportError, match=r"peft \(0\.18\.x to 0\.21\.x\), which is not installed: pip install"):
        _versions.require_supported_version("peft")


def test_more_layers_than_the_model_has_adapts_every_layer_with_a_note(caplog):
    """As ``fastadapter train --adapter-layers 30`` on a smaller model: clamped to the model, and logged."""
    with caplog.at_level(logging.WARNING, logger="fastadapter"):
        model = apply_adapter(tiny_model("llama"), prompt_len=3, layers=30)
    assert sorted(adapted_layers(model)) == [0, 1, 2]
    assert "layers=30 but the model has 3 layers: adapting all 3" in caplog.text
    with pytest.raises(ValueError, match="layers"):
        apply_adapter(tiny_model("llama"), prompt_len=3, layers=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        apply_adapter(tiny_model("llama"), prompt_len=3, layers=[1, 5])


def test_attention_dropout_in_training_is_refused():
    model = apply_adapter(tiny_model("llama", attention_dropout=0.1), prompt_len=3, layers=1).train()
    with pytest.raises(ValueError, match="attention_dropout"):
        model(random_tokens())
    assert torch.isfinite(model.eval()(random_tokens()).logits).all()  # no dropout at inference: runs


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_training_batch_runs_the_fused_op_and_equals_the_masked_math(family, monkeypatch):
    """PEFT-style right padding: two ragged calls per layer, and logits (padding rows included), loss and every
    adapter gradient equal the two-SDPA masked computation."""
    model = _adapted_with_gate(tiny_model(family), gate=0.6, prompt_len=5, layers=2)
    tokens = random_tokens(3, 10, seed=7)
    mask = (torch.arange(10)[None] < torch.tensor([[10], [6], [3]])).long()
    labels = tokens.masked_fill(mask == 0, -100)
    results = []
    for fused in (True, False):
        if fused:
            calls = count_op_calls(monkeypatch)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(_attention_mask, "_read_layout",
                                lambda mask, sq, sk: BatchLayout("masked", sq, sk, reason="test", mask=mask))
        model.zero_grad()
        out = model(tokens, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.detach(), grads))
        if fused:
            assert [c["causal"] for c in calls] == [True, False] * 2  # per layer: real tokens, padding queries
    (logits, loss, grads), (logits_ref, loss_ref, grads_ref) = results
    torch.testing.assert_close(logits, logits_ref, atol=2e-5, rtol=1e-4)  # padding positions included
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-4)
