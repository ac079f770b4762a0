"""The tiny thin-LLaMA the model tests share, and a model written as llama2.c's file (independently of the
loaders)."""
import numpy as np
import torch

from fastadapter.model import LlamaConfig, LlamaModel


def tiny_llama_config(**changes) -> LlamaConfig:
    """4 layers of width 80: 8 query heads over 4 kv heads (GQA) of head dim 10, vocabulary 97, FFN 72; ``changes``
    replace any field (a test that needs other values says which)."""
    return LlamaConfig(**{**dict(dim=80, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=97, hidden_dim=72),
                          **changes})


def write_llama2c(path, model: LlamaModel):
    """llama2.c's export format (legacy version 0), written independently of the loader."""
    c, sd = model.config, model.state_dict()
    stacked = lambda name: torch.stack([sd[f"layers.{i}.{name}"] for i in range(c.n_layers)])  # noqa: E731
    vocab = c.vocab_size if c.tie_embeddings else -c.vocab_size
    arrays = [sd["tok_embeddings.weight"], stacked("attention_norm.weight"), stacked("attention.wq.weight"),
              stacked("attention.wk.weight"), stacked("attention.wv.weight"), stacked("attention.wo.weight"),
              stacked("ffn_norm.weight"), stacked("feed_forward.w1.weight"), stacked("feed_forward.w2.weight"),
              stacked("feed_forward.w3.weight"), sd["norm.weight"], torch.zeros(2, c.max_seq_len, c.head_dim // 2)]
    if not c.tie_embeddings:
        arrays.append(sd["output.weight"])
    header = np.array([c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, vocab, c.max_seq_len], "<i4")
    path.write_bytes(header.tobytes() + b"".join(a.numpy().astype("<f4").tobytes() for a in arrays))
