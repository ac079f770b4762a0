"""``generate``: autoregressive decoding with a KV cache — greedy, temperature, top-p, stop at EOS.

A batch of prompts of different lengths needs no padding of its tokens: the prompts are packed into one prefill
call (zero_init_attention's varlen mode) that fills one cache row each, and every decoding step appends one token
to each row at its own position, then attends over the whole padded cache in one call per layer, each row read up
to its own length (``seqused_k``). Each row is therefore computed exactly as if it were generated alone. Each
adapted layer's prefix keys and values (one prompt for the batch, or one per sample) are projected once, at the
prefill, and reused by every step.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from .kv_cache import KVCache
from .llama import LlamaModel


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` unless ``temperature`` is finite and ``>= 0`` and ``top_p`` lies in ``(0, 1]``."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: argmax when ``temperature == 0``, otherwise a sample of
    ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose probability reaches
    ``top_p`` (nucleus sampling). Returns int64 ``[B]``."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token when the tokens more probable than it do not reach top_p yet (the first always stays).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             prompt_offsets: Optional[Mapping[int, torch.Tensor]] = None) -> list[list[int]]:
    """Continue every prompt.

    Args:
        model: the (possibly adapted) model.
        prompts: token ids of each prompt (BOS included if the model wants it); lengths may differ.
        max_new_tokens: tokens to generate per prompt at most.
        temperature, top_p: sampling (``temperature == 0``: greedy); see :func:`sample_next_token`.
        eos_id: stop a row when it produces this token (not included in the result).
        generator: the random generator of sampling (seeded by the caller for reproducible output).
        prompt_offsets: ``{layer: [len(prompts), P or 1, dim]}``, one adaption prompt per prompt (an image's
            features, :func:`fastadapter.vision.generate_with_images`); see :meth:`LlamaModel.forward`.

    Returns:
        The generated tokens of each prompt, in order.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    check_sampling(temperature, top_p)
    config = model.config
    vocab = config.vocab_size
    for index, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {index} holds token ids {bad[:3]} outside the model's vocabulary [0, {vocab}): "
                             f"was it encoded with another model's tokenizer?")
    results: list[list[int]] = [[] for _ in prompts]
    # The last generated token is returned, never fed back: the cache holds prompt + max_new_tokens − 1 positions.
    longest = max(len(p) for p in prompts) + max_new_tokens - 1
    if longest > config.max_seq_len:
        raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens plus {max_new_tokens} new tokens needs "
                         f"{longest} positions, more than the model's max_seq_len {config.max_seq_len}")
    weight = model.tok_embeddings.weight
    cache = KVCache(config, len(prompts), longest, dtype=weight.dtype, device=weight.device)

    lengths = torch.tensor([len(p) for p in prompts])
    cu_seqlens = torch.zeros(len(prompts) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    packed = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=weight.device)[None]
    # The per-prompt prefix K/V are projected at the prefill and kept in the cache for every decoding step.
    extra = {"prompt_offsets": prompt_offsets} if prompt_offsets else {}
    # Only each prompt's last position needs logits: the output head over every prompt token would cost as much
    # as several decoder layers (a [T, V] product) for nothing.
    last_positions = cu_seqlens[1:].long().to(weight.device) - 1
    last = model(packed, cu_seqlens=cu_seqlens.to(weight.device), cache=cache, logits_positions=last_positions,
                 **extra)[0]  # [B, V]

    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        next_tokens = sample_next_token(last, temperature, top_p, generator)
        for row, token in enumerate(next_tokens.tolist()):
            if finished[row]:
                continue
            if eos_id is not None and token == eos_id:
                finished[row] = True
            else:
                results[row].append(token)
        if all(finished) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding (their output is ignored) so every step stays one batched call.
        last = model(next_tokens[:, None], cache=cache)[:, -1]
    return results
