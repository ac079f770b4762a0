"""The thin LLaMA: adapter parameters, the zero-init property, packed sequences, frozen layers, checkpointing."""
import dataclasses

import pytest
import torch

import fastadapter
from fastadapter.adapters import AdapterConfig, adapted_layers, add_adapter
from fastadapter.model import LLAMA_7B, LlamaConfig, LlamaModel
from fastadapter.model.llama import TransformerBlock, positions_from_cu_seqlens


@pytest.fixture
def config(make_config):
    """GQA (8 query heads over 4 kv heads), head_dim 10, an odd vocabulary; sequences up to 256 tokens."""
    return make_config(max_seq_len=256)


def _adapted(config, gate=0.3, **adapter_kwargs):
    model = LlamaModel(config)
    add_adapter(model, AdapterConfig(**{"prompt_len": 5, "layers": 2, **adapter_kwargs}))
    with torch.no_grad():
        for adapter in adapted_layers(model).values():
            adapter.gate.normal_(gate, 0.1)
    return model


def test_llama_7b_defaults_train_1229760_parameters_on_meta():
    with torch.device("meta"):
        model = LlamaModel(LLAMA_7B)
    assert model.tok_embeddings.weight.is_meta
    fastadapter.add_adapter(model, fastadapter.AdapterConfig())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 1_229_760 == 10 * 30 * 4096 + 30 * 32
    assert sorted({int(n.split(".")[1]) for n in trainable}) == list(range(2, 32))
    assert all(p.is_meta for p in trainable.values())


def test_layers_as_explicit_list_and_scalar_gate(config):
    model = LlamaModel(config)
    add_adapter(model, AdapterConfig(prompt_len=3, layers=[0, 2], gate_per_head=False, gate_activation="none"))
    adapters = adapted_layers(model)
    assert list(adapters) == [0, 2]
    assert adapters[0].prompt.shape == (3, config.dim) and adapters[0].gate.shape == (1,)
    assert adapters[2].gate_activation == "none"
    add_adapter(model, AdapterConfig(prompt_len=3, layers=1))  # replaces the previous adapter
    assert list(adapted_layers(model)) == [3]


@pytest.mark.parametrize("bad, message", [
    (dict(layers=5), "cannot adapt the top 5 layers of a model with 4 layers"),
    (dict(layers=[1, 4]), r"indices in \[0, 4\)"),
    (dict(prompt_len=0), "prompt_len must be a positive int"),
    (dict(gate_activation="sigmoid"), "gate_activation must be"),
])
def test_bad_adapter_config(bad, message, config):
    with pytest.raises(ValueError, match=message):
        add_adapter(LlamaModel(config), AdapterConfig(**bad))


@pytest.mark.parametrize("gate_activation", ["tanh", "none"])
def test_zero_gates_give_the_base_model_exactly(gate_activation, config):
    model = LlamaModel(config)
    tokens = torch.randint(0, config.vocab_size, (2, 97))
    with torch.no_grad():
        base = model(tokens)
        add_adapter(model, AdapterConfig(prompt_len=5, layers=3, gate_activation=gate_activation))
        assert torch.equal(model(tokens), base)
        next(iter(adapted_layers(model).values())).gate.fill_(0.5)
        assert not torch.allclose(model(tokens), base)


