"""The FLOP model behind ``fastadapter plan``: what one epoch of LLaMA-Adapter fine-tuning costs, with and
without sequence packing.

Counted (multiply-adds as 2 FLOPs; norms, activations, softmax and the loss are negligible and left out):

* forward, every layer: the projections ``wq wk wv wo``, the SwiGLU ``w1 w2 w3``, causal word attention
  (``QKᵀ`` and ``PV`` over the ``L(L+1)/2`` visible pairs), and in adapted layers the prefix attention
  (``L × P`` pairs) and the prompt's ``wk``/``wv`` projection; then the output head.
* backward, only from the head down to the lowest adapted layer, and only *activation* gradients — every base
  weight is frozen, so no ``dW = Xᵀ dY`` is ever computed: each matmul costs one more forward-sized matmul
  (``dX = dY Wᵀ``). Attention's backward costs 2.5× its forward (``dV, dP, dQ, dK`` plus recomputing ``QKᵀ``,
  as flash-style kernels do). In the lowest adapted layer the input needs no gradient, so its ``q, k, v`` need
  none either: only the prefix part of its attention is differentiated, and ``wq wk wv`` get no ``dX``.

Below the lowest adapted layer there is no backward at all (no activation there requires a gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..model.config import LlamaConfig, meta_hidden_dim

#: Peak dense bf16 tensor-core FLOP/s (no sparsity): A100 SXM/PCIe and H100 SXM.
GPU_PEAK_BF16_FLOPS = {"a100": 312e12, "h100": 989e12}

#: The configurations ``plan`` knows by name (Meta's published shapes).
NAMED_CONFIGS = {
    "llama-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                            hidden_dim=meta_hidden_dim(4096), max_seq_len=2048),
    "llama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000,
                             hidden_dim=meta_hidden_dim(5120), max_seq_len=2048),
    "llama-65b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, vocab_size=32000,
                             hidden_dim=meta_hidden_dim(8192), max_seq_len=2048),
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                             hidden_dim=11008, max_seq_len=4096),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000,
                              hidden_dim=13824, max_seq_len=4096),
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                              hidden_dim=28672, max_seq_len=4096),
    "llama3-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                             hidden_dim=14336, rope_theta=500000.0, max_seq_len=8192),
    "llama3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                              hidden_dim=28672, rope_theta=500000.0, max_seq_len=8192),
}


@dataclass(frozen=True)
class SequenceFlops:
    """FLOPs of one sequence: ``forward`` and ``backward`` (activation gradients only)."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def sequence_flops(config: LlamaConfig, length: int, *, adapter_layers: int, prompt_len: int,
                   include_attention: bool = True) -> SequenceFlops:
    """FLOPs of a training step on one sequence of ``length`` tokens (padding, if any, included in ``length``).

    Args:
        adapter_layers: the top layers that are adapted (1 .. n_layers).
        prompt_len: P, the prompt tokens of each adapted layer.
        include_attention: False leaves out the attention core (``QKᵀ``, ``PV`` and their gradients) and
            keeps the matmuls with weights only — what ``torch.utils.flop_counter`` sees of a model whose
            attention is a custom op.
    """
    if not 0 < adapter_layers <= config.n_layers:
        raise ValueError(f"adapter_layers must lie in [1, {config.n_layers}], got {adapter_layers}")
    d, kv, h, L, P = config.dim, config.n_kv_heads * config.head_dim, config.hidden_dim, length, prompt_len
    q = config.n_heads * config.head_dim  # d, unless the heads are wider or narrower (Qwen3, Gemma)
    qkv = 2 * L * (d * q + 2 * d * kv)
    out_proj = 2 * L * q * d
    ffn = 2 * L * 3 * d * h
    word_attention = 2 * 2 * q * (L * (L + 1) / 2)  # QKᵀ and PV over the causal pairs, all heads
    prefix_attention = 2 * 2 * q * L * P
    if not include_attention:
        word_attention = prefix_attention = 0
    prompt_projection = 2 * 2 * P * d * kv
    head = 2 * L * d * config.vocab_size

    plain_layer = qkv + out_proj + ffn + word_attention
    adapted_layer = plain_layer + prefix_attention + prompt_projection
    forward = (config.n_layers - adapter_layers) * plain_layer + adapter_layers * adapted_layer + head

    attention_backward = 2.5
    upper_layer_backward = (qkv + out_proj + ffn + attention_backward * (word_attention + prefix_attention)
                            + prompt_projection)
    lowest_layer_backward = out_proj + ffn + attention_backward * prefix_attention + prompt_projection
    backward = head + (adapter_layers - 1) * upper_layer_backward + lowest_layer_backward
    return SequenceFlops(forward, backward)


def epoch_flops(config: LlamaConfig, lengths: Iterable[int], *, adapter_layers: int, prompt_len: int
                ) -> SequenceFlops:
    """FLOPs of one pass over sequences of ``lengths`` (what the model computes, padding included)."""
    forward = backward = 0.0
    cache: dict[int, SequenceFlops] = {}
    for length in lengths:
        if length not in cache:
            cache[length] = sequence_flops(config, length, adapter_layers=adapter_layers, prompt_len=prompt_len)
        forward += cache[length].forward
        backward += cache[length].backward
    return SequenceFlops(forward, backward)


def padded_lengths(lengths: list[int], *, pad_to: int | None = None, batch_size: int | None = None) -> list[int]:
    """The lengths the model computes when every sequence is padded to ``pad_to`` (the paper: 512), or to the
    longest of its batch of ``batch_size`` (PEFT and Hugging Face's default collators)."""
    if pad_to is not None:
        return [pad_to] * len(lengths)
    if batch_size is None:
        raise ValueError("give pad_to or batch_size")
    padded = []
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i:i + batch_size]
        padded += [max(batch)] * len(batch)
    return padded


def training_hours(flops: float, *, gpu: str, gpus: int, mfu: float) -> float:
    """Wall-clock hours for ``flops`` on ``gpus`` GPUs of kind ``gpu`` running at ``mfu`` of their bf16 peak."""
    if gpu not in GPU_PEAK_BF16_FLOPS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {sorted(GPU_PEAK_BF16_FLOPS)}")
    if gpus <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"need gpus > 0 and 0 < mfu <= 1, got gpus={gpus}, mfu={mfu}")
    return flops / (gpus * GPU_PEAK_BF16_FLOPS[gpu] * mfu) / 3600
