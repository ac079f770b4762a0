"""FLOP count of zero-init attention, with flash-attention's benchmark convention.

Forward: two matmuls (``q kᵀ`` and ``P v``) over every (query, key) pair, ``2·D`` FLOPs each (multiply + add):
``4·B·Hq·Sq·Sk·D``, halved when causal (only the lower triangle is work); the prefix adds ``4·B·Hq·Sq·P·D``
(never masked). The backward does five matmuls for the forward's two — the recomputed scores, ``dP = dO vᵀ``,
``dv = Pᵀ dO``, ``dq = dS k``, ``dk = dSᵀ q`` — so it counts 2.5× the forward, and forward + backward 3.5×.
These are the factors of flash-attention's ``benchmarks/benchmark_flash_attention.py`` (``bwd: 2.5 f``,
``fwd_bwd: 3.5 f``), so our TFLOP/s read on the same scale as theirs. Softmax, masking and the gate are not
counted (O(S²) work, not O(S²·D)).
"""
from __future__ import annotations

#: FLOPs of each mode as a multiple of the forward's: 2 matmuls forward, 5 backward.
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
