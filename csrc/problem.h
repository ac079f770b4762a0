// The description of one call of the CPU kernels, shared by the input checks (registration.cpp) and every kernel
// variant (dispatch.h).
#pragma once

#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastadapter_cpu {

// Sizes and options of one call (the op's general form, as flash_attn_varlen_func):
//
//   dense   q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]: `num_seqs` = B sequences of seqlen_q queries and seqlen_k keys
//   varlen  q [Tq, Hq, D], k/v [Tk, Hkv, D]: N sequences, the queries of sequence n are the packed rows
//           [cu_seqlens_q[n], cu_seqlens_q[n + 1]), its keys [cu_seqlens_k[n], cu_seqlens_k[n + 1])
//
// In both, `seqused_k` (int32 [num_seqs], optional) says that sequence n uses only its first seqused_k[n] keys:
// a padded KV cache read up to each row's length. Every kernel reads keys through rows_k, so the keys past it
// are never read, and their gradients are 0.
struct Problem {
  int64_t num_seqs = 0;
  int64_t seqlen_q = 0;  // dense: Sq; varlen: max_seqlen_q (an upper bound, see rows_q)
  int64_t seqlen_k = 0;  // dense: Sk; varlen: max_seqlen_k
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  int64_t head_dim = 0;
  int64_t prefix_len = 0;
  int64_t prefix_batch = 1;  // 1 (shared prompt) or num_seqs
  int64_t gate_batch = 1;    // 1 or num_seqs
  const int32_t* cu_seqlens_q = nullptr;  // [N + 1], varlen only (then cu_seqlens_k is set too)
  const int32_t* cu_seqlens_k = nullptr;  // [N + 1], varlen only (may be the same array as cu_seqlens_q)
  const int32_t* seqused_k = nullptr;     // [N], optional in both modes
  bool causal = true;
  bool gate_tanh = true;
  float scale = 1.f;

  bool varlen() const { return cu_seqlens_q != nullptr; }
  int64_t group() const { return heads_q / heads_kv; }
  // Query rows of sequence n.
  int64_t rows_q(int64_t n) const { return cu_seqlens_q ? cu_seqlens_q[n + 1] - cu_seqlens_q[n] : seqlen_q; }
  // Key rows sequence n holds (its length in k and v), whether it uses them all or not.
  int64_t stored_k(int64_t n) const { return cu_seqlens_k ? cu_seqlens_k[n + 1] - cu_seqlens_k[n] : seqlen_k; }
  // Key rows sequence n uses: Sk_b of the contract (seqused_k[n] when given).
  int64_t rows_k(int64_t n) const { return seqused_k ? seqused_k[n] : stored_k(n); }
  // The most query (key) rows of any sequence.
  int64_t longest_q() const {
    int64_t longest = 0;
    for (int64_t n = 0; n < num_seqs; ++n) longest = std::max(longest, rows_q(n));
    return longest;
  }
  int64_t longest_k() const {
    int64_t longest = 0;
    for (int64_t n = 0; n < num_seqs; ++n) longest = std::max(longest, rows_k(n));
    return longest;
  }
  int64_t prefix_row(int64_t n) const { return prefix_batch == 1 ? 0 : n; }
  // Varlen: the first packed query (key) token after the last sequence. Tokens from there on (cu_seqlens[N] < T)
  // belong to no sequence: their output and gradients are 0, their log-sum-exps -inf.
  int64_t packed_end_q() const { return cu_seqlens_q ? cu_seqlens_q[num_seqs] : 0; }
  int64_t packed_end_k() const { return cu_seqlens_k ? cu_seqlens_k[num_seqs] : 0; }
  // Index of the last key query row `i` of sequence `n` may see, plus one: bottom-right causal alignment, query i
  // of Sq_n sees key j iff j <= i + Sk_n - Sq_n (Sk_n = the keys used).
  int64_t visible_keys(int64_t n, int64_t i) const {
    const int64_t sk = rows_k(n);
    if (!causal) return sk;
    return std::clamp<int64_t>(i + sk - rows_q(n) + 1, 0, sk);
  }
  // The gate value γ of sequence n, query head h (gate is fp32 [gate_batch, Hq], contiguous).
  float gamma(const float* gate, int64_t n, int64_t h) const {
    const float raw = gate[(gate_batch == 1 ? 0 : n) * heads_q + h];
    return gate_tanh ? std::tanh(raw) : raw;
  }
};

// Shape of the fp32 log-sum-exps (lse_w, lse_p) of a call whose query has sizes `q_sizes`: [B, Hq, Sq] for a dense
// q [B, Sq, Hq, D], [Hq, Tq] for a packed (varlen) q [Tq, Hq, D]. The C++ side of one fact whose Python side is
// `lse_shape` in kernels/problem.py (fastadapter.kernels.problem: the op's fake, the Triton kernels); the two
// take the same arguments and must give the same shape.
inline std::vector<int64_t> lse_shape(c10::IntArrayRef q_sizes, bool varlen) {
  const int64_t heads_q = q_sizes[q_sizes.size() - 2];
  if (varlen) return {heads_q, q_sizes[0]};
  return {q_sizes[0], heads_q, q_sizes[1]};
}

}  // namespace fastadapter_cpu
