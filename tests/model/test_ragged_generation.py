"""Generation over a ragged KV cache: one attention call per layer per model call whatever the prompts' lengths,
and a batch of prompts of different lengths generating, token for token, what each prompt generates alone (the
real GQA model stories260K, odd lengths, per-sample prompts and gates, on the automatic backend choice and on
sdpa, the fallback of every device)."""
import pytest
import torch

import fastadapter.model.llama as llama_module
from fastadapter import AdapterConfig, add_adapter, generate, load_model, load_tokenizer
from fastadapter.adapters import adapted_layers
from fastadapter.model import KVCache, LlamaModel
from fastadapter.model.layer_adapter import LayerAdapter


@pytest.fixture
def small_config(make_config):
    """GQA (6 query heads over 2 kv heads), head_dim 10, an odd vocabulary, 3 layers."""
    return make_config(dim=60, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=56, max_seq_len=256)


@pytest.fixture
def stories(shared_data):
    model = load_model(shared_data / "stories260K.bin")
    add_adapter(model, AdapterConfig(prompt_len=7, layers=3))
    torch.manual_seed(0)
    with torch.no_grad():
        for adapter in adapted_layers(model).values():
            adapter.gate.uniform_(0.2, 0.8)
    return model, load_tokenizer(shared_data / "tok512.bin")


def _count_attention_calls(monkeypatch):
    calls = []
    dense, varlen = llama_module.zero_init_attention, llama_module.zero_init_attention_varlen

    def counting_dense(q, k, v, *args, **kwargs):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "cu_seqlens": None,
                      "seqused_k": kwargs.get("seqused_k")})
        return dense(q, k, v, *args, **kwargs)

    def counting_varlen(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, *args, **kwargs):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "cu_seqlens": cu_seqlens_q,
                      "seqused_k": kwargs.get("seqused_k")})
        return varlen(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, *args, **kwargs)

    monkeypatch.setattr(llama_module, "zero_init_attention", counting_dense)
    monkeypatch.setattr(llama_module, "zero_init_attention_varlen", counting_varlen)
    return calls


def test_one_attention_call_per_layer_per_step_whatever_the_lengths(monkeypatch, small_config):
    torch.manual_seed(0)
    model = add_adapter(LlamaModel(small_config), AdapterConfig(prompt_len=3, layers=2))
    calls = _count_attention_calls(monkeypatch)
    prompts = [[5] * n for n in (1, 9, 4, 13, 2)]  # five different lengths
    new_tokens = 6
    generate(model, prompts, max_new_tokens=new_tokens)
    layers = small_config.n_layers
    # The old cache grouped rows of equal length: five calls per layer per decoding step here.
    assert len(calls) == layers * new_tokens
    prefill, decode = calls[:layers], calls[layers:]
    assert all(c["q"] == (29, 6, 10) and c["cu_seqlens"].tolist() == [0, 1, 10, 14, 27, 29] for c in prefill)
    for step in range(new_tokens - 1):
        for call in decode[step * layers:(step + 1) * layers]:
            # The whole padded cache up to the longest row, each row read up to its own length.
            assert call["q"] == (5, 1, 6, 10) and call["k"] == (5, 14 + step, 2, 10)
            assert call["seqused_k"].tolist() == [n + 1 + step for n in (1, 9, 4, 13, 2)]


def test_rows_of_equal_length_need_no_per_row_lengths(monkeypatch, small_config):
    model = LlamaModel(small_config)
    calls = _count_attention_calls(monkeypatch)
    generate(model, [[3, 4, 5], [6, 7, 8]], max_new_tokens=3)
    assert all(c["seqused_k"] is None for c in calls[small_config.n_layers:])


