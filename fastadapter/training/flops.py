"""The FLOP model of LLaMA-Adapter: one attention call (:func:`attention_flops`, what the benchmarks' TFLOP/s
divide), and what one epoch of fine-tuning costs with and without sequence packing (``fastadapter plan``, the
GPU acceptance run's MFU); with the one table of GPU peaks (:data:`GPU_PEAKS`) they are measured against.

Attention (flash-attention's benchmark convention, so that TFLOP/s read on the same scale as theirs): two matmuls
(``q kᵀ`` and ``P v``) over every (query, key) pair, ``2·D`` FLOPs each: ``4·B·Hq·Sq·Sk·D``, halved when causal;
the prefix adds ``4·B·Hq·Sq·P·D`` (never masked). The backward does five matmuls for the forward's two (the
recomputed scores, ``dP = dO vᵀ``, ``dv = Pᵀ dO``, ``dq = dS k``, ``dk = dSᵀ q``): 2.5× the forward, forward +
backward 3.5× (flash-attention's ``benchmarks/benchmark_flash_attention.py``). Softmax, masking and the gate are
not counted (O(S²) work, not O(S²·D)).

Counted (multiply-adds as 2 FLOPs; norms, activations, softmax and the loss are negligible and left out):

* forward, every layer: the projections ``wq wk wv wo``, the SwiGLU ``w1 w2 w3``, causal word attention
  (:func:`attention_flops`: ``QKᵀ`` and ``PV`` over ``L²/2`` pairs), and in adapted layers the prefix attention
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
from typing import Iterable, Optional

from ..model.config import LlamaConfig, meta_hidden_dim

@dataclass(frozen=True)
class GpuPeak:
    """A GPU's dense bf16 tensor-core peak (no sparsity) and HBM bandwidth; ``name`` is what
    ``torch.cuda.get_device_name`` contains for it."""

    name: str
    bf16_flops: float
    hbm_bytes_per_s: float


#: The one table of GPU peaks, by the key ``plan --gpu`` takes (H200 has H100's SMs and faster memory).
GPU_PEAKS = {
    "a100": GpuPeak("A100", 312e12, 2.0e12),
    "h100": GpuPeak("H100", 989e12, 3.35e12),
    "h100-pcie": GpuPeak("H100 PCIe", 756e12, 2.0e12),
    "h200": GpuPeak("H200", 989e12, 4.8e12),
}


def gpu_peak(device_name: str) -> Optional[GpuPeak]:
    """The peak of the GPU called ``device_name`` (``NVIDIA H100 PCIe``), the most specific entry of
    :data:`GPU_PEAKS` whose name it contains, or None for a GPU not in the table."""
    matches = [peak for peak in GPU_PEAKS.values() if peak.name in device_name]
    return max(matches, key=lambda peak: len(peak.name)) if matches else None


#: FLOPs of each mode of an attention call as a multiple of the forward's: 2 matmuls forward, 5 backward.
MODE_FACTORS = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}


def attention_flops(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, head_dim: int, prefix_len: int,
                    *, causal: bool = True, mode: str = "forward") -> float:
    """FLOPs of one zero-init attention call.

    Args:
        batch, heads_q, seqlen_q, seqlen_k, head_dim, prefix_len: B, Hq, Sq, Sk, D, P (the kv head count does not
            change the FLOPs: GQA shares keys, every query head still does its own matmuls).
        causal: halve the word part (flash-attention's convention, exact for ``Sq == Sk`` up to the diagonal).
        mode: ``"forward"``, ``"backward"`` or ``"forward+backward"``.

    Returns:
        ``factor(mode) · (4·B·Hq·Sq·Sk·D · (½ if causal) + 4·B·Hq·Sq·P·D)``.
    """
    if mode not in MODE_FACTORS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODE_FACTORS)}")
    for name, value in (("batch", batch), ("heads_q", heads_q), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k),
                        ("head_dim", head_dim), ("prefix_len", prefix_len)):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    words = 4.0 * batch * heads_q * seqlen_q * seqlen_k * head_dim
    if causal:
        words /= 2
    prefix = 4.0 * batch * heads_q * seqlen_q * prefix_len * head_dim
    return MODE_FACTORS[mode] * (words + prefix)


def tflops_per_second(flops: float, milliseconds: float) -> float:
    """Throughput in TFLOP/s of ``flops`` done in ``milliseconds``."""
    if milliseconds <= 0:
        raise ValueError(f"a run takes a positive time, got {milliseconds} ms")
    return flops / (milliseconds * 1e-3) / 1e12


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
    word_attention = attention_flops(1, config.n_heads, L, L, config.head_dim, 0, causal=True)
    prefix_attention = attention_flops(1, config.n_heads, L, 0, config.head_dim, P, causal=False)
    if not include_attention:
        word_attention = prefix_attention = 0
    prompt_projection = 2 * 2 * P * d * kv
    head = 2 * L * d * config.vocab_size

    plain_layer = qkv + out_proj + ffn + word_attention
    adapted_layer = plain_layer + prefix_attention + prompt_projection
    forward = (config.n_layers - adapter_layers) * plain_layer + adapter_layers * adapted_layer + head

    attention_backward = MODE_FACTORS["backward"]
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
    if gpu not in GPU_PEAKS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {sorted(GPU_PEAKS)}")
    if gpus <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"need gpus > 0 and 0 < mfu <= 1, got gpus={gpus}, mfu={mfu}")
    return flops / (gpus * GPU_PEAKS[gpu].bf16_flops * mfu) / 3600
