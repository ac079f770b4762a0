"""What the kernels are asked to compute: :class:`AttentionProblem`, the kernels' own description of one call.

The kernels sit below the ``fastadapter`` package (``fastadapter.backends.triton`` calls them), so they never
import it: the backend fills an :class:`AttentionProblem` from its validated inputs (:meth:`AttentionProblem.of`
copies the fields of any object that has them, such as ``fastadapter._inputs.AttentionInputs``). Nothing here is
validated again: the op validates every input once, for every backend, before a backend is called.

Two modes:

* dense: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``; with ``seqused_k`` (int32 ``[B]``) row b reads only its
  first ``seqused_k[b]`` keys (a padded KV cache read up to each row's length);
* varlen: ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_q``, ``cu_seqlens_k`` (int32 ``[N+1]``, each
  sequence's first token) and ``max_seqlen_q``, ``max_seqlen_k``; with ``seqused_k`` (int32 ``[N]``) sequence b
  uses only its first ``seqused_k[b]`` keys.

Per sequence of ``Sq_b`` queries and ``Sk_b`` keys (used), causal attention is bottom-right aligned: query i sees
key j iff ``j <= i + Sk_b - Sq_b``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call as the kernels see it (tensors keep the caller's strides).

    Attributes:
        q: ``[B, Sq, Hq, D]`` or varlen ``[Tq, Hq, D]``.
        k, v: ``[B, Sk, Hkv, D]`` or varlen ``[Tk, Hkv, D]``.
        prefix_k, prefix_v: ``[Bp, P, Hkv, D]``, ``Bp`` 1 (one prompt for every sequence) or the batch.
        gate: fp32 ``[Bg, Hq]``, ``Bg`` 1 or the batch: the raw gate, before the activation.
        causal: bottom-right aligned causal mask over the words.
        softmax_scale: the scale of the scores.
        gate_tanh: ``γ = tanh(gate)`` when True, the raw gate otherwise.
        cu_seqlens_q, cu_seqlens_k: int32 ``[N+1]`` in varlen mode (possibly one tensor), else None.
        seqused_k: int32 ``[B]`` / ``[N]``: the keys each sequence uses; None: all of them.
        max_seqlen_q, max_seqlen_k: the longest query and key sequence in varlen mode, else 0.
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

    @staticmethod
    def of(inputs) -> "AttentionProblem":
        """The problem of ``inputs``: itself when it is one, else a copy of its fields of the same names (the
        validated ``AttentionInputs`` of the op; no copy of any tensor)."""
        if isinstance(inputs, AttentionProblem):
            return inputs
        return AttentionProblem(**{f.name: getattr(inputs, f.name) for f in fields(AttentionProblem)})

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

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
    def shares_offsets(self) -> bool:
        """Varlen q and k with one offsets tensor (packed self-attention: ``Sq_b == Sk_b``): the same tensor, or
        two views of the same memory (a ``meta`` tensor has no memory: only the same tensor counts)."""
        if not self.varlen:
            return False
        cu_q, cu_k = self.cu_seqlens_q, self.cu_seqlens_k
        if cu_q is cu_k:
            return True
        return (cu_q.device.type != "meta" and cu_q.device == cu_k.device and cu_q.shape == cu_k.shape
                and cu_q.data_ptr() == cu_k.data_ptr())

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
        """Shape of the fp32 log-sum-exps: ``[B, Hq, Sq]``, or ``[Hq, Tq]`` in varlen mode."""
        if self.varlen:
            return (self.heads_q, self.q.shape[0])
        return (self.q.shape[0], self.heads_q, self.q.shape[1])