def test_base_weights_frozen_and_lower_layers_build_no_graph(config):
    model = _adapted(config)
    assert all(("adapter" in n) == p.requires_grad for n, p in model.named_parameters())
    outputs = {}
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
    logits = model(torch.randint(0, config.vocab_size, (2, 13)))
    assert outputs[0].grad_fn is None and outputs[1].grad_fn is None  # below the first adapted layer
    assert outputs[2].grad_fn is not None and logits.grad_fn is not None
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_packed_forward_and_gradients_equal_per_sequence(config):
    model = _adapted(config, gate_per_head=True)
    lengths = [7, 1, 23, 12]
    sequences = [torch.randint(0, config.vocab_size, (n,)) for n in lengths]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = model(torch.cat(sequences)[None], cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
    assert packed.shape == (1, sum(lengths), config.vocab_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    packed_grads = torch.autograd.grad(packed.logsumexp(-1).sum(), trainable)
    singles = [model(s[None])[0] for s in sequences]
    torch.testing.assert_close(packed[0], torch.cat(singles), rtol=1e-5, atol=1e-5)
    single_grads = torch.autograd.grad(sum(s.logsumexp(-1).sum() for s in singles), trainable)
    for got, want in zip(packed_grads, single_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_positions_restart_at_each_sequence():
    cu_seqlens = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu_seqlens, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_logits_positions_select_rows_of_the_full_logits(config):
    model = _adapted(config)
    tokens = torch.randint(0, config.vocab_size, (1, 20))
    cu_seqlens = torch.tensor([0, 12, 20], dtype=torch.int32)
    picked = torch.tensor([0, 5, 11, 19])
    full = model(tokens, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(model(tokens, cu_seqlens=cu_seqlens, logits_positions=picked), full[:, picked])


def test_explicit_positions_shift_rope(config):
    model = LlamaModel(config)
    tokens = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        default = model(tokens)
        assert torch.equal(model(tokens, positions=torch.arange(9)), default)
        # RoPE is relative: shifting every position by the same amount changes the logits only by rounding.
        torch.testing.assert_close(model(tokens, positions=torch.arange(9) + 5), default, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_activation_checkpointing_gives_the_same_gradients(monkeypatch, packed, config):
    model = _adapted(config)
    tokens = torch.randint(0, config.vocab_size, (1, 33) if packed else (2, 33))
    kwargs = {"cu_seqlens": torch.tensor([0, 14, 33], dtype=torch.int32)} if packed else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(model(tokens, **kwargs).logsumexp(-1).sum(), trainable)
    model.activation_checkpointing = True
    calls = [0] * config.n_layers
    block_forward = TransformerBlock.forward

    def counting_forward(block, *args, **kwargs):  # forward hooks do not fire in recomputation: count here
        calls[block.attention.layer_index] += 1
        return block_forward(block, *args, **kwargs)

    monkeypatch.setattr(TransformerBlock, "forward", counting_forward)
    recomputed = torch.autograd.grad(model(tokens, **kwargs).logsumexp(-1).sum(), trainable)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Adapted blocks ran again in backward; the frozen blocks below them, outside the gradient, did not.
    assert calls == [1, 1, 2, 2]


def test_tied_embeddings_share_one_tensor(config):
    model = LlamaModel(dataclasses.replace(config, tie_embeddings=True))
    assert model.output is None and model.output_weight is model.tok_embeddings.weight
    assert "output.weight" not in model.state_dict()


def test_bfloat16_model_gets_fp32_adapter(config):
    model = add_adapter(LlamaModel(config).to(torch.bfloat16), AdapterConfig(prompt_len=5, layers=2))
    adapter = adapted_layers(model)[3]
    assert adapter.prompt.dtype == adapter.gate.dtype == torch.float32  # small updates are not rounded away
    logits = model(torch.randint(0, config.vocab_size, (1, 11)))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).sum().backward()
    assert adapter.prompt.grad.dtype == torch.float32 and adapter.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.zeros(2, 3)), "tokens must be an integer tensor"),
    (lambda m: m(torch.zeros(3, dtype=torch.long)), r"tokens must have shape \[B, S\]"),
    (lambda m: m(torch.full((1, 3), 97)), r"token ids must lie in \[0, 97\)"),
    (lambda m: m(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
     r"packed tokens .* must have shape \[1, T\]"),
    (lambda m: m(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
     "must run from 0 to the number of packed tokens 4"),
    (lambda m: m(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4])), "must be int32"),
    (lambda m: m(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(5)), "positions must have shape"),
])
def test_bad_calls_are_explained(call, message, config):
    with pytest.raises((TypeError, ValueError), match=message):
        call(LlamaModel(config))


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=3, vocab_size=10, hidden_dim=8)
