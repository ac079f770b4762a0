"""Validation of the inputs of ``zero_init_attention`` and the normalised bundle every backend receives.

Two layouts are accepted (DESIGN.md §1):

* batched: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``prefix_k, prefix_v [Bp, P, Hkv, D]`` with
  ``Bp in {1, B}``, ``gate [Hq] | [1] | [B, Hq]``;
  and, optionally, ``seqused_k`` (int32 ``[B]``): row b reads only its first ``seqused_k[b]`` keys (a padded KV
  cache read up to each row's length);
* varlen (ragged sequences, as ``flash_attn_varlen_func``): ``q [Tq, Hq, D]`` and ``k, v [Tk, Hkv, D]`` packed
  along their first dimension, with their own offsets ``cu_seqlens_q`` and ``cu_seqlens_k`` (int32 ``[N+1]``,
  cumulative sequence starts) and the longest lengths ``max_seqlen_q``, ``max_seqlen_k``; sequence b attends only
  to its own keys, optionally only the first ``seqused_k[b]`` of them. ``cu_seqlens``/``max_seqlen`` are the
  shorthand for q and k sharing their offsets (packed self-attention, ``Sq == Sk`` per sequence).
  ``prefix_k, prefix_v [Bp, P, Hkv, D]`` with ``Bp in {1, N}``, ``gate [Hq] | [1] | [N, Hq]``.

In both modes, with ``Sq_b`` queries and ``Sk_b`` keys in sequence b (``seqused_k[b]`` when given), causal
masking is bottom-right aligned per sequence: query i sees key j iff ``j <= i + Sk_b - Sq_b``.

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
        causal: causal masking over the words, bottom-right aligned per sequence.
        softmax_scale: the scale of the scores (resolved: never None).
        gate_tanh: ``True`` for ``gate_activation="tanh"``, ``False`` for ``"none"``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[N+1]`` in varlen mode (both set, possibly the same tensor), else None.
        max_seqlen_q, max_seqlen_k: the longest query and key sequence in varlen mode, else 0.
        seqused_k: int32 ``[B]`` (dense) or ``[N]`` (varlen): the keys each sequence uses; None: all of them.
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
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqused_k: Optional[torch.Tensor] = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def shares_offsets(self) -> bool:
        """Varlen with one offsets tensor for q and k (packed self-attention, ``Sq == Sk`` per sequence)."""
        return self.varlen and self.cu_seqlens_q is self.cu_seqlens_k

    @property
    def ragged(self) -> bool:
        """Anything beyond dense or shared-offset inputs: separate q/k offsets or ``seqused_k``."""
        return self.seqused_k is not None or (self.varlen and not self.shares_offsets)

    @property
    def batch(self) -> int:
        """B in batched mode, N (number of sequences) in varlen mode."""
        return self.cu_seqlens_q.shape[0] - 1 if self.varlen else self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        """The (longest) query sequence: Sq, or ``max_seqlen_q`` in varlen mode."""
        return self.max_seqlen_q if self.varlen else self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        """The (longest) key sequence: Sk, or ``max_seqlen_k`` in varlen mode."""
        return self.max_seqlen_k if self.varlen else self.k.shape[1]

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
        """Shape of the fp32 log-sum-exps saved for backward: ``[B, Hq, Sq]``, or ``[Hq, Tq]`` varlen."""
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


def validate_cu_seqlens(cu_seqlens, max_seqlen, tokens: int, device: torch.device, *,
                        name: str = "cu_seqlens", max_name: str = "max_seqlen", what: str = "q, k and v") -> int:
    """Check packed-sequence boundaries once, for every backend; returns ``max_seqlen`` as an int.

    ``cu_seqlens`` must be a contiguous int32 tensor ``[N+1]`` on the inputs' device that starts at 0, never
    decreases and ends at most at the token count ``tokens`` (tokens after it belong to no sequence);
    ``max_seqlen`` a positive int at least the longest sequence. A kernel reading malformed boundaries would
    read and write out of bounds, and one given a short ``max_seqlen`` would skip rows, so both are errors.
    ``name``, ``max_name`` and ``what`` are the argument names and the tensors they describe, for the messages
    (``cu_seqlens_q``/``max_seqlen_q``/"q" and ``cu_seqlens_k``/``max_seqlen_k``/"k and v").

    Cost: one small device-to-host copy (four numbers reduced on the device: a single sync per call, a few
    microseconds, next to a kernel launch). Under ``torch.compile`` the values cannot be read without a graph
    break, so they are checked there by ``torch._assert_async`` instead (device-side; same conditions).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor [N+1], got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name} must be an int32 tensor of shape [N+1] with N >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if not cu_seqlens.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels read it with unit stride), got stride "
                         f"{cu_seqlens.stride()}; pass {name}.contiguous()")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")
    max_seqlen = _index(max_seqlen, f"{max_name} must be a positive int with {name}", minimum=1)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if torch.compiler.is_compiling():
        torch._assert_async(cu_seqlens[0] == 0, f"{name} must start at 0")
        torch._assert_async(lengths.min() >= 0, f"{name} must never decrease")
        torch._assert_async(cu_seqlens[-1] <= tokens, f"{name} must end at most at the token count")
        torch._assert_async(lengths.max() <= max_seqlen, f"{max_name} must be at least the longest sequence")
        return max_seqlen
    first, last, shortest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first} ({name}[i] is where sequence i starts)")
    if shortest < 0:
        at = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"{name} must never decrease, got {name}[{at}] = {int(cu_seqlens[at])} > "
                         f"{name}[{at + 1}] = {int(cu_seqlens[at + 1])}")
    if last > tokens:
        raise ValueError(f"{name} ends at {last}, past the {tokens} packed tokens of {what}")
    if longest > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is shorter than the longest packed sequence ({longest} "
                         f"tokens); pass {max_name} >= {longest}")
    return max_seqlen


