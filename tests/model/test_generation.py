"""Generation: stories260K against an independent numpy transcription of llama2.c's run.c, the prefix projected once
per call, EOS, sampling, and the ``fastadapter generate`` CLI (batches of prompts of different lengths:
test_ragged_generation.py)."""
import numpy as np
import pytest
import torch

from fastadapter import AdapterConfig, add_adapter, generate, load_model, load_tokenizer, save_adapter
from fastadapter.cli import main as cli_main
from fastadapter.adapters import adapted_layers
from fastadapter.model import LlamaModel, sample_next_token
from fastadapter.model.layer_adapter import LayerAdapter

STORY_START = "Once upon a time, there was a little girl named Lily."


class RunC:
    """llama2.c's run.c forward pass, in numpy float32, reading the legacy .bin on its own."""

    def __init__(self, path):
        raw = np.fromfile(path, dtype=np.uint8)
        (self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv_heads, vocab,
         self.seq_len) = raw[:28].view("<i4").tolist()
        self.vocab = abs(vocab)
        floats = raw[28:].view("<f4")
        head = self.dim // self.n_heads
        kv_dim = self.n_kv_heads * head
        shapes = [("emb", (self.vocab, self.dim)), ("rms_att", (self.n_layers, self.dim)),
                  ("wq", (self.n_layers, self.dim, self.dim)), ("wk", (self.n_layers, kv_dim, self.dim)),
                  ("wv", (self.n_layers, kv_dim, self.dim)), ("wo", (self.n_layers, self.dim, self.dim)),
                  ("rms_ffn", (self.n_layers, self.dim)), ("w1", (self.n_layers, self.hidden, self.dim)),
                  ("w2", (self.n_layers, self.dim, self.hidden)), ("w3", (self.n_layers, self.hidden, self.dim)),
                  ("rms_final", (self.dim,))]
        self.w, at = {}, 0
        for name, shape in shapes:
            size = int(np.prod(shape))
            self.w[name] = floats[at:at + size].reshape(shape)
            at += size
        at += 2 * self.seq_len * head // 2  # freq_cis_real/imag
        self.w["wcls"] = self.w["emb"] if vocab > 0 else floats[at:at + self.vocab * self.dim].reshape(
            self.vocab, self.dim)
        self.key_cache = np.zeros((self.n_layers, self.seq_len, kv_dim), np.float32)
        self.value_cache = np.zeros_like(self.key_cache)

    @staticmethod
    def rmsnorm(x, weight):
        ss = np.float32(np.dot(x, x) / x.size + 1e-5)
        return weight * (x / np.sqrt(ss))

    def forward(self, token, pos):
        w, dim = self.w, self.dim
        head = dim // self.n_heads
        kv_mul = self.n_heads // self.n_kv_heads
        kv_dim = self.n_kv_heads * head
        x = w["emb"][token].copy()
        for layer in range(self.n_layers):
            xb = self.rmsnorm(x, w["rms_att"][layer])
            q, k, v = w["wq"][layer] @ xb, w["wk"][layer] @ xb, w["wv"][layer] @ xb
            for i in range(0, dim, 2):  # RoPE on adjacent pairs, k only on its kv_dim
                freq = np.float32(1.0) / np.float32(10000.0) ** np.float32((i % head) / head)
                angle = np.float32(pos * freq)
                fcr, fci = np.cos(angle), np.sin(angle)
                for vec in (q, k) if i < kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            self.key_cache[layer, pos], self.value_cache[layer, pos] = k, v
            out = np.zeros(dim, np.float32)
            for h in range(self.n_heads):
                kvh = (h // kv_mul) * head
                keys = self.key_cache[layer, :pos + 1, kvh:kvh + head]
                scores = keys @ q[h * head:(h + 1) * head] / np.sqrt(np.float32(head))
                scores = np.exp(scores - scores.max())
                scores /= scores.sum()
                out[h * head:(h + 1) * head] = scores @ self.value_cache[layer, :pos + 1, kvh:kvh + head]
            x = x + w["wo"][layer] @ out
            xb = self.rmsnorm(x, w["rms_ffn"][layer])
            h1, h3 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ ((h1 / (1 + np.exp(-h1))) * h3)
        return w["wcls"] @ self.rmsnorm(x, w["rms_final"])

    def greedy(self, steps):
        token, out = 1, []
        for pos in range(steps):
            token = int(np.argmax(self.forward(token, pos)))
            out.append(token)
        return out


@pytest.fixture
def stories(shared_data):
    return load_model(shared_data / "stories260K.bin"), load_tokenizer(shared_data / "tok512.bin")


@pytest.fixture
def one_layer_config(make_config):
    """One layer of width 32 (2 heads, no GQA), vocabulary 50, FFN 48, 32 positions: a model to be refused."""
    return make_config(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=50, hidden_dim=48, max_seq_len=32)


def test_greedy_stories260k_equals_run_c(stories, shared_data):
    model, tokenizer = stories
    ours = generate(model, [[tokenizer.bos_id]], max_new_tokens=48)[0]
    reference = RunC(shared_data / "stories260K.bin").greedy(48)
    assert ours == reference
    assert tokenizer.decode(ours).startswith(STORY_START)


def test_logits_equal_run_c_logits(stories, shared_data):
    model, _ = stories
    run_c = RunC(shared_data / "stories260K.bin")
    tokens = [1, 403, 407, 261, 378, 432, 383]
    expected = np.stack([run_c.forward(t, pos) for pos, t in enumerate(tokens)])
    with torch.no_grad():
        got = model(torch.tensor([tokens]))[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_prefix_projected_once_per_generate_call(monkeypatch, make_config):
    model = add_adapter(LlamaModel(make_config(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50,
                                               hidden_dim=40, max_seq_len=64)), AdapterConfig(prompt_len=3, layers=2))
    calls = []
    project = LayerAdapter.prefix_kv
    monkeypatch.setattr(LayerAdapter, "prefix_kv", lambda self, *a: calls.append(self) or project(self, *a))
    generate(model, [[1, 2, 3], [4]], max_new_tokens=9)
    assert len(calls) == 2  # one per adapted layer, not one per step
    generate(model, [[1, 2, 3]], max_new_tokens=2)
    assert len(calls) == 4


def test_stops_at_eos_and_respects_max_seq_len(stories):
    model, _ = stories
    free = generate(model, [[1]], max_new_tokens=12)[0]
    eos = free[5]
    stopped = generate(model, [[1], [1, free[0], free[1]]], max_new_tokens=12, eos_id=eos)
    assert stopped[0] == free[:free.index(eos)]
    assert eos not in stopped[1] and len(stopped[1]) <= 12
    assert len(generate(model, [[1] * 500], max_new_tokens=13)[0]) == 13  # 512 positions: the whole context
    with pytest.raises(ValueError, match="needs 513 positions, more than the model's max_seq_len 512"):
        generate(model, [[1] * 500], max_new_tokens=14)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]])


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2000))
    picks = sample_next_token(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=4)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > counts[1] > 0  # nucleus {0, 1} reaches 0.8
    again = sample_next_token(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picks, again)
    assert sample_next_token(logits, temperature=1.0, top_p=0.4).eq(0).all()  # the top token alone
    assert sample_next_token(logits[:1], temperature=0.0).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, temperature=1.0, top_p=0.0)


