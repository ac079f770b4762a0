"""``sentencepiece_to_tokenizer_json``: a SentencePiece BPE model (LLaMA 1/2's ``tokenizer.model``) as a Hugging
Face ``tokenizers`` BPE tokenizer that encodes exactly as SentencePiece does.

How SentencePiece's BPE encodes (``add_dummy_prefix``, no extra-whitespace removal, byte fallback, LLaMA's
settings): spaces become ``▁`` and one ``▁`` is put in front of a non-empty text; then, starting from single
characters, the adjacent pair whose concatenation is the vocabulary piece of highest score is merged, again and
again; a character with no piece becomes its UTF-8 byte tokens ``<0xNN>``. The whole text is one sequence (no
pre-splitting at spaces: LLaMA's vocabulary holds pieces made of several ``▁``).

The ``tokenizers`` equivalent built here:

* normalizer ``Prepend("▁")`` (it leaves an empty text empty, as SentencePiece) then ``Replace(" ", "▁")``, and
  **no pre-tokenizer**, so BPE sees the whole text as SentencePiece does;
* a BPE model whose merge list is derived from the scores: every way of writing a piece as the concatenation of
  two pieces is a merge, ranked by the score of the merged piece (highest first; ties by the ids of the merged,
  left and right pieces), so that BPE's lowest-rank-first rule picks the pair SentencePiece picks;
  ``byte_fallback`` and ``fuse_unk`` as SentencePiece;
* the decoder undoes it: ``▁`` back to spaces, byte tokens back to bytes, the leading space of the dummy prefix
  dropped;
* the control pieces (``<unk>``, ``<s>``, ``</s>``) as special added tokens.

Why not transformers' converter: transformers 5.23's ``LlamaTokenizerFast(vocab_file=..., from_slow=True)``
builds a Metaspace pre-tokenizer that splits the text at spaces, and its output matched 1 of llama.cpp's 46
golden strings here; the conversion above matches all 46 (``tests/model/test_tokenizer_hf.py``).
"""
from __future__ import annotations

import json
import os
from typing import Union

SPACE = "\u2581"  # ▁


def sentencepiece_to_tokenizer(model_path: Union[str, os.PathLike]):
    """A ``tokenizers.Tokenizer`` that encodes and decodes as the SentencePiece BPE model at ``model_path``.

    Raises:
        ValueError: the file is not a SentencePiece model, or not a BPE one (unigram models need another
            conversion).
    """
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    path = os.fspath(model_path)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable SentencePiece model ({exc})") from exc
    size = processor.vocab_size()
    pieces = [processor.id_to_piece(i) for i in range(size)]
    scores = [processor.get_score(i) for i in range(size)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != size:
        raise ValueError(f"{path}: the model has duplicate pieces; cannot map it to a BPE vocabulary")
    if not any(processor.is_byte(i) for i in range(size)):
        raise ValueError(f"{path}: the model has no byte pieces <0xNN>; only byte-fallback BPE models (LLaMA's) "
                         f"are converted")
    merges = []
    for merged_id, piece in enumerate(pieces):
        if (processor.is_control(merged_id) or processor.is_unknown(merged_id) or processor.is_byte(merged_id)
                or len(piece) < 2):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[merged_id], merged_id, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = processor.id_to_piece(processor.unk_id()) if processor.unk_id() >= 0 else None
    bpe = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                     byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    controls = [pieces[i] for i in range(size) if processor.is_control(i) or processor.is_unknown(i)]
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    return tokenizer


def write_tokenizer_folder(model_path: Union[str, os.PathLike], folder: Union[str, os.PathLike]) -> str:
    """Write ``tokenizer.json`` (the conversion of :func:`sentencepiece_to_tokenizer`) and a
    ``tokenizer_config.json`` naming BOS, EOS and UNK into ``folder``; returns the ``tokenizer.json`` path."""
    import sentencepiece

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tokenizer = sentencepiece_to_tokenizer(model_path)
    target = os.path.join(folder, "tokenizer.json")
    tokenizer.save(target)
    processor = sentencepiece.SentencePieceProcessor()
    processor.Load(os.fspath(model_path))
    names = {key: processor.id_to_piece(i) for key, i in (("bos_token", processor.bos_id()),
                                                         ("eos_token", processor.eos_id()),
                                                         ("unk_token", processor.unk_id())) if i >= 0}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({**names, "add_bos_token": True, "add_eos_token": False}, f, indent=2)
    return target
