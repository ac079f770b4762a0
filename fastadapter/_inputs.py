"""Validation of the inputs of ``zero_init_attention`` and the normalised bundle every backend receives.

Two layouts are accepted (DESIGN.md §1):

* batched: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``prefix_k, prefix_v [Bp, P, Hkv, D]`` with
  ``Bp in {1, B}``, ``gate [Hq] | [1] | [B, Hq]``;
* varlen (packed sequences): ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` with ``cu_seqlens`` (int32 ``[N+1]``,
  cumulative sequence starts) and ``max_seqlen``; every sequence attends only to itself (``Sq == Sk`` per
  sequence), ``prefix_k, prefix_v [Bp, P, Hkv, D]`` with ``Bp in {1, N}``, ``gate [Hq] | [1] | [N, Hq]``.

Bad input raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) that says what was
wrong and what was expected.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATE_ACTIVATIONS = ("tanh", "none")


@dataclass(frozen=True)
class AttentionInputs:
    """Validated inputs, as every backend sees them.

    Tensors keep the caller's strides (no copies). ``gate`` is already normalised to fp32 ``[Bg, Hq]`` with
    ``Bg in {1, batch}`` (see :func:`normalize_gate`).

    Attributes:
        q: ``[B, Sq, Hq, D]`` or, varlen, ``[T, Hq, D]``.
        k, v: ``[B, Sk, Hkv, D]`` or ``[T, Hkv, D]``.
        prefix_k, prefix_v: ``[Bp, P, Hkv, D]``.
        gate: fp32 ``[Bg, Hq]``, the raw gate (before the activation).
        causal: causal masking over the words, bottom-right aligned when ``Sq != Sk``.
        softmax_scale: the scale of the scores (resolved: never None).
        gate_tanh: ``True`` for ``gate_activation="tanh"``, ``False`` for ``"none"``.
        cu_seqlens: int32 ``[N+1]`` in varlen mode, else None.
        max_seqlen: the longest sequence in varlen mode, else 0.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    gate: torch.Tensor
    causal: bool
    softmax_scale: float
    gate_tanh: bool
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def batch(self) -> int:
        """B in batched mode, N (number of sequences) in varlen mode."""
        return self.cu_seqlens.shape[0] - 1 if self.varlen else self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        return self.max_seqlen if self.varlen else self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        return self.max_seqlen if self.varlen else self.k.shape[1]

    @property
    def heads_q(self) -> int:
        return self.q.shape[-2]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def prefix_len(self) -> int:
        return self.prefix_k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def lse_shape(self) -> tuple[int, ...]:
        """Shape of the fp32 log-sum-exps saved for backward: ``[B, Hq, Sq]``, or ``[Hq, T]`` varlen."""
        if self.varlen:
            return (self.heads_q, self.q.shape[0])
        return (self.q.shape[0], self.heads_q, self.q.shape[1])


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")


def normalize_gate(gate: torch.Tensor, batch: int, heads_q: int) -> torch.Tensor:
    """Turn a gate of shape ``[Hq]``, ``[1]`` or ``[batch, Hq]`` into fp32 ``[Bg, Hq]``, ``Bg in {1, batch}``.

    Differentiable: autograd sums the gradient of a scalar gate over heads.
    """
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be a torch.Tensor of shape [{heads_q}], [1] or [{batch}, {heads_q}], "
                        f"got {type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating-point tensor, got {gate.dtype}")
    shape = tuple(gate.shape)
    if shape == (1,) or shape == ():
        return gate.float().reshape(1, 1).expand(1, heads_q)
    if shape == (heads_q,):
        return gate.float().reshape(1, heads_q)
    if shape == (batch, heads_q) or shape == (1, heads_q):
        return gate.float()
    raise ValueError(f"gate must have shape [{heads_q}] (one per query head), [1] (one for all heads) or "
                     f"[{batch}, {heads_q}] (one row per sample), got {list(shape)}")