@pytest.mark.parametrize("backend", [None, "sdpa"], ids=["automatic", "sdpa"])
def test_ragged_batch_equals_each_prompt_alone_on_stories260k(stories, monkeypatch, backend):
    model, tokenizer = stories
    if backend is not None:
        monkeypatch.setenv("FASTADAPTER_BACKEND", backend)
    texts = ("Once upon a time, there was a", "Tom", "The big red dog ran to the park and saw a cat. The cat",
             "Lily liked to play", "The sun was hot", "One day, a little boy named Tim went")
    prompts = [tokenizer.encode(t) for t in texts]
    assert sorted(len(p) for p in prompts) == [3, 6, 7, 9, 13, 23]
    batched = generate(model, prompts, max_new_tokens=10)
    alone = [generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone and all(len(row) == 10 for row in batched)


def test_ragged_batch_stops_each_row_at_its_own_eos(stories):
    model, tokenizer = stories
    prompts = [tokenizer.encode(t) for t in ("Once upon a time", "Tom went to the", "Lily")]
    free = [generate(model, [p], max_new_tokens=15)[0] for p in prompts]
    eos = free[1][4]  # a token the second row reaches early
    stopped = generate(model, prompts, max_new_tokens=15, eos_id=eos)
    for row, alone in zip(stopped, free):
        assert row == (alone[:alone.index(eos)] if eos in alone else alone)


class PerSampleAdapter(LayerAdapter):
    """One prompt ``[B, P, dim]`` and one gate row ``[B, Hq]`` per sample (as image-conditioned prompts give)."""

    def __init__(self, prompts: torch.Tensor, gates: torch.Tensor):
        super().__init__(prompts.shape[1], prompts.shape[2], gates.shape[1])
        self.prompt = torch.nn.Parameter(prompts.clone())
        self.gate = torch.nn.Parameter(gates.clone())

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[1]

    def prefix_kv(self, wk, wv, n_kv_heads, head_dim, dtype=None):
        prompt = self.prompt.to(dtype or wk.weight.dtype)
        shape = (prompt.shape[0], prompt.shape[1], n_kv_heads, head_dim)
        return wk(prompt).view(shape), wv(prompt).view(shape)


def _with_per_sample_adapters(model, prompts, gates):
    for i, block in enumerate(model.layers):
        block.attention.adapter = PerSampleAdapter(prompts[i], gates[i]) if i in prompts else None
    return model


def test_per_sample_prompts_and_gates_follow_their_rows(stories):
    model, tokenizer = stories
    config = model.config
    prompts = [tokenizer.encode(t) for t in ("Once upon a time", "Tom", "The big red dog ran to the", "Lily")]
    generator = torch.Generator().manual_seed(1)
    layers = list(adapted_layers(model))
    rows = len(prompts)
    per_layer_prompts = {i: torch.randn(rows, 5, config.dim, generator=generator) for i in layers}
    per_layer_gates = {i: torch.rand(rows, config.n_heads, generator=generator) for i in layers}
    _with_per_sample_adapters(model, per_layer_prompts, per_layer_gates)
    batched = generate(model, prompts, max_new_tokens=12)
    alone = []
    for row, prompt in enumerate(prompts):
        _with_per_sample_adapters(model, {i: p[row:row + 1] for i, p in per_layer_prompts.items()},
                                  {i: g[row:row + 1] for i, g in per_layer_gates.items()})
        alone.append(generate(model, [prompt], max_new_tokens=12)[0])
    assert batched == alone
    # The rows' prompts matter: a batch with the rows' prompts swapped generates something else.
    _with_per_sample_adapters(model, {i: p.flip(0) for i, p in per_layer_prompts.items()},
                              {i: g.flip(0) for i, g in per_layer_gates.items()})
    assert generate(model, prompts, max_new_tokens=12) != batched


def test_decoding_steps_of_several_tokens_over_a_ragged_cache_equal_the_full_forward(small_config):
    torch.manual_seed(0)
    model = add_adapter(LlamaModel(small_config), AdapterConfig(prompt_len=4, layers=2))
    with torch.no_grad():
        for adapter in adapted_layers(model).values():
            adapter.gate.fill_(0.5)
    sequences = [torch.randint(0, small_config.vocab_size, (n,)) for n in (11, 3, 8)]
    prompt_lens, step = [5, 1, 6], 2
    cache = KVCache(small_config, len(sequences), 16, dtype=torch.float32)
    cu = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    with torch.no_grad():
        model(torch.cat([s[:n] for s, n in zip(sequences, prompt_lens)])[None], cu_seqlens=cu, cache=cache)
        chunk = torch.stack([s[n:n + step] for s, n in zip(sequences, prompt_lens)])
        got = model(chunk, cache=cache)  # two tokens per row at rows of lengths 5, 1 and 6
        for row, (s, n) in enumerate(zip(sequences, prompt_lens)):
            full = model(s[None, :n + step])[0, n:n + step]
            torch.testing.assert_close(got[row], full, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [7, 3, 8]


def test_cache_misuse_is_explained(small_config):
    model = LlamaModel(small_config)
    cache = KVCache(small_config, 2, 8, dtype=torch.float32)
    with torch.no_grad():
        model(torch.ones(2, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"a packed call fills an empty KV cache .* lengths \[3, 3\]"):
            model(torch.ones(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32),
                  cache=cache)
        with pytest.raises(ValueError, match="the KV cache holds 8 positions per row, a row would reach 9"):
            model(torch.ones(2, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="needs its cache_step"):
            model.layers[0].attention(torch.zeros(2, 1, small_config.dim), torch.ones(1, 1, 5),
                                      torch.zeros(1, 1, 5), cache=cache)
    assert cache.lengths == [3, 3]  # nothing was recorded by the refused calls
