"""``LlamaConfig``: the dimensions of a LLaMA 1/2/3-family model, and LLaMA-3's RoPE frequency scaling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Llama3RopeScaling:
    """LLaMA-3.1's RoPE frequency scaling ("rope_type": "llama3" in Hugging Face configs).

    Wavelengths shorter than ``original_max_seq_len / high_freq_factor`` keep their frequency, longer than
    ``original_max_seq_len / low_freq_factor`` are divided by ``factor``, and those in between are blended.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"invalid LLaMA-3 RoPE scaling {self}: need factor > 0 and "
                             f"high_freq_factor > low_freq_factor > 0")


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a LLaMA model.

    Attributes:
        dim: the model (hidden) width.
        n_layers: transformer blocks.
        n_heads: query heads; ``head_dim = dim // n_heads``.
        n_kv_heads: key/value heads (``n_heads`` for multi-head attention, fewer for GQA).
        vocab_size: rows of the token embedding and of the output layer.
        hidden_dim: the SwiGLU feed-forward width.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base (10000 for LLaMA 1/2, 500000 for LLaMA 3).
        rope_scaling: LLaMA-3.1 frequency scaling, or None.
        max_seq_len: the longest sequence the model was trained for (bounds the KV cache).
        tie_embeddings: the output layer shares the token embedding's weight.
        qkv_bias: ``wq``/``wk``/``wv`` have biases (Qwen2); ``wo`` and the feed-forward never do.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Llama3RopeScaling] = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def meta_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The feed-forward width Meta's LLaMA code derives from ``params.json``: 2/3 of 4·dim, optionally
    scaled, rounded up to a multiple of ``multiple_of`` (11008 for LLaMA-7B)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


#: LLaMA-7B (v1), the configuration of the LLaMA-Adapter paper.
LLAMA_7B = LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                       hidden_dim=meta_hidden_dim(4096), norm_eps=1e-6, max_seq_len=2048)
