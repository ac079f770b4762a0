"""The implementations people run today (DESIGN.md §3), written as they are, for the benchmarks.

Every function takes fastadapter's layout — q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``,
prefix_k/prefix_v ``[Bp, P, Hkv, D]``, gate ``[Hq]`` or ``[1]`` — is causal bottom-right aligned and returns
``[B, Sq, Hq, D]``. They are differentiable by autograd (no hand-written backward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _bhsd_kv(t: torch.Tensor, group: int, batch: int) -> torch.Tensor:
    """``[Bx, S, Hkv, D]`` -> ``[batch, Hq, S, D]``, kv heads repeated for GQA (as the originals do)."""
    return t.transpose(1, 2).expand(batch, -1, -1, -1).repeat_interleave(group, dim=1)


def _causal_mask(seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    row = torch.arange(seqlen_q, device=device)[:, None]
    col = torch.arange(seqlen_k, device=device)[None, :]
    return col > row + seqlen_k - seqlen_q


def eager_v1(q, k, v, prefix_k, prefix_v, gate, gate_tanh: bool = True):
    """Original LLaMA-Adapter v1: prefix and word scores concatenated in one fp32 ``[B, H, Sq, P+Sk]`` matrix,
    a softmax over each slice, the prefix probabilities scaled by the gate, one matmul with cat(pv, v)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    group = heads_q // k.shape[2]
    seqlen_k, prefix_len = k.shape[1], prefix_k.shape[1]
    qh = q.transpose(1, 2)
    keys = torch.cat([_bhsd_kv(prefix_k, group, batch), _bhsd_kv(k, group, batch)], dim=2)
    values = torch.cat([_bhsd_kv(prefix_v, group, batch), _bhsd_kv(v, group, batch)], dim=2)
    scores = torch.matmul(qh, keys.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.zeros(seqlen_q, prefix_len + seqlen_k, device=q.device)
    mask[:, prefix_len:] = mask[:, prefix_len:].masked_fill(_causal_mask(seqlen_q, seqlen_k, q.device),
                                                            float("-inf"))
    scores = scores + mask
    gamma = (torch.tanh(gate) if gate_tanh else gate).to(qh.dtype).reshape(1, -1, 1, 1)  # the model's dtype
    scores = torch.cat([gamma * F.softmax(scores[..., :prefix_len].float(), dim=-1).type_as(qh),
                        F.softmax(scores[..., prefix_len:].float(), dim=-1).type_as(qh)], dim=-1)
    return torch.matmul(scores, values).transpose(1, 2)


def peft_style(q, k, v, prefix_k, prefix_v, gate, gate_tanh: bool = False):
    """PEFT adaption_prompt: the base model's attention (SDPA here), then a separate eager prefix attention
    whose scores are upcast to fp32, scaled by the (raw) gate and added."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    group = heads_q // k.shape[2]
    qh = q.transpose(1, 2)
    base = F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
                                          attn_mask=None if seqlen_q == k.shape[1] else
                                          ~_causal_mask(seqlen_q, k.shape[1], q.device),
                                          is_causal=seqlen_q == k.shape[1])
    pk, pv = _bhsd_kv(prefix_k, group, batch), _bhsd_kv(prefix_v, group, batch)
    scores = torch.matmul(qh, pk.transpose(2, 3)) / math.sqrt(head_dim)
    scores = (torch.tanh(gate) if gate_tanh else gate).to(qh.dtype).reshape(1, -1, 1, 1) * F.softmax(
        scores, dim=-1, dtype=torch.float32).to(qh.dtype)
    return (base + torch.matmul(scores, pv)).transpose(1, 2)


def two_sdpa(q, k, v, prefix_k, prefix_v, gate, gate_tanh: bool = True):
    """litgpt / LLaMA-Adapter V2: ``sdpa(q, k, v, causal) + γ · sdpa(q, pk, pv)``."""
    from fastadapter.backends.sdpa import sdpa_composition
    gate_rows = gate.float().reshape(1, -1).expand(1, q.shape[2])
    return sdpa_composition(q, k, v, prefix_k, prefix_v, gate_rows, True, 1.0 / math.sqrt(q.shape[-1]),
                            gate_tanh)


def two_flash_attn(q, k, v, prefix_k, prefix_v, gate, gate_tanh: bool = True):
    """LLaMA2-Accessory: two ``flash_attn_func`` calls (CUDA, fp16/bf16, flash-attn installed)."""
    from flash_attn import flash_attn_func
    batch = q.shape[0]
    out = flash_attn_func(q, k, v, causal=True)
    if prefix_k.shape[1] == 0:  # P == 0: plain attention (flash_attn_func rejects an empty key sequence)
        return out
    out_p = flash_attn_func(q, prefix_k.expand(batch, -1, -1, -1), prefix_v.expand(batch, -1, -1, -1))
    gamma = (torch.tanh(gate) if gate_tanh else gate).to(q.dtype).reshape(1, 1, -1, 1)
    return out + gamma * out_p


def xformers_mea(q, k, v, prefix_k, prefix_v, gate, gate_tanh: bool = True):
    """Two ``xformers.ops.memory_efficient_attention`` calls (CUDA, xformers installed)."""
    import xformers.ops as xops
    batch, _, heads_q, _ = q.shape
    group = heads_q // k.shape[2]

    def expand(t):  # xformers wants explicit GQA groups: [B, S, G, Hkv... ] -> repeat to Hq
        return t.expand(batch, -1, -1, -1).repeat_interleave(group, dim=2)

    bias = xops.LowerTriangularFromBottomRightMask() if q.shape[1] != k.shape[1] else xops.LowerTriangularMask()
    out = xops.memory_efficient_attention(q, expand(k), expand(v), attn_bias=bias)
    if prefix_k.shape[1] == 0:  # P == 0: plain attention
        return out
    out_p = xops.memory_efficient_attention(q, expand(prefix_k), expand(prefix_v))
    gamma = (torch.tanh(gate) if gate_tanh else gate).to(q.dtype).reshape(1, 1, -1, 1)
    return out + gamma * out_p
