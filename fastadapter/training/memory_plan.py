"""The memory arithmetic behind ``fastadapter plan``: per-GPU bytes of a LLaMA-Adapter fine-tuning run, with the
base in bf16 or quantized (``--quantize``), on one GPU or sharded by FSDP over several (``--fsdp --gpus N``).

What is counted, per GPU (bf16 compute):

* **base weights**: every parameter at 2 bytes (bf16), or its projections quantized — int8: 1 byte a weight plus
  an fp32 scale and an int8 zero point per row; int4 (NF4): half a byte plus an int8 scale per 64 weights and
  the double quantization's fp32 factor per 256 scales — while the embedding, norms and output head stay bf16.
  Under FSDP each rank holds ``1/N`` of it, plus the weights gathered at a time: two blocks (the one running and
  the one prefetched) and the root unit (embedding + head, gathered for the whole forward).
* **adapter**: ``P·dim + Hq`` values per adapted layer, fp32 weight, gradient and AdamW's two moments (16 bytes
  a value), replicated on every rank.
* **activations** saved for backward, per token of the micro-batch (``batch_tokens``), in each adapted layer
  (nothing is saved below the lowest adapted layer: no gradient flows there): the two RMSNorms' fp32 inputs and
  bf16 outputs (``2·6·dim`` bytes), q/k/v (``2·(q_dim + 2·kv_dim)``, ``q_dim = Hq·head_dim``, ``dim`` but for
  Qwen3's and Gemma's heads), the attention output (``2·q_dim``), and
  SwiGLU's four ``hidden``-wide tensors (``8·hidden``). With activation checkpointing only each adapted block's
  input (``2·dim``) is kept, plus one block's full set while it is recomputed.
* **logits** at the loss tokens (``loss_fraction`` of the micro-batch; about half for Alpaca): bf16 logits, their
  fp32 copy and its gradient, ``10·vocab`` bytes a loss token.
* a fixed **overhead** for the CUDA context, the allocator's fragmentation and workspaces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..model.config import LlamaConfig
from ..setting_error import SettingError

GIB = 2 ** 30
#: CUDA context + cuBLAS/NCCL workspaces + allocator slack, assumed per GPU.
OVERHEAD_BYTES = 1.5 * GIB
#: Card sizes ``plan`` reports on (GiB, as the cards' 24/40/80 GB are).
CARDS_GIB = (24, 40, 80)
#: The bases ``plan`` tabulates.
PLAN_MODELS = ("llama-7b", "llama-13b", "llama-65b", "llama2-70b")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one run; ``total`` is their sum."""

    base: float
    gathered: float
    adapter: float
    activations: float
    logits: float
    overhead: float = OVERHEAD_BYTES

    @property
    def total(self) -> float:
        return self.base + self.gathered + self.adapter + self.activations + self.logits + self.overhead


def _block_projection_values(config: LlamaConfig) -> int:
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return config.dim * (2 * q + 2 * kv) + 3 * config.dim * config.hidden_dim


def _projection_bytes(config: LlamaConfig, quantize: Optional[str]) -> float:
    """Bytes of one block's projections stored as ``quantize`` (None: bf16)."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = [(q, config.dim), (kv, config.dim), (kv, config.dim), (config.dim, q),
              (config.hidden_dim, config.dim), (config.dim, config.hidden_dim), (config.hidden_dim, config.dim)]
    total = 0.0
    for rows, cols in shapes:
        values = rows * cols
        if quantize is None:
            total += 2 * values
        elif quantize == "int8":
            total += values + 5 * rows
        elif quantize == "int4":
            total += values / 2 + values / 64 + 4 * values / (64 * 256)
        else:
            raise ValueError(f"unknown quantization {quantize!r}; expected int8 or int4")
    return total


def estimate_memory(config: LlamaConfig, *, batch_tokens: int, adapter_layers: int, prompt_len: int,
                    gpus: int = 1, fsdp: bool = False, quantize: Optional[str] = None,
                    activation_checkpointing: bool = False, loss_fraction: float = 0.5) -> MemoryEstimate:
    """Per-GPU memory of a fine-tuning step (see the module docstring for what each term counts).

    Args:
        config: the base's shape. batch_tokens: tokens of one packed micro-batch on one GPU.
        adapter_layers: top layers adapted (clamped to the model); prompt_len: P.
        gpus: ranks; the base is divided among them only with ``fsdp`` (data parallelism replicates it).
        quantize: None (bf16), ``"int8"`` or ``"int4"``.
        loss_fraction: share of the micro-batch's tokens that carry a loss (their logits are materialised).
    """
    if batch_tokens <= 0 or prompt_len <= 0 or adapter_layers <= 0 or gpus <= 0:
        raise ValueError(f"batch_tokens, prompt_len, adapter_layers and gpus must be positive, got {batch_tokens}, "
                         f"{prompt_len}, {adapter_layers}, {gpus}")
    if fsdp and quantize:
        raise SettingError("FSDP with a quantized base is not supported: pick {fsdp} or {quantize}")
    layers = min(adapter_layers, config.n_layers)
    d, kv, hidden = config.dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    q = config.n_heads * config.head_dim  # d, unless the heads are wider or narrower (Qwen3, Gemma)
    root = 2 * config.vocab_size * d * (1 if config.tie_embeddings else 2) + 2 * d  # embedding, head, norm
    norms = 2 * 2 * d  # two RMSNorm weights per block, bf16
    block = _projection_bytes(config, quantize) + norms
    base = root + config.n_layers * block
    gathered = 0.0
    if fsdp:
        base /= gpus
        bf16_block = 2 * _block_projection_values(config) + norms
        gathered = 2 * bf16_block + root * (gpus - 1) / gpus if gpus > 1 else 0.0
    adapter = 16 * layers * (prompt_len * d + config.n_heads)
    per_token_layer = 12 * d + 2 * (q + 2 * kv) + 2 * q + 8 * hidden
    if activation_checkpointing:
        activations = batch_tokens * (layers * 2 * d + per_token_layer)
    else:
        activations = batch_tokens * layers * per_token_layer
    logits = loss_fraction * batch_tokens * config.vocab_size * 10
    return MemoryEstimate(base=base, gathered=gathered, adapter=adapter, activations=activations, logits=logits)


def fitting_cards(total_bytes: float) -> list[int]:
    """The card sizes of :data:`CARDS_GIB` that hold ``total_bytes``."""
    return [card for card in CARDS_GIB if total_bytes <= card * GIB]
