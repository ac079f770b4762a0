"""``LlamaConfig``: the dimensions of a LLaMA 1/2/3-family model, the few options that cover its relatives
(Mistral, Qwen2/3, Gemma2/3, Olmo, SmolLM3), and the RoPE frequency scalings (LLaMA-3's, linear, YaRN)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union


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
class LinearRopeScaling:
    """Linear position interpolation ("rope_type": "linear"): every frequency divided by ``factor`` (Gemma3's
    global layers use 8)."""

    factor: float

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"invalid linear RoPE scaling {self}: need factor > 0")


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN ("rope_type": "yarn", arXiv 2309.00071): frequencies that turn fewer than ``beta_slow`` times over
    ``original_max_seq_len`` are divided by ``factor``, those that turn more than ``beta_fast`` times are kept, a
    linear ramp over the dimensions in between; ``cos`` and ``sin`` are multiplied by ``attention_factor``
    (``0.1 ln(factor) + 1`` unless the config gives it), which scales the attention logits by its square.

    ``truncate``: round the ramp's ends to whole dimensions (transformers' default)."""

    factor: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        if self.factor <= 0 or self.original_max_seq_len <= 0 or self.attention_factor <= 0:
            raise ValueError(f"invalid YaRN RoPE scaling {self}: need factor, original_max_seq_len and "
                             f"attention_factor > 0")


#: What ``LlamaConfig.rope_scaling`` may hold (None: plain RoPE).
RopeScaling = Union[Llama3RopeScaling, LinearRopeScaling, YarnRopeScaling]

#: ``LlamaConfig.norm`` values: LLaMA's ``x / rms(x) · w``; Gemma's ``x / rms(x) · (1 + w)``; Olmo's layer norm
#: with neither weight nor bias.
NORMS = ("rmsnorm", "rmsnorm_plus_one", "layernorm_no_params")
#: ``LlamaConfig.mlp_activation`` values: SwiGLU's SiLU, or GeGLU's tanh-approximated GELU (Gemma).
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a LLaMA model.

    Attributes:
        dim: the model (hidden) width.
        n_layers: transformer blocks.
        n_heads: query heads; ``head_dim = dim // n_heads`` unless ``explicit_head_dim`` is set.
        n_kv_heads: key/value heads (``n_heads`` for multi-head attention, fewer for GQA).
        vocab_size: rows of the token embedding and of the output layer.
        hidden_dim: the SwiGLU feed-forward width.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base (10000 for LLaMA 1/2, 500000 for LLaMA 3).
        rope_scaling: RoPE frequency scaling (LLaMA-3.1's, linear or YaRN), or None.
        max_seq_len: the longest sequence the model was trained for (bounds the KV cache).
        tie_embeddings: the output layer shares the token embedding's weight.
        qkv_bias: ``wq``/``wk``/``wv`` have biases (Qwen2); ``wo`` and the feed-forward never do.

    Options for LLaMA's relatives; each default is LLaMA's, and a model with every option at its default runs
    exactly LLaMA's computation (no extra operation):

    Attributes:
        explicit_head_dim: the width of one head when it is not ``dim // n_heads`` (Qwen3, Gemma: 128 or 256).
        norm: the normalisation of every norm layer, one of :data:`NORMS`.
        qk_norm: a norm (of ``norm``'s kind) over the head dimension of the queries and keys, before RoPE
            (Qwen3, Gemma3: ``attention.q_norm``, ``attention.k_norm``); the prompt's keys go through ``k_norm``.
        clip_qkv: clamp q, k and v (and the prompt's keys and values) to ``[-clip_qkv, clip_qkv]`` (Olmo).
        attention_scale: the softmax scale when it is not ``1/sqrt(head_dim)`` (Gemma: query_pre_attn_scalar^-½).
        sandwich_norms: norms on the outputs of the attention and the feed-forward too, before each residual
            addition (Gemma2/3: ``attention_output_norm``, ``ffn_output_norm``).
        mlp_activation: the gate's activation in the feed-forward, one of :data:`MLP_ACTIVATIONS`.
        scale_embeddings: multiply the token embeddings by ``sqrt(dim)`` (Gemma; in the embedding's dtype).
        final_logit_softcap: logits become ``cap · tanh(logits / cap)`` (Gemma2), or None.
        layers_without_rope: indices of layers whose queries and keys get no RoPE (SmolLM3's NoPE layers).
        local_rope_layers: indices of layers that rotate with ``local_rope_theta`` and no scaling (Gemma3's
            sliding-window layers); the others use ``rope_theta`` and ``rope_scaling``.
        local_rope_theta: the RoPE base of ``local_rope_layers``.
        sliding_window: the attention window of the model's sliding layers (Mistral, Qwen2 with
            ``use_sliding_window``, Gemma2/3), or None. The thin model computes full causal attention, exact for
            sequences no longer than the window: ``max_seq_len`` is capped at it and longer sequences are refused.
        family: the Hugging Face ``model_type`` the model was read as (``"llama"`` for llama2.c and Meta
            checkpoints); recorded in adapter files, so that an export can refuse a target that cannot load it.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    explicit_head_dim: Optional[int] = None
    norm: str = "rmsnorm"
    qk_norm: bool = False
    clip_qkv: Optional[float] = None
    attention_scale: Optional[float] = None
    sandwich_norms: bool = False
    mlp_activation: str = "silu"
    scale_embeddings: bool = False
    final_logit_softcap: Optional[float] = None
    layers_without_rope: tuple[int, ...] = ()
    local_rope_layers: tuple[int, ...] = ()
    local_rope_theta: Optional[float] = None
    sliding_window: Optional[int] = None
    family: str = "llama"

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.explicit_head_dim is None and self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}), or explicit_head_dim "
                             f"must be given")
        if self.explicit_head_dim is not None and self.explicit_head_dim <= 0:
            raise ValueError(f"LlamaConfig.explicit_head_dim must be positive, got {self.explicit_head_dim}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.norm not in NORMS:
            raise ValueError(f"LlamaConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"LlamaConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, got "
                             f"{self.mlp_activation!r}")
        if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and
                                                    self.max_seq_len <= self.sliding_window):
            raise ValueError(f"LlamaConfig.sliding_window must be an int >= max_seq_len ({self.max_seq_len}) or "
                             f"None, got {self.sliding_window!r}")
        for name in ("clip_qkv", "attention_scale", "final_logit_softcap", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be positive or None, got {value}")
        for name in ("layers_without_rope", "local_rope_layers"):
            layers = tuple(int(i) for i in getattr(self, name))
            if any(not 0 <= i < self.n_layers for i in layers):
                raise ValueError(f"LlamaConfig.{name} must hold layer indices in [0, {self.n_layers}), got "
                                 f"{list(layers)}")
            object.__setattr__(self, name, layers)
        if self.local_rope_layers and self.local_rope_theta is None:
            raise ValueError("LlamaConfig.local_rope_layers needs local_rope_theta (their RoPE base)")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads


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