def _index(value, message: str, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum`` (``operator.index``: ints and 0-d integer tensors, not bools)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{message}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{message}, got {value}")
    return value


def validate_seqused_k(seqused_k, batch: int, key_lengths: torch.Tensor | int, device: torch.device) -> None:
    """Check ``seqused_k``: a contiguous int32 ``[batch]`` tensor on the inputs' device with
    ``0 <= seqused_k[b] <= key_lengths[b]`` (the keys sequence b holds: Sk dense, ``cu_seqlens_k`` lengths varlen).

    One small host sync, or ``torch._assert_async`` under ``torch.compile``, as :func:`validate_cu_seqlens`.
    """
    if not isinstance(seqused_k, torch.Tensor):
        raise TypeError(f"seqused_k must be an int32 tensor [{batch}], got {type(seqused_k).__name__}")
    if seqused_k.dtype != torch.int32:
        raise TypeError(f"seqused_k must be an int32 tensor [{batch}], got dtype {seqused_k.dtype}")
    if tuple(seqused_k.shape) != (batch,):
        raise ValueError(f"seqused_k must have shape [{batch}] (one count per sequence), got "
                         f"{list(seqused_k.shape)}")
    if not seqused_k.is_contiguous():
        raise ValueError(f"seqused_k must be contiguous, got stride {seqused_k.stride()}; pass "
                         f"seqused_k.contiguous()")
    if seqused_k.device != device:
        raise ValueError(f"seqused_k is on {seqused_k.device} but q is on {device}")
    if batch == 0:
        return
    over = seqused_k - key_lengths
    if torch.compiler.is_compiling():
        torch._assert_async(seqused_k.min() >= 0, "seqused_k must be >= 0")
        torch._assert_async(over.max() <= 0, "seqused_k must be at most each sequence's keys")
        return
    smallest, most_over = torch.stack([seqused_k.min(), over.max()]).tolist()
    if smallest < 0:
        at = int(torch.nonzero(seqused_k < 0)[0])
        raise ValueError(f"seqused_k must be >= 0, got seqused_k[{at}] = {smallest}")
    if most_over > 0:
        at = int(torch.nonzero(over > 0)[0])
        held = key_lengths if isinstance(key_lengths, int) else int(key_lengths[at])
        raise ValueError(f"seqused_k[{at}] = {int(seqused_k[at])} is more than the {held} keys sequence {at} "
                         f"holds")


def resolve_offsets(cu_seqlens=None, max_seqlen=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                    max_seqlen_k=None) -> tuple:
    """The varlen arguments of the op as ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``.

    ``cu_seqlens``/``max_seqlen`` are the shorthand for q and k sharing their offsets (one tensor for both); it
    cannot be mixed with the separate arguments, and ``cu_seqlens_q`` and ``cu_seqlens_k`` come together.
    """
    if cu_seqlens is not None or max_seqlen is not None:
        separate = [n for n, a in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                                   ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)) if a is not None]
        if separate:
            raise ValueError(f"pass either cu_seqlens/max_seqlen (q and k share offsets) or cu_seqlens_q, "
                             f"cu_seqlens_k, max_seqlen_q, max_seqlen_k, not both (got cu_seqlens and "
                             f"{', '.join(separate)})")
        if cu_seqlens is None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens (varlen mode)")
        return cu_seqlens, cu_seqlens, max_seqlen, max_seqlen
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        given, missing = ("cu_seqlens_q", "cu_seqlens_k") if cu_seqlens_k is None else ("cu_seqlens_k",
                                                                                          "cu_seqlens_q")
        raise ValueError(f"{given} needs {missing}: varlen q and k each have their offsets (pass cu_seqlens for "
                         f"offsets they share)")
    if cu_seqlens_q is None and (max_seqlen_q is not None or max_seqlen_k is not None):
        raise ValueError("max_seqlen_q and max_seqlen_k are only meaningful with cu_seqlens_q and cu_seqlens_k "
                         "(varlen mode)")
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def validate_inputs(q, k, v, prefix_k, prefix_v, gate, *, causal: bool, softmax_scale: Optional[float],
                    gate_activation: str, cu_seqlens: Optional[torch.Tensor] = None,
                    max_seqlen: Optional[int] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None,
                    seqused_k: Optional[torch.Tensor] = None) -> AttentionInputs:
    """Check every input against the contract of DESIGN.md §1 and return the normalised bundle."""
    cu_q, cu_k, max_seqlen_q, max_seqlen_k = resolve_offsets(cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k,
                                                             max_seqlen_q, max_seqlen_k)
    varlen = cu_q is not None
    if varlen:
        lay_q, lay_kv = "[Tq, Hq, D] (varlen)", "[Tk, Hkv, D] (varlen)"
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
        if cu_q is cu_k:
            if k.shape[0] != q.shape[0]:
                raise ValueError(f"varlen q and k sharing cu_seqlens must hold the same tokens, got q "
                                 f"{q.shape[0]} and k {k.shape[0]} tokens (pass cu_seqlens_q and cu_seqlens_k "
                                 f"for separate offsets)")
            max_seqlen_q = max_seqlen_k = validate_cu_seqlens(cu_q, max_seqlen_q, q.shape[0], q.device)
        else:
            max_seqlen_q = validate_cu_seqlens(cu_q, max_seqlen_q, q.shape[0], q.device, name="cu_seqlens_q",
                                               max_name="max_seqlen_q", what="q")
            max_seqlen_k = validate_cu_seqlens(cu_k, max_seqlen_k, k.shape[0], q.device, name="cu_seqlens_k",
                                               max_name="max_seqlen_k", what="k and v")
            if cu_k.shape[0] != cu_q.shape[0]:
                raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                                 f"{cu_q.shape[0] - 1} and {cu_k.shape[0] - 1}")
        batch = cu_q.shape[0] - 1
        key_lengths = cu_k[1:] - cu_k[:-1]
    else:
        batch = q.shape[0]
        if k.shape[0] != batch:
            raise ValueError(f"k has batch {k.shape[0]} but q has {batch}; they must match")
        max_seqlen_q = max_seqlen_k = 0
        key_lengths = k.shape[1]
    if seqused_k is not None:
        validate_seqused_k(seqused_k, batch, key_lengths, q.device)

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
                           gate_tanh=gate_activation == "tanh", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, seqused_k=seqused_k)
