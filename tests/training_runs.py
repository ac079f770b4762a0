"""Tiny training runs for the tests: a random 4-layer LLaMA with an adapter, toy examples it can learn, the CLI
arguments of a stories260K run and the metrics a run writes. Plain functions, not fixtures: the ranks that
``torch.multiprocessing.spawn`` starts call them too."""
import json
import os

import torch

from fastadapter.adapters import AdapterConfig, add_adapter
from fastadapter.model import LlamaModel
from fastadapter.training.data import IGNORE_INDEX, Example
from tiny_llama import tiny_llama_config

#: The model of these runs: the tiny LLaMA (4 layers) at width 32, 4 query heads over 2 kv heads, vocabulary 48,
#: FFN 64, 64 positions.
TINY = tiny_llama_config(dim=32, n_heads=4, n_kv_heads=2, vocab_size=48, hidden_dim=64, max_seq_len=64)


def tiny_adapted_model(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A random 4-layer LLaMA in ``dtype`` with an fp32 adapter on its top ``layers`` layers (same weights for
    the same seed)."""
    torch.manual_seed(seed)
    return add_adapter(LlamaModel(TINY).to(dtype), AdapterConfig(prompt_len=3, layers=layers))


def toy_examples(count: int, seed: int = 0) -> list[Example]:
    """``count`` examples of 6..40 tokens: a random prompt, then a response of token 7s (learnable by a prompt
    on a random model: it only has to shift every response position's logits towards one token)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        n = int(torch.randint(6, 41, (1,), generator=g))
        prompt = int(torch.randint(2, n - 1, (1,), generator=g))
        tokens = [1] + torch.randint(3, TINY.vocab_size, (n - 1,), generator=g).tolist()
        tokens[prompt:] = [7] * (n - prompt)
        labels = [IGNORE_INDEX] * (prompt - 1) + tokens[prompt:] + [2]
        examples.append(Example(tuple(tokens), tuple(labels)))
    return examples


def read_metrics(out) -> list[dict]:
    """The rows of ``out``/metrics.jsonl, one dict a step."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stories_train_args(shared_data, data, out, *extra):
    """``fastadapter train`` arguments: stories260K and tok512 on CPU, ``data`` into ``out``, then ``extra``."""
    return ["train", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--data", str(data), "--out", str(out), "--no-progress", "--device", "cpu", *extra]
