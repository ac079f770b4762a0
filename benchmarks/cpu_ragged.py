"""Ragged batches in one launch of the compiled CPU kernels (issue 11), side by side: ``python -m benchmarks.cpu_ragged``.

Two tables, every provider timed in the same process, interleaved (each repetition runs every provider once, in
turn, each repetition starting with the next provider; medians and the ratios of medians, as
``benchmarks/cpu_kernel_targets.py``):

* **ragged decode step**: 8 rows of mixed cache lengths in one padded KV cache ``[8, S_cache, H, D]``, one query
  token per row. ``seqused_k`` (one call over the padded cache, each row read up to its length) against the
  thin model's gathering before issue 11 (rows grouped by length, each group's keys gathered with an index and
  the op called once per group: one call per row when every length differs) and against one call per row on
  views of the cache (no gather: the best a per-row loop can do).
* **packed prefill**: 8 packed sequences of mixed lengths, causal, forward and forward + backward: separate query
  and key offsets (``cu_seqlens_q``/``cu_seqlens_k``, two tensors of the same lengths) against the shared
  ``cu_seqlens`` shorthand at the same token count, and a prefill chunk (each sequence's last half of queries over
  all of its keys, ``Sq_b < Sk_b``) for scale.

LLaMA-7B attention shapes (H = 32, D = 128, P = 10). Saved to ``benchmarks/results/cpu-ragged.txt`` (``--out``)
with the machine, library versions and git commit beside it (``.json``).
"""
from __future__ import annotations

import argparse
import pathlib

import torch

from .cpu_kernel_targets import DTYPES, interleaved_medians
from .metadata import save_text_report
from fastadapter import _cpu_extension, zero_init_attention, zero_init_attention_varlen

#: Cache lengths of the 8 rows of the decode step (all different: the per-length grouping makes 8 calls).
DECODE_LENGTHS = [1024, 37, 512, 900, 128, 700, 256, 1000]
#: Lengths of the 8 packed prefill sequences.
PREFILL_LENGTHS = [300, 50, 200, 100, 150, 80, 64, 80]


def _prompt(heads, head_dim, prefix_len, dtype, requires_grad=False):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)
    return (randn(1, prefix_len, heads, head_dim), randn(1, prefix_len, heads, head_dim),
            (0.5 * torch.randn(heads)).requires_grad_(requires_grad))


def decode_providers(lengths, heads, head_dim, prefix_len, dtype):
    """Callables of one decode step over a padded cache read up to ``lengths``: seqused_k, per length group
    (gathered), per row (views)."""
    rows, cache = len(lengths), max(lengths)
    q = torch.randn(rows, 1, heads, head_dim, dtype=dtype)
    keys = torch.randn(rows, cache, heads, head_dim, dtype=dtype)
    values = torch.randn(rows, cache, heads, head_dim, dtype=dtype)
    prefix_k, prefix_v, gate = _prompt(heads, head_dim, prefix_len, dtype)
    used = torch.tensor(lengths, dtype=torch.int32)

    def attend(q_, k_, v_):
        return zero_init_attention(q_, k_, v_, prefix_k, prefix_v, gate, backend="cpu")

    def one_call():
        with torch.no_grad():
            return zero_init_attention(q, keys, values, prefix_k, prefix_v, gate, seqused_k=used, backend="cpu")

    def gathered():  # fastadapter/model/llama.py's _attend_cached before issue 11
        with torch.no_grad():
            by_length: dict[int, list[int]] = {}
            for row, length in enumerate(lengths):
                by_length.setdefault(length, []).append(row)
            out = q.new_empty(q.shape)
            for length, group in by_length.items():
                index = torch.tensor(group)
                out[index] = attend(q[index], keys[index, :length], values[index, :length])
            return out

    def per_row_views():
        with torch.no_grad():
            out = q.new_empty(q.shape)
            for row, length in enumerate(lengths):
                out[row:row + 1] = attend(q[row:row + 1], keys[row:row + 1, :length], values[row:row + 1, :length])
            return out

    return {"seqused_k": one_call, "gathered": gathered, "per_row": per_row_views}


