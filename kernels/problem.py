"""The contract of zero-init attention and :class:`AttentionProblem`, the one description of a call.

Every layer uses this one bundle: the op validates its inputs once into an :class:`AttentionProblem`
(:meth:`AttentionProblem.from_dense` or :meth:`AttentionProblem.from_varlen`), picks a backend for it, and the backend hands
the same object to its kernels (Triton kernels read its fields; the C++ kernels get them through the fused
backend's custom op, :meth:`AttentionProblem.op_arguments`). It lives in the kernels' layer because the kernels
never import the package above them. Nothing below the op validates again.

Two layouts (DESIGN.md §1):

* dense: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``, ``prefix_k, prefix_v [Bp, P, Hkv, D]`` with
  ``Bp in {1, B}``, ``gate [Hq] | [1] | [B, Hq]``; optionally ``seqused_k`` (int32 ``[B]``): row b reads only
  its first ``seqused_k[b]`` keys (a padded KV cache read up to each row's length), or an explicit ``attn_mask``
  in place of the causal rule (bool, True = may attend, or additive float; ``[B or 1, 1 or Hq, Sq, Sk]``);
* varlen (ragged sequences, as ``flash_attn_varlen_func``): ``q [Tq, Hq, D]`` and ``k, v [Tk, Hkv, D]`` packed
  along their first dimension with the offsets ``cu_seqlens_q`` and ``cu_seqlens_k`` (int32 ``[N+1]``, each
  sequence's first token; one tensor given for both when q and k share their offsets, packed self-attention)
  and the longest lengths ``max_seqlen_q``, ``max_seqlen_k``; sequence b attends only to its own keys,
  optionally only the first ``seqused_k[b]`` of them. ``prefix_k, prefix_v [Bp, P, Hkv, D]`` with
  ``Bp in {1, N}``, ``gate [Hq] | [1] | [N, Hq]``.

In both, with ``Sq_b`` queries and ``Sk_b`` keys in sequence b (``seqused_k[b]`` when given), causal masking is
bottom-right aligned per sequence: query i sees key j iff ``j <= i + Sk_b - Sq_b``. A row's output depends only on
the keys and values it sees: keys and values past ``seqused_k``, outside a sequence's ``cu_seqlens_k`` range or
hidden by the causal rule never influence it, whatever they hold (unused cache slots from ``torch.empty``).

Bad input raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) that says what was
wrong and what was expected.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATE_ACTIVATIONS = ("tanh", "none")

#: The arguments of a fused backend's custom ops that carry one problem (:meth:`AttentionProblem.op_arguments`).
#: ``cu_seqlens_k`` is None when q and k share their offsets (the op's schema then holds no alias).
OP_SCHEMA = ("Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor gate, Tensor? cu_seqlens_q, "
             "Tensor? cu_seqlens_k, Tensor? seqused_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, "
             "float softmax_scale, bool gate_tanh")


@dataclass(frozen=True)
class AttentionProblem:
    """One validated attention call (tensors keep the caller's strides: no copies).

    Attributes:
        q: ``[B, Sq, Hq, D]`` or varlen ``[Tq, Hq, D]``.
        k, v: ``[B, Sk, Hkv, D]`` or varlen ``[Tk, Hkv, D]``.
        prefix_k, prefix_v: ``[Bp, P, Hkv, D]``, ``Bp`` 1 (one prompt for every sequence) or the batch.
        gate: fp32 ``[Bg, Hq]``, ``Bg`` 1 or the batch: the raw gate, before the activation.
        causal: bottom-right aligned causal mask over the words.
        softmax_scale: the scale of the scores (resolved: a positive finite number).
        gate_tanh: ``γ = tanh(gate)`` when True, the raw gate otherwise.
        cu_seqlens_q, cu_seqlens_k: int32 ``[N+1]`` in varlen mode (the same tensor when ``shares_offsets``),
            else None.
        seqused_k: int32 ``[B]`` / ``[N]``: the keys each sequence uses; None: all of them.
        max_seqlen_q, max_seqlen_k: the longest query and key sequence in varlen mode, else 0.
        shares_offsets: varlen q and k with one offsets tensor (packed self-attention, ``Sq_b == Sk_b``); decided
            here, once, from the caller passing one tensor for both.
        attn_mask: dense only: bool (True = may attend) or additive float ``[B or 1, 1 or Hq, Sq, Sk]`` in place
            of the causal rule; None otherwise.
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
    seqused_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    shares_offsets: bool = False
    attn_mask: Optional[torch.Tensor] = None

    # -- construction: the contract, checked once
    @staticmethod
    def from_dense(q, k, v, prefix_k, prefix_v, gate, *, causal: bool = True, softmax_scale: Optional[float] = None,
              gate_activation: str = "tanh", seqused_k: Optional[torch.Tensor] = None,
              attn_mask: Optional[torch.Tensor] = None) -> "AttentionProblem":
        """The problem of a dense call (``q [B, Sq, Hq, D]``), every input checked against the contract."""
        _check_tensor("q", q, 4, "[B, Sq, Hq, D]")
        _check_tensor("k", k, 4, "[B, Sk, Hkv, D]")
        _check_tensor("v", v, 4, "[B, Sk, Hkv, D]")
        _check_common(q, k, v, prefix_k, prefix_v, gate)
        batch = q.shape[0]
        if k.shape[0] != batch:
            raise ValueError(f"k has batch {k.shape[0]} but q has {batch}; they must match")
        if seqused_k is not None:
            validate_seqused_k(seqused_k, batch, k.shape[1], q.device)
        causal = _check_causal(causal)
        if attn_mask is not None:
            _check_mask(attn_mask, q, k, causal, seqused_k)
        return AttentionProblem(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v,
                                gate=_check_prefix_and_gate(prefix_k, prefix_v, gate, batch, q, k),
                                causal=causal, softmax_scale=_resolve_scale(softmax_scale, q.shape[-1]),
                                gate_tanh=_gate_tanh(gate_activation), seqused_k=seqused_k, attn_mask=attn_mask)

    @staticmethod
    def from_varlen(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
               causal: bool = True, softmax_scale: Optional[float] = None, gate_activation: str = "tanh",
               seqused_k: Optional[torch.Tensor] = None) -> "AttentionProblem":
        """The problem of a varlen call (``q [Tq, Hq, D]`` packed), every input checked against the contract.

        ``cu_seqlens_k is cu_seqlens_q`` (one tensor for both) means that q and k share their offsets."""
        _check_tensor("q", q, 3, "[Tq, Hq, D] (varlen)")
        _check_tensor("k", k, 3, "[Tk, Hkv, D] (varlen)")
        _check_tensor("v", v, 3, "[Tk, Hkv, D] (varlen)")
        _check_common(q, k, v, prefix_k, prefix_v, gate)
        shares = cu_seqlens_q is not None and cu_seqlens_q is cu_seqlens_k
        if shares:
            if k.shape[0] != q.shape[0]:
                raise ValueError(f"varlen q and k sharing one offsets tensor must hold the same tokens, got q "
                                 f"{q.shape[0]} and k {k.shape[0]} tokens (pass separate cu_seqlens_q and "
                                 f"cu_seqlens_k)")
            if max_seqlen_q != max_seqlen_k:
                raise ValueError(f"varlen q and k sharing one offsets tensor have one longest sequence, got "
                                 f"max_seqlen_q={max_seqlen_q!r} and max_seqlen_k={max_seqlen_k!r}")
        max_seqlen_q = validate_cu_seqlens(cu_seqlens_q, max_seqlen_q, q.shape[0], q.device, name="cu_seqlens_q",
                                           max_name="max_seqlen_q", what="q")
        if shares:
            max_seqlen_k = max_seqlen_q
        else:
            max_seqlen_k = validate_cu_seqlens(cu_seqlens_k, max_seqlen_k, k.shape[0], q.device,
                                               name="cu_seqlens_k", max_name="max_seqlen_k", what="k and v")
            if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
                raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                                 f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}")
        batch = cu_seqlens_q.shape[0] - 1
        if seqused_k is not None:
            validate_seqused_k(seqused_k, batch, cu_seqlens_k[1:] - cu_seqlens_k[:-1], q.device)
        return AttentionProblem(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v,
                                gate=_check_prefix_and_gate(prefix_k, prefix_v, gate, batch, q, k),
                                causal=_check_causal(causal), softmax_scale=_resolve_scale(softmax_scale, q.shape[-1]),
                                gate_tanh=_gate_tanh(gate_activation), cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                                max_seqlen_k=max_seqlen_k, shares_offsets=shares)

    # -- the custom ops' form (one flattening, one rebuilding)
    def op_arguments(self) -> tuple:
        """The arguments of :data:`OP_SCHEMA` (``cu_seqlens_k`` None when the offsets are shared)."""
        return (self.q, self.k, self.v, self.prefix_k, self.prefix_v, self.gate, self.cu_seqlens_q,
                None if self.shares_offsets else self.cu_seqlens_k, self.seqused_k, self.max_seqlen_q,
                self.max_seqlen_k, self.causal, self.softmax_scale, self.gate_tanh)

    @staticmethod
    def from_op_arguments(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                          max_seqlen_k, causal, softmax_scale, gate_tanh) -> "AttentionProblem":
        """The problem that :meth:`op_arguments` flattened (inside a custom op: not validated again)."""
        shares = cu_seqlens_q is not None and cu_seqlens_k is None
        return AttentionProblem(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, gate=gate, causal=causal,
                                softmax_scale=softmax_scale, gate_tanh=gate_tanh, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_q if shares else cu_seqlens_k, seqused_k=seqused_k,
                                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, shares_offsets=shares)

    # -- derived facts
    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def ragged(self) -> bool:
        """Anything beyond dense or shared-offset inputs: separate q/k offsets or ``seqused_k``."""
        return self.seqused_k is not None or (self.varlen and not self.shares_offsets)

    @property
    def batch(self) -> int:
        """B in dense mode, N (the number of sequences) in varlen mode."""
        return self.cu_seqlens_q.shape[0] - 1 if self.varlen else self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        """Sq, or the longest query sequence (``max_seqlen_q``) in varlen mode."""
        return self.max_seqlen_q if self.varlen else self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        """Sk (the cache length when ``seqused_k`` is given), or ``max_seqlen_k`` in varlen mode."""
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

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The differentiable inputs ``(q, k, v, prefix_k, prefix_v, gate)``."""
        return self.q, self.k, self.v, self.prefix_k, self.prefix_v, self.gate

    def lse_shape(self) -> tuple[int, ...]:
        """Shape of the fp32 log-sum-exps saved for backward: ``[B, Hq, Sq]``, or ``[Hq, Tq]`` in varlen mode."""
        return lse_shape(self.q.shape, self.varlen)

    def describe(self) -> str:
        """The shapes, dtypes and devices of the inputs and the options, for messages."""
        def tensor(name, t):
            return f"{name} {list(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
        parts = [tensor(n, t) for n, t in zip(("q", "k", "v", "prefix_k", "prefix_v", "gate"), self.tensors)]
        if self.varlen:
            parts.append(f"varlen: {self.batch} sequences, max_seqlen_q={self.max_seqlen_q}, "
                         f"max_seqlen_k={self.max_seqlen_k}" + (", shared offsets" if self.shares_offsets else ""))
        if self.seqused_k is not None:
            parts.append("seqused_k")
        if self.attn_mask is not None:
            parts.append(tensor("attn_mask", self.attn_mask))
        parts.append(f"causal={self.causal}, softmax_scale={self.softmax_scale:g}, "
                     f"gate_activation={'tanh' if self.gate_tanh else 'none'}")
        return "; ".join(parts)


# -- the checks ------------------------------------------------------------------------------------------------

def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")


def _check_common(q, k, v, prefix_k, prefix_v, gate) -> None:
    """Dtypes, devices, heads and head_dim: what dense and varlen calls share."""
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
    head_dim, heads_q, heads_kv = q.shape[-1], q.shape[-2], k.shape[-2]
    if head_dim == 0 or heads_q == 0 or heads_kv == 0:
        raise ValueError(f"heads and head_dim must be positive, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[-1]} but q has {head_dim}; they must match")
    if heads_q % heads_kv != 0:
        raise ValueError(f"the query heads ({heads_q}) must be a multiple of the key/value heads ({heads_kv}) "
                         f"for grouped-query attention")


def _check_prefix_and_gate(prefix_k, prefix_v, gate, batch: int, q, k) -> torch.Tensor:
    """Check the prefix against the batch and return the gate normalised to fp32 ``[Bg, Hq]``."""
    heads_kv, head_dim = k.shape[-2], q.shape[-1]
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} and "
                         f"{tuple(prefix_v.shape)}")
    if prefix_k.shape[0] not in (1, batch):
        raise ValueError(f"prefix batch must be 1 (shared prompt) or {batch} (one per sample), got "
                         f"{prefix_k.shape[0]}")
    if prefix_k.shape[2] != heads_kv or prefix_k.shape[3] != head_dim:
        raise ValueError(f"prefix_k must have shape [1 or {batch}, P, {heads_kv}, {head_dim}] "
                         f"(kv heads and head_dim of k), got {tuple(prefix_k.shape)}")
    return normalize_gate(gate, batch, q.shape[-2])


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (True or False), got {type(causal).__name__} {causal!r}")
    return causal


def _gate_tanh(gate_activation: str) -> bool:
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
    return gate_activation == "tanh"


def _resolve_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale``, or ``1 / sqrt(D)`` when None; a positive finite number, else ``ValueError``."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a positive float, got {type(softmax_scale).__name__} "
                        f"{softmax_scale!r}")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number (the scale of q·kᵀ; default "
                         f"1/sqrt(head_dim)), got {scale}")
    return scale


def _check_mask(mask, q, k, causal: bool, seqused_k) -> None:
    """An explicit mask: bool or q's float dtype, ``[B or 1, 1 or Hq, Sq, Sk]``, in place of the causal rule."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
    batch, seqlen_q, heads_q = q.shape[0], q.shape[1], q.shape[2]
    seqlen_k = k.shape[1]
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = may attend) or an additive float mask, got {mask.dtype}")
    if (mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads_q)
            or tuple(mask.shape[2:]) != (seqlen_q, seqlen_k)):
        raise ValueError(f"attn_mask must have shape [1 or {batch}, 1 or {heads_q}, {seqlen_q}, {seqlen_k}], got "
                         f"{tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"attn_mask is on {mask.device} but q is on {q.device}")
    if causal:
        raise ValueError("attn_mask replaces the causal rule: pass causal=False with it (and make the mask "
                         "causal if it should be)")
    if seqused_k is not None:
        raise ValueError("attn_mask and seqused_k cannot be combined: mask the unused keys in attn_mask")


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


def validate_cu_seqlens(cu_seqlens, max_seqlen, tokens: int, device: torch.device, *, name: str, max_name: str,
                        what: str) -> int:
    """Check packed-sequence boundaries once, for every backend; returns ``max_seqlen`` as an int.

    ``cu_seqlens`` must be a contiguous int32 tensor ``[N+1]`` on the inputs' device that starts at 0, never
    decreases and ends at most at the token count ``tokens`` (tokens after it belong to no sequence);
    ``max_seqlen`` an int at least the longest sequence (a kernel given a short one would skip rows) and at most
    the tokens of the batch (the Triton grid is sized from it), and at least 1. ``name``, ``max_name`` and
    ``what`` name the arguments and the tensors they describe, for the messages.

    Cost: one small device-to-host copy (four numbers reduced on the device: a single sync per call). Under
    ``torch.compile`` the values cannot be read without a graph break, so they are checked there by
    ``torch._assert_async`` instead (device-side; same conditions).
    """
    def shape_problem(t: torch.Tensor) -> Optional[str]:
        if t.dim() == 1 and t.shape[0] >= 2:
            return None
        return f"{name} must be an int32 tensor of shape [N+1] with N >= 1, got shape {tuple(t.shape)}"
    _check_int32_vector(cu_seqlens, name, "[N+1]", device, shape_problem)
    max_seqlen = _index(max_seqlen, f"{max_name} must be a positive int with {name}", minimum=1)
    if max_seqlen > max(tokens, 1):
        raise ValueError(f"{max_name} = {max_seqlen} is more than the {tokens} packed tokens of {what}: it must be "
                         f"at least the longest sequence and at most the tokens of the batch")
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


def lse_shape(q_shape: Sequence[int], varlen: bool) -> tuple[int, ...]:
    """Shape of the fp32 log-sum-exps of a call whose query has shape ``q_shape``: ``[B, Hq, Sq]`` for a batched
    ``q [B, Sq, Hq, D]``, ``[Hq, Tq]`` for a packed ``q [Tq, Hq, D]``. The one Python definition (the problem's
    :meth:`AttentionProblem.lse_shape`, the C++ op's fake); the C++ op writes the same shape, from its twin
    ``lse_shape`` in csrc/problem.h."""
    if varlen:
        return (q_shape[-2], q_shape[0])
    return (q_shape[0], q_shape[-2], q_shape[1])


def _check_int32_vector(value, name: str, shape: str, device: torch.device,
                        shape_problem: Callable[[torch.Tensor], Optional[str]]) -> None:
    """What ``cu_seqlens_q/k`` and ``seqused_k`` share: an int32 tensor (``shape``: its shape, for the messages)
    whose shape is right (``shape_problem``: the message when it is not, else None), contiguous (the kernels read
    it with unit stride) and on the inputs' ``device``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor {shape}, got {type(value).__name__}")
    if value.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor {shape}, got dtype {value.dtype}")
    problem = shape_problem(value)
    if problem is not None:
        raise ValueError(problem)
    if not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels read it with unit stride), got stride "
                         f"{value.stride()}; pass {name}.contiguous()")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}")


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


def validate_seqused_k(seqused_k, batch: int, key_lengths, device: torch.device) -> None:
    """Check ``seqused_k``: a contiguous int32 ``[batch]`` tensor on the inputs' device with
    ``0 <= seqused_k[b] <= key_lengths[b]`` (the keys sequence b holds: Sk dense, ``cu_seqlens_k`` lengths varlen).

    One small host sync, or ``torch._assert_async`` under ``torch.compile``, as :func:`validate_cu_seqlens`.
    """
    def shape_problem(t: torch.Tensor) -> Optional[str]:
        if tuple(t.shape) == (batch,):
            return None
        return f"seqused_k must have shape [{batch}] (one count per sequence), got {list(t.shape)}"
    _check_int32_vector(seqused_k, "seqused_k", f"[{batch}]", device, shape_problem)
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
