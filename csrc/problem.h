// The description of one call of the CPU kernels, shared by the input checks (registration.cpp) and every kernel
// variant (dispatch.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastadapter_cpu {

// Sizes and options of one call. Batched inputs have `num_seqs` = B sequences of seqlen_q / seqlen_k rows;
// varlen inputs have N sequences whose rows start at cu_seqlens[n] (self-attention: Sq == Sk per sequence).
struct Problem {
  int64_t num_seqs = 0;
  int64_t seqlen_q = 0;  // batched: Sq; varlen: unused (see rows_q)
  int64_t seqlen_k = 0;
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  int64_t head_dim = 0;
  int64_t prefix_len = 0;
  int64_t prefix_batch = 1;  // 1 (shared prompt) or num_seqs
  int64_t gate_batch = 1;    // 1 or num_seqs
  const int32_t* cu_seqlens = nullptr;
  bool causal = true;
  bool gate_tanh = true;
  float scale = 1.f;

  int64_t group() const { return heads_q / heads_kv; }
  int64_t rows_q(int64_t n) const { return cu_seqlens ? cu_seqlens[n + 1] - cu_seqlens[n] : seqlen_q; }
  int64_t rows_k(int64_t n) const { return cu_seqlens ? cu_seqlens[n + 1] - cu_seqlens[n] : seqlen_k; }
  int64_t prefix_row(int64_t n) const { return prefix_batch == 1 ? 0 : n; }
  // Varlen: the first packed token after the last sequence. Tokens from there on (cu_seqlens[N] < T) belong
  // to no sequence: their output and gradients are 0, their log-sum-exps -inf.
  int64_t packed_end() const { return cu_seqlens ? cu_seqlens[num_seqs] : 0; }
  // Index of the last key query row `i` of sequence `n` may see, plus one (bottom-right causal alignment).
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

}  // namespace fastadapter_cpu
