"""Tokenizers: LLaMA's SentencePiece model against llama.cpp's golden ids, llama2.c's tok512.bin against a
direct transcription of llama2.c's quadratic merge loop, decode round trips, format detection."""
import json
import struct

import pytest

from fastadapter import load_tokenizer
from fastadapter.tokenizers.tokenizer_llama2c import Llama2cTokenizer
from fastadapter.tokenizers.tokenizer_spm import SentencePieceTokenizer


def test_sentencepiece_reproduces_llama_cpp_golden_ids(shared_data, golden_tokenizations):
    tokenizer = load_tokenizer(shared_data / "llama_tokenizer.model")
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    texts, expected = golden_tokenizations
    assert len(texts) == 46
    for text, ids in zip(texts, expected):
        assert tokenizer.encode(text, bos=False) == ids, repr(text)
        assert tokenizer.decode(ids) == text, repr(text)
    assert tokenizer.encode("Hello world", eos=True) == [1, 15043, 3186, 2]


def _llama2c_encode_quadratic(pieces, scores, text):
    """llama2.c's ``encode`` transcribed literally: rescan all pairs after every merge."""
    ids = {}
    for i, piece in enumerate(pieces):
        ids.setdefault(piece, i)
    tokens = [ids[b" "]] if text else []
    for char in text:
        encoded = char.encode("utf-8")
        tokens += [ids[encoded]] if encoded in ids else [b + 3 for b in encoded]
    while True:
        best_score, best_id, best_index = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = ids.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if merged != -1 and scores[merged] > best_score:
                best_score, best_id, best_index = scores[merged], merged, i
        if best_index == -1:
            return tokens
        tokens[best_index:best_index + 2] = [best_id]


def test_llama2c_merges_equal_llama2c_algorithm(shared_data):
    tokenizer = load_tokenizer(shared_data / "tok512.bin")
    assert isinstance(tokenizer, Llama2cTokenizer) and tokenizer.vocab_size == 512
    rows = json.loads((shared_data / "alpaca_tiny.json").read_text(encoding="utf-8"))[:12]
    texts = [r["instruction"] + " " + r["output"] for r in rows]
    texts += ["", " ", "  leading spaces", "Once upon a time, there was a little girl named Lily.",
              "Führer ½ 🦙 нещо\ttab\nnewline", "aaaaaaaaaaaa", "the the the"]
    for text in texts:
        assert tokenizer.encode(text, bos=False) == _llama2c_encode_quadratic(
            tokenizer.pieces, tokenizer.scores, text), repr(text)


def test_llama2c_known_ids_and_round_trip(shared_data):
    tokenizer = load_tokenizer(shared_data / "tok512.bin")
    story = "Once upon a time, there was a little girl named Lily."
    ids = tokenizer.encode(story)
    assert ids[:4] == [1, 403, 407, 261] and ids[0] == tokenizer.bos_id
    assert tokenizer.encode(story, bos=False, eos=True)[-1] == tokenizer.eos_id
    for text in [story, " two  spaces ", "Führer ½ 🦙\n", ""]:
        assert tokenizer.decode(tokenizer.encode(text, eos=True)) == text


def test_bad_tokenizer_files(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="garbage.model: neither a SentencePiece .model nor a llama2.c"):
        load_tokenizer(garbage)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((shared_data / "tok512.bin").read_bytes()[:3001])
    with pytest.raises(ValueError, match="truncated.bin: (truncated|corrupt) llama2.c tokenizer"):
        load_tokenizer(truncated)
    small = tmp_path / "small.bin"
    small.write_bytes(struct.pack("<i", 4) + struct.pack("<fi", 0.0, 1) + b"a")
    with pytest.raises(ValueError, match="only 1 tokens"):
        load_tokenizer(small)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_tokenizer(shared_data / "tok512.bin").decode([512])
