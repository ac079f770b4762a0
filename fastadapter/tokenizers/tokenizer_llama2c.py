"""llama2.c's tokenizer (``tokenizer.bin``, e.g. ``tok512.bin``): its file format and its score-greedy merges.

File: int32 ``max_token_length``, then for every token: float32 score, int32 byte length, the bytes. Ids 0, 1, 2
are ``<unk>``, BOS and EOS; tokens spelled ``<0xNN>`` stand for raw bytes.

Encoding, as llama2.c's ``encode``: a space is put in front of non-empty text (SentencePiece's dummy prefix),
every UTF-8 character becomes its token (or its bytes' tokens when it has none), then the adjacent pair whose
concatenation is the highest-scoring token is merged, the leftmost on ties, until no pair is a token. A heap of
candidate pairs makes that ``O(n log n)`` instead of llama2.c's ``O(n²)`` rescans, with the same result.
"""
from __future__ import annotations

import heapq
import os
import re
import struct

_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cTokenizer:
    """A llama2.c ``tokenizer.bin``.

    Attributes:
        pieces: the bytes of every token, by id.
        scores: the merge score of every token.
    """

    bos_id = 1
    eos_id = 2

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        self.path = path
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        offset = 4
        if len(data) < 4:
            raise ValueError(f"{path}: truncated llama2.c tokenizer: no header")
        while offset < len(data):
            if offset + 8 > len(data):
                raise ValueError(f"{path}: truncated llama2.c tokenizer: token {len(self.pieces)} has no score and "
                                 f"length")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise ValueError(f"{path}: corrupt llama2.c tokenizer: token {len(self.pieces)} claims {length} "
                                 f"bytes at offset {offset} of {len(data)}")
            self.pieces.append(data[offset:offset + length])
            self.scores.append(score)
            offset += length
        if len(self.pieces) < 259:
            raise ValueError(f"{path}: a llama2.c tokenizer has <unk>, BOS, EOS and 256 byte tokens, this one has "
                             f"only {len(self.pieces)} tokens")
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)
        self._byte_values = {i: int(m.group(1), 16) for i, p in enumerate(self.pieces)
                             if (m := _BYTE_PIECE.match(p))}
        self._byte_token = {value: i for i, value in self._byte_values.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _initial_tokens(self, text: str) -> list[int]:
        tokens = []
        if text:
            tokens.append(self._ids[b" "])
        for char in text:
            encoded = char.encode("utf-8")
            if encoded in self._ids:
                tokens.append(self._ids[encoded])
            else:  # byte fallback
                tokens.extend(self._byte_token[b] for b in encoded)
        return tokens

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (with BOS first and EOS last when asked)."""
        tokens = self._initial_tokens(text)
        # A doubly linked list over the tokens; a merged pair keeps the left node, so original indices stay in
        # sequence order and the smallest index on the heap is the leftmost pair, as llama2.c's scan finds it.
        nxt = list(range(1, len(tokens))) + [-1]
        prv = [-1] + list(range(len(tokens) - 1))
        alive = [True] * len(tokens)
        heap: list[tuple[float, int, bytes]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right == -1:
                return
            merged = self.pieces[tokens[left]] + self.pieces[tokens[right]]
            if merged in self._ids:
                heapq.heappush(heap, (-self.scores[self._ids[merged]], left, merged))

        for i in range(len(tokens) - 1):
            push(i)
        while heap:
            _, left, merged = heapq.heappop(heap)
            right = nxt[left] if alive[left] else -1
            if right == -1 or self.pieces[tokens[left]] + self.pieces[tokens[right]] != merged:
                continue  # stale: one side was merged since this pair was pushed
            tokens[left] = self._ids[merged]
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prv[nxt[right]] = left
            push(left)
            if prv[left] != -1:
                push(prv[left])
        ids = [t for t, keep in zip(tokens, alive) if keep]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``: special tokens dropped, byte tokens joined, the dummy-prefix space removed."""
        out = bytearray()
        for i in ids:
            if not 0 <= i < len(self.pieces):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.pieces)})")
            if i in (0, self.bos_id, self.eos_id):
                continue
            out += bytes([self._byte_values[i]]) if i in self._byte_values else self.pieces[i]
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text