def _offsets(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


def prefill_providers(lengths, heads, head_dim, prefix_len, dtype, backward):
    """Callables of one packed prefill: shared cu_seqlens, separate offsets of the same lengths, and a prefill
    chunk (the last half of each sequence's queries over all its keys)."""
    tokens = sum(lengths)
    grad = backward

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)
    q, k, v = (randn(tokens, heads, head_dim) for _ in range(3))
    prefix_k, prefix_v, gate = _prompt(heads, head_dim, prefix_len, dtype, requires_grad=grad)
    cu = _offsets(lengths)
    longest = max(lengths)
    chunk_lengths = [(n + 1) // 2 for n in lengths]
    q_chunk = randn(sum(chunk_lengths), heads, head_dim)
    cu_chunk = _offsets(chunk_lengths)
    upstream = torch.randn(tokens, heads, head_dim, dtype=dtype)
    upstream_chunk = torch.randn(q_chunk.shape, dtype=dtype)

    def run(query, out_grad, *offsets):
        def step():
            with torch.set_grad_enabled(grad):
                out = zero_init_attention_varlen(query, k, v, prefix_k, prefix_v, gate, *offsets, backend="cpu")
                if grad:
                    torch.autograd.grad(out, (query, k, v, prefix_k, prefix_v, gate), out_grad)
        return step

    return {"shared": run(q, upstream, cu, cu, longest, longest),
            "separate": run(q, upstream, cu, cu.clone(), longest, longest),
            "chunk": run(q_chunk, upstream_chunk, cu_chunk, cu, max(chunk_lengths), longest)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6,
                        help="timed repetitions per provider (median; a multiple of 3 starts each provider as often)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=DECODE_LENGTHS,
                        help="cache length of each row of the decode step")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=PREFILL_LENGTHS,
                        help="lengths of the packed prefill sequences")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" /
                        "cpu-ragged.txt", help="where to save the printed tables (and a .json of metadata)")
    args = parser.parse_args(argv)
    lines = []

    def emit(text: str = "") -> None:  # print, and keep the line for --out
        print(text)
        lines.append(text)

    torch.manual_seed(0)
    shape = dict(heads=args.heads, head_dim=args.head_dim, prefix_len=args.prefix_len)
    emit(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={args.heads} D={args.head_dim} "
         f"P={args.prefix_len}; median of {args.repeats} interleaved runs (shared machine: read the ratios)")
    path = _cpu_extension.cpu_path()
    emit(f"cpu kernels: {path[0]} variant, {path[1]}" if path else "cpu kernels: unavailable")

    emit(f"\n# ragged decode step: {len(args.decode_lengths)} rows, cache lengths {args.decode_lengths} in one "
         f"padded cache; milliseconds")
    emit("#   seqused_k: one call; gathered: per length group, keys gathered, one op call each (the thin model "
         "before issue 11); per_row: one call per row on views")
    emit(f"{'dtype':<5} | {'seqused_k':>9} {'gathered':>9} {'per_row':>9} | {'xgathered':>9} {'xper_row':>8}")
    for dt in args.dtypes:
        med = interleaved_medians(decode_providers(args.decode_lengths, dtype=DTYPES[dt], **shape), args.repeats,
                                  rotate=True)
        emit(f"{dt:<5} | {1e3 * med['seqused_k']:9.2f} {1e3 * med['gathered']:9.2f} {1e3 * med['per_row']:9.2f} | "
             f"{med['gathered'] / med['seqused_k']:9.2f} {med['per_row'] / med['seqused_k']:8.2f}")

    tokens = sum(args.prefill_lengths)
    emit(f"\n# packed prefill, causal: {len(args.prefill_lengths)} sequences of {args.prefill_lengths} "
         f"({tokens} tokens); milliseconds")
    emit("#   shared: cu_seqlens; separate: cu_seqlens_q/cu_seqlens_k of the same lengths (same work); chunk: the "
         "last half of each sequence's queries over all its keys (Sq_b < Sk_b)")
    emit(f"{'dtype':<5} {'pass':<4} | {'shared':>8} {'separate':>8} {'chunk':>8} | {'separate/shared':>15}")
    for dt in args.dtypes:
        for backward in (False, True):
            med = interleaved_medians(prefill_providers(args.prefill_lengths, dtype=DTYPES[dt], backward=backward,
                                                        **shape), args.repeats, rotate=True)
            emit(f"{dt:<5} {'f+b' if backward else 'fwd':<4} | {1e3 * med['shared']:8.1f} "
                 f"{1e3 * med['separate']:8.1f} {1e3 * med['chunk']:8.1f} | "
                 f"{med['separate'] / med['shared']:15.2f}")

    save_text_report(args.out, lines, "cpu-ragged", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