def validate_cu_seqlens(cu_seqlens, max_seqlen, tokens: int, device: torch.device) -> int:
    """Check packed-sequence boundaries once, for every backend; returns ``max_seqlen`` as an int.

    ``cu_seqlens`` must be a contiguous int32 tensor ``[N+1]`` on the inputs' device that starts at 0, never
    decreases and ends at most at the token count ``tokens`` (tokens after it belong to no sequence);
    ``max_seqlen`` a positive int at least the longest sequence. A kernel reading malformed boundaries would
    read and write out of bounds, and one given a short ``max_seqlen`` would skip rows, so both are errors.

    Cost: one small device-to-host copy (four numbers reduced on the device: a single sync per call, a few
    microseconds, next to a kernel launch). Under ``torch.compile`` the values cannot be read without a graph
    break, so they are checked there by ``torch._assert_async`` instead (device-side; same conditions).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be an int32 tensor [N+1], got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be an int32 tensor of shape [N+1] with N >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if not cu_seqlens.is_contiguous():
        raise ValueError(f"cu_seqlens must be contiguous (the kernels read it with unit stride), got stride "
                         f"{cu_seqlens.stride()}; pass cu_seqlens.contiguous()")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    try:
        if isinstance(max_seqlen, bool):
            raise TypeError
        max_seqlen = operator.index(max_seqlen)
    except TypeError:
        raise ValueError(f"max_seqlen must be a positive int with cu_seqlens, got {max_seqlen!r}") from None
    if max_seqlen <= 0:
        raise ValueError(f"max_seqlen must be a positive int with cu_seqlens, got {max_seqlen}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if torch.compiler.is_compiling():
        torch._assert_async(cu_seqlens[0] == 0, "cu_seqlens must start at 0")
        torch._assert_async(lengths.min() >= 0, "cu_seqlens must never decrease")
        torch._assert_async(cu_seqlens[-1] <= tokens, "cu_seqlens must end at most at the token count")
        torch._assert_async(lengths.max() <= max_seqlen, "max_seqlen must be at least the longest sequence")
        return max_seqlen
    first, last, shortest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first} (cu_seqlens[i] is where sequence i starts)")
    if shortest < 0:
        at = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"cu_seqlens must never decrease, got cu_seqlens[{at}] = {int(cu_seqlens[at])} > "
                         f"cu_seqlens[{at + 1}] = {int(cu_seqlens[at + 1])}")
    if last > tokens:
        raise ValueError(f"cu_seqlens ends at {last}, past the {tokens} packed tokens of q, k and v")
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest packed sequence ({longest} "
                         f"tokens); pass max_seqlen >= {longest}")
    return max_seqlen


def validate_inputs(q, k, v, prefix_k, prefix_v, gate, *, causal: bool, softmax_scale: Optional[float],
                    gate_activation: str, cu_seqlens: Optional[torch.Tensor] = None,
                    max_seqlen: Optional[int] = None) -> AttentionInputs:
    """Check every input against the contract of DESIGN.md §1 and return the normalised bundle."""
    varlen = cu_seqlens is not None
    if varlen:
        lay_q, lay_kv = "[T, Hq, D] (varlen)", "[T, Hkv, D] (varlen)"
        ndim = 3
    else:
        lay_q, lay_kv = "[B, Sq, Hq, D]", "[B, Sk, Hkv, D]"
        ndim = 4
    _check_tensor("q", q, ndim, lay_q)
    _check_tensor("k", k, ndim, lay_kv)
    _check_tensor("v", v, ndim, lay_kv)
    _check_tensor("prefix_k", prefix_k, 4, "[1 or B, P, Hkv, D]")
    _check_tensor("prefix_v", prefix_v, 4, "[1 or B, P, Hkv, D]")

    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported dtypes are float16, bfloat16 and float32")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v, prefix_k and prefix_v "
                            f"must share one dtype")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("gate", gate)):
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")

    head_dim = q.shape[-1]
    heads_q = q.shape[-2]
    heads_kv = k.shape[-2]
    if head_dim == 0 or heads_q == 0 or heads_kv == 0:
        raise ValueError(f"heads and head_dim must be positive, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[-1]} but q has {head_dim}; they must match")
    if heads_q % heads_kv != 0:
        raise ValueError(f"the query heads ({heads_q}) must be a multiple of the key/value heads ({heads_kv}) "
                         f"for grouped-query attention")

    if varlen:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"varlen q and k must hold the same tokens, got q {q.shape[0]} and k {k.shape[0]} "
                             f"tokens")
        max_seqlen = validate_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device)
        batch = cu_seqlens.shape[0] - 1
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens (varlen mode)")
        batch = q.shape[0]
        if k.shape[0] != batch:
            raise ValueError(f"k has batch {k.shape[0]} but q has {batch}; they must match")
        max_seqlen = 0

    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} and "
                         f"{tuple(prefix_v.shape)}")
    if prefix_k.shape[0] not in (1, batch):
        raise ValueError(f"prefix batch must be 1 (shared prompt) or {batch} (one per sample), got "
                         f"{prefix_k.shape[0]}")
    if prefix_k.shape[2] != heads_kv or prefix_k.shape[3] != head_dim:
        raise ValueError(f"prefix_k must have shape [1 or {batch}, P, {heads_kv}, {head_dim}] "
                         f"(kv heads and head_dim of k), got {tuple(prefix_k.shape)}")

    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
    gate2d = normalize_gate(gate, batch, heads_q)

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    else:
        softmax_scale = float(softmax_scale)
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")

    return AttentionInputs(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, gate=gate2d,
                           causal=bool(causal), softmax_scale=softmax_scale,
                           gate_tanh=gate_activation == "tanh", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
