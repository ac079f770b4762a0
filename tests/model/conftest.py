"""Fixtures of the model tests."""
import pytest

#: How llama.cpp's vocabulary test files separate their texts.
GOLDEN_SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="session")
def golden_tokenizations(shared_data) -> tuple[list[str], list[list[int]]]:
    """``(texts, ids)``: llama.cpp's 46 golden texts and the ids LLaMA's SentencePiece model gives them."""
    texts = (shared_data / "llama_spm_golden.inp").read_text(encoding="utf-8").split(GOLDEN_SEPARATOR)
    ids = (shared_data / "llama_spm_golden.out").read_text(encoding="utf-8").split("\n")
    texts = texts[:-1] if texts[-1] == "" else texts  # the file ends with a separator
    return texts, [[int(x) for x in line.split()] for line in ids[:len(texts)]]
