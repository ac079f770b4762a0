"""Hugging Face tokenizer.json files: the SentencePiece conversion against llama.cpp's golden ids (as
SentencePiece itself), special tokens from the folder's configuration, format detection."""
import json

import pytest

from fastadapter import load_tokenizer
from fastadapter.tokenizers.tokenizer import find_tokenizer
from fastadapter.tokenizers.tokenizer_convert import write_tokenizer_folder
from fastadapter.tokenizers.tokenizer_hf import HFTokenizer


@pytest.fixture(scope="module")
def llama_json(shared_data, tmp_path_factory):
    """The real LLaMA SentencePiece model converted to a tokenizer.json folder."""
    folder = tmp_path_factory.mktemp("llama_tokenizer_json")
    write_tokenizer_folder(shared_data / "llama_tokenizer.model", folder)
    return folder


def test_converted_tokenizer_json_reproduces_sentencepiece_golden_ids(llama_json, golden_tokenizations):
    tokenizer = load_tokenizer(llama_json)
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    texts, expected = golden_tokenizations
    assert len(texts) == 46
    matches = sum(tokenizer.encode(text, bos=False) == ids for text, ids in zip(texts, expected))
    assert matches == 46
    for text, ids in zip(texts, expected):
        assert tokenizer.encode(text, bos=False) == ids, repr(text)
        assert tokenizer.decode(ids) == text, repr(text)
    assert tokenizer.encode("Hello world", eos=True) == [1, 15043, 3186, 2]


def test_transformers_reads_the_converted_file_the_same_way(llama_json, golden_tokenizations):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(llama_json / "tokenizer.json"))
    texts, expected = golden_tokenizations
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == expected


def test_special_tokens_come_from_the_folder(llama_json, tmp_path):
    folder = tmp_path / "qwen_like"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((llama_json / "tokenizer.json").read_bytes())
    # Qwen2's layout: no BOS, EOS named in tokenizer_config.json, more stop ids in generation_config.json.
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "</s>", "pad_token": {"content": "<unk>"}, "chat_template": "{{ x }}"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids, tokenizer.pad_id) == (None, 2, [2, 0], 0)
    assert tokenizer.chat_template == "{{ x }}"
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [15043, 3186, 2]

    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    with pytest.raises(ValueError, match=r"bos_token '<\|begin_of_text\|>' of the tokenizer configuration is not a "
                                         r"token of .*tokenizer.json"):
        load_tokenizer(folder)


def test_chat_template_file_and_folder_search(llama_json, tmp_path):
    (llama_json / "chat_template.jinja").write_text("{{ messages }}")
    try:
        assert load_tokenizer(llama_json / "tokenizer.json").chat_template == "{{ messages }}"
    finally:
        (llama_json / "chat_template.jinja").unlink()
    # A model folder with tokenizer.json and tokenizer.model: the tokenizer.json (it has the configuration).
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer(tmp_path).endswith("tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, tokenizer.model, tokenizer.bin in"):
        (tmp_path / "empty").mkdir()
        find_tokenizer(tmp_path / "empty")