def test_cli_generate_prints_the_continuation(shared_data, capsys, tmp_path):
    args = ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--prompt", "Once upon a time", "--max-new-tokens", "12"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.startswith(", there was a little girl named Lily.")
    assert cli_main(args + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert cli_main(args + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_cli_generate_with_an_adapter(shared_data, capsys, tmp_path, stories):
    model, _ = stories
    args = ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--prompt", "Once upon a time", "--max-new-tokens", "16"]
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    add_adapter(model, AdapterConfig(prompt_len=4, layers=5))
    save_adapter(model, tmp_path / "zero.safetensors")  # zero gates: the base model's continuation
    with torch.no_grad():
        for adapter in adapted_layers(model).values():
            adapter.gate.fill_(3.0)
    save_adapter(model, tmp_path / "open.safetensors")
    assert cli_main(args + ["--adapter", str(tmp_path / "zero.safetensors")]) == 0
    assert capsys.readouterr().out == plain
    assert cli_main(args + ["--adapter", str(tmp_path / "open.safetensors")]) == 0
    assert capsys.readouterr().out != plain


def test_cli_generate_alpaca_template(shared_data, capsys):
    from fastadapter.training.prompt import format_prompt

    args = ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--max-new-tokens", "16"]
    instruction, context = "Give three tips for staying healthy.", "Tom is a dog."
    for input_args, templated in (([], format_prompt(instruction)),
                                  (["--input", context], format_prompt(instruction, context))):
        assert cli_main(args + ["--prompt", instruction, "--template", "alpaca", *input_args]) == 0
        with_template = capsys.readouterr().out
        assert cli_main(args + ["--prompt", templated, "--template", "none"]) == 0
        assert with_template == capsys.readouterr().out and with_template.strip()
    assert cli_main(args + ["--prompt", instruction]) == 0  # the default: the prompt as it is
    raw = capsys.readouterr()
    assert raw.out != with_template and not raw.err
    assert cli_main(args + ["--prompt", instruction, "--input", context]) == 2
    assert capsys.readouterr().err == ("fastadapter generate: error: --input is the Alpaca input field: it needs "
                                       "--template alpaca\n")


def test_cli_generate_notes_the_template_with_an_adapter(shared_data, capsys, tmp_path, stories):
    model, _ = stories
    add_adapter(model, AdapterConfig(prompt_len=4, layers=5))
    save_adapter(model, tmp_path / "adapter.safetensors")
    args = ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--adapter", str(tmp_path / "adapter.safetensors"), "--prompt", "Name a colour.", "--max-new-tokens", "4"]
    assert cli_main(args) == 0
    assert "expects --template alpaca" in capsys.readouterr().err
    assert cli_main(args + ["--template", "alpaca"]) == 0
    assert not capsys.readouterr().err
    missing = [str(tmp_path / "missing.safetensors") if a == str(tmp_path / "adapter.safetensors") else a for a in args]
    assert cli_main(missing) == 2
    assert "fastadapter generate: error: " in capsys.readouterr().err


def test_cli_generate_gate_activation_of_a_v1_adapter(shared_data, capsys, tmp_path, stories):
    """The v1 import says which activation it used and why; --gate-activation none runs the raw gate of the original
    inference code (what a model adapted with gate_activation="none" generates)."""
    model, tokenizer = stories
    add_adapter(model, AdapterConfig(prompt_len=4, layers=5, gate_activation="none"))
    torch.manual_seed(0)
    with torch.no_grad():
        for adapter in adapted_layers(model).values():
            adapter.gate.uniform_(1.5, 3.0)  # far from tanh's range: the two activations generate differently
    state = {"adapter_query.weight": torch.cat([a.prompt.detach() for a in adapted_layers(model).values()])}
    for i, adapter in adapted_layers(model).items():
        state[f"layers.{i}.attention.gate"] = adapter.gate.detach().reshape(1, -1, 1, 1).clone()
    torch.save(state, tmp_path / "llama_adapter_len4_layer5.pth")
    args = ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--adapter", str(tmp_path / "llama_adapter_len4_layer5.pth"), "--prompt", "Once upon a time",
            "--template", "none", "--max-new-tokens", "12"]
    assert cli_main(args) == 0
    default = capsys.readouterr()
    assert "note: llama_adapter_v1 adapter" in default.err
    assert "gates applied as tanh(gate), as the original LLaMA-Adapter v1 training code" in default.err
    assert cli_main(args + ["--gate-activation", "none"]) == 0
    raw = capsys.readouterr()
    assert "gates applied as the raw gate, as the caller asked" in raw.err
    prompt = tokenizer.encode("Once upon a time", bos=True)
    expected = tokenizer.decode(prompt + generate(model, [prompt], max_new_tokens=12)[0])
    assert raw.out.strip() and expected.endswith(raw.out.rstrip("\n")) and raw.out != default.out
    no_adapter = [a for a in args if a not in ("--adapter", str(tmp_path / "llama_adapter_len4_layer5.pth"))]
    assert cli_main(no_adapter + ["--gate-activation", "none"]) == 2
    assert ("fastadapter generate: error: --gate-activation says how an --adapter's gates are applied; no "
            "--adapter was given") in capsys.readouterr().err


def test_the_default_tokenizer_is_found_beside_the_model_by_train_and_generate(tmp_path):
    from fastadapter.commands import _paths, generate as generate_command, train as train_command

    assert train_command._default_tokenizer is _paths.default_tokenizer
    assert generate_command.default_tokenizer is _paths.default_tokenizer
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no tokenizer given and no tokenizer.json, tokenizer.model, "
                                                "tokenizer.bin in"):
        _paths.default_tokenizer(str(tmp_path / "model.bin"))
    (tmp_path / "tokenizer.bin").write_bytes(b"")
    assert _paths.default_tokenizer(str(tmp_path / "model.bin")) == str(tmp_path / "tokenizer.bin")
    (tmp_path / "tokenizer.model").write_bytes(b"")  # SentencePiece first
    assert _paths.default_tokenizer(str(tmp_path)) == str(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
    ({"max_new_tokens": -2}, "max_new_tokens must be a positive int, got -2"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a positive int, got 2.5"),
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0 \(0: greedy\), got -0.5"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\], got 1.01"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\], got nan"),
], ids=lambda v: str(v))
def test_generation_settings_out_of_range(settings, message, one_layer_config):
    """Checked before any forward pass (a NaN temperature sampled from NaN probabilities; 0 new tokens was an
    empty answer, negative ones too)."""
    model = LlamaModel(one_layer_config)
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2, 3]], **{"max_new_tokens": 4, **settings})


def test_prompt_ids_outside_the_vocabulary_are_refused(one_layer_config):
    model = LlamaModel(one_layer_config)
    with pytest.raises(ValueError, match=r"prompt 1 holds token ids \[50, -1\] outside the model's vocabulary "
                                         r"\[0, 50\): was it encoded with another model's tokenizer\?"):
        generate(model, [[1, 2], [3, 50, -1]], max_new_tokens=2)


def test_cli_generate_an_empty_prompt_samples_from_bos_as_run_c(shared_data, capsys, stories):
    """`--prompt ""` was refused; llama2.c's run samples from BOS alone (unconditional generation of a base model).
    The CLI now prints run.c's greedy continuation of BOS; with a template an empty instruction is still refused."""
    _, tokenizer = stories
    reference = RunC(shared_data / "stories260K.bin").greedy(40)
    if tokenizer.eos_id in reference:
        reference = reference[:reference.index(tokenizer.eos_id)]
    args = ["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--prompt", "", "--max-new-tokens", "40"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert out == tokenizer.decode(reference) + "\n" and out.startswith(STORY_START)
    assert cli_main(args + ["--template", "alpaca"]) == 2
    assert "--prompt is empty; with --template alpaca it is the instruction" in capsys.readouterr().err
