// decode_linear: out[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]) for the few rows of a decoding step (M ≤ ~16), the
// shape in which a step of generation spends most of its time (every weight of the model is read once per step).
//
// Why not MKL: for a handful of rows against a weight stored [N, K] (nn.Linear's layout), MKL's sgemm packs the
// weight into panels before multiplying, so the weight crosses memory more than once; measured on a 2-core AVX2
// EPYC at one thread, M = 8: 1.6x faster than at::linear on the 32000 × 512 output head, 1.7-2.3x on a LLaMA
// layer's 512 × 512 and 512 × 1408 projections (benchmarks/bench_decode_linear.py prints the figures here).
//
// How: each weight row is streamed once. A register tile holds kRows rows of x against kCols rows of w, one
// vector accumulator per (row, column) pair (4 × 3 = 12 accumulators + 3 weight vectors + 1 x vector: the 16
// registers of AVX2); x (M × K, a few KB) stays in L1 while the weight streams. The tail of K (K not a multiple of
// the vector width) is summed in scalar code, rows beyond a multiple of kRows run in narrower tiles. Weights in
// bf16 or fp16 are widened to fp32 in registers (half the bytes of fp32 to read); x is converted to fp32 once, and
// every product accumulates in fp32. Threads split the weight rows (at::parallel_for).
//
// Compiled into every kernel variant (dispatch.h): at::vec's Vectorized<float> is 8 lanes on AVX2 and 16 on
// AVX-512; the generic variant (FASTADAPTER_DECODE_LINEAR_ON_ATEN) calls at::linear, since at::vec's portable code
// is not vectorised.
#pragma once

#include "attention_cpu.h"  // Vec, load_float, run_in_fp32

namespace fastadapter_cpu::FASTADAPTER_ISA {
namespace decode_linear_kernel {

constexpr int kRows = 4;  // rows of x per register tile
constexpr int kCols = 3;  // rows of w per register tile

// out[r, c] (r < ROWS, c < COLS; out row stride ldo) = Σ_k x[r, k] w[c, k]: x fp32 rows of stride K, w rows of
// stride K.
template <int ROWS, int COLS, typename W>
inline void tile(const float* x, const W* w, int64_t K, float* out, int64_t ldo) {
  Vec acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = Vec(0.f);
  constexpr int64_t lanes = Vec::size();
  const int64_t k_vec = K - K % lanes;
  for (int64_t k = 0; k < k_vec; k += lanes) {
    Vec wv[COLS];
    for (int c = 0; c < COLS; ++c) wv[c] = load_float(w + c * K + k);
    for (int r = 0; r < ROWS; ++r) {
      const Vec xv = Vec::loadu(x + r * K + k);
      for (int c = 0; c < COLS; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < COLS; ++c) {
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[r][c]);
      for (int64_t k = k_vec; k < K; ++k) sum += x[r * K + k] * static_cast<float>(w[c * K + k]);
      out[r * ldo + c] = sum;
    }
  }
}

// Rows [0, M) of x against COLS weight rows: full tiles of kRows, then the remaining rows one tile.
template <int COLS, typename W>
inline void column_block(const float* x, int64_t M, const W* w, int64_t K, float* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + kRows <= M; r += kRows) tile<kRows, COLS>(x + r * K, w, K, out + r * ldo, ldo);
  switch (M - r) {
    case 3: tile<3, COLS>(x + r * K, w, K, out + r * ldo, ldo); break;
    case 2: tile<2, COLS>(x + r * K, w, K, out + r * ldo, ldo); break;
    case 1: tile<1, COLS>(x + r * K, w, K, out + r * ldo, ldo); break;
    default: break;
  }
}

// out_f32 [M, N] = x_f32 [M, K] · w [N, K]ᵀ, weight rows split over threads in blocks of kCols.
template <typename W>
void run(const float* x, int64_t M, const W* w, int64_t N, int64_t K, float* out) {
  const int64_t blocks = (N + kCols - 1) / kCols;
  // About 64 KB of weight per task: small layers stay on one thread, the output head spreads over all of them.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kCols * K * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kCols;
      const W* wb = w + n * K;
      float* ob = out + n;
      switch (std::min<int64_t>(kCols, N - n)) {
        case 3: column_block<3>(x, M, wb, K, ob, N); break;
        case 2: column_block<2>(x, M, wb, K, ob, N); break;
        default: column_block<1>(x, M, wb, K, ob, N); break;
      }
    }
  });
}

}  // namespace decode_linear_kernel

// x [M, K] and weight [N, K] contiguous, one dtype (fp32, bf16 or fp16), bias [N] of that dtype or undefined;
// checked by registration.cpp. Returns [M, N] in x's dtype.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
#ifdef FASTADAPTER_DECODE_LINEAR_ON_ATEN
  // The generic variant: at::vec's portable code is not vectorised, so the tiles would be several times slower
  // than MKL here (measured: 0.1x on fp32 M = 8).
  return at::linear(x, weight, bias);
#else
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor x32 = run_in_fp32(x);
  at::Tensor out32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = x32.const_data_ptr<float>();
  float* op = out32.data_ptr<float>();
  switch (weight.scalar_type()) {
    case at::kBFloat16:
      decode_linear_kernel::run(xp, M, weight.const_data_ptr<at::BFloat16>(), N, K, op);
      break;
    case at::kHalf:
      decode_linear_kernel::run(xp, M, weight.const_data_ptr<at::Half>(), N, K, op);
      break;
    default:
      decode_linear_kernel::run(xp, M, weight.const_data_ptr<float>(), N, K, op);
      break;
  }
  if (bias) out32.add_(bias->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
#endif
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
