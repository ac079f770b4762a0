"""Tokenizers: llama2.c's ``tokenizer.bin``, SentencePiece ``.model``, Hugging Face ``tokenizer.json`` and the
vocabulary inside a GGUF file (:func:`load_tokenizer` picks one from the path)."""
from .tokenizer import load_tokenizer

__all__ = ["load_tokenizer"]
