// Register-tiled fp32 products of the attention kernels on AVX2 + FMA, the interface of tile_gemm_avx512.h for
// CPUs without AVX-512 (most Intel client chips, AMD Zen 1-3). As there, the B operands are packed once per
// (sequence, head) or read in place, so the tiles skip the repacking MKL does on every call.
//
//   C[M, N] (fp32) = alpha · A B  (+ C when accumulating),  accumulators of MR × 16 in registers (MR ≤ 6)
//
// A k step is one fp32 element: lane j gains A[i][k] B[k][j]. A is read at data + i * row_stride + k * k_stride
// (so a transposed view is read in place), B's row k at data + k * k_stride. Only fp32 is tiled: the variants
// without bf16 products run bf16 and fp16 inputs in fp32 (run_in_fp32 in attention_cpu.h).
// FASTADAPTER_CPU_GEMM=mkl forces MKL instead (the tests run both).
//
// Reference: at::matmul in fp64 (tests/kernels/test_cpu_backend.py compares every variant with the reference backend).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "tile_gemm_avx2.h is compiled in the avx2 variant only (kernels_avx2.cpp)"
#endif

namespace fastadapter_cpu::FASTADAPTER_ISA {

constexpr bool kHasTileGemm = true;

// The dtypes the tiles multiply.
template <typename T>
constexpr bool kTileable = std::is_same_v<T, float>;

// Elements of one k step (the interface of tile_gemm_avx512.h; here only fp32 is tiled).
template <typename T>
constexpr int64_t kStep = std::is_same_v<T, float> ? 1 : 2;

// Whether this call's products use the register tiles (fp32 only). With MKL they are opt-in
// (FASTADAPTER_CPU_GEMM=tiles): on the project's AVX2 EPYC, MKL's products measured faster than these tiles,
// interleaved in one process (fp32, B = 1, H = 32, D = 128: forward 1.36x at S = 512 and 1.29x at S = 1024,
// forward+backward 1.25x at S = 512, a decode step over 2048 keys 2.2x). Without MKL (at::addmm) the tiles are the
// default; FASTADAPTER_CPU_GEMM=mkl forces the library products either way. The tests run both.
template <typename T>
inline bool use_tile_gemm(int64_t head_dim) {
  (void)head_dim;
  if constexpr (!kTileable<T>) {
    return false;
  } else {
    const char* env = std::getenv("FASTADAPTER_CPU_GEMM");
#ifdef FASTADAPTER_WITH_MKL
    return env != nullptr && std::strcmp(env, "tiles") == 0;
#else
    return env == nullptr || std::strcmp(env, "mkl") != 0;
#endif
  }
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The A operand: element (i, k) at data + i * row_stride + k * k_stride.
template <typename T>
struct TileA {
  const T* data;
  int64_t row_stride;
  int64_t k_stride;
};

// The B operand: row k at data + k * k_stride.
template <typename T>
struct TileB {
  const T* data;
  int64_t k_stride;
};

namespace detail {

// Lanes [0, n) of an 8-lane vector, for the masked loads and stores of a partial column block.
inline __m256i lanes(int64_t n) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::clamp<int64_t>(n, 0, 8))), index);
}

// MR rows × 8·NV columns of C over all k steps; kFull: all 8·NV columns are in C (plain loads and stores).
// The MR · NV ≤ 12 accumulators, NV B vectors and one broadcast A value fill the 16 ymm registers; the loops
// over rows and vectors are unrolled completely so that `acc` stays in registers.
template <int MR, int NV, bool kFull>
__attribute__((always_inline)) inline void tile(int64_t steps, const TileA<float>& a, const TileB<float>& b, float* c,
                                                int64_t ldc, int64_t cols, float alpha, bool accumulate) {
  __m256i mask[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) mask[v] = lanes(cols - 8 * v);
  __m256 acc[MR][NV];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  const float* ak = a.data;
  const float* bk = b.data;
  for (int64_t k = 0; k < steps; ++k, ak += a.k_stride, bk += b.k_stride) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = kFull ? _mm256_loadu_ps(bk + 8 * v) : _mm256_maskload_ps(bk + 8 * v, mask[v]);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(ak + i * a.row_stride);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* out = c + i * ldc + 8 * v;
      __m256 r = _mm256_mul_ps(acc[i][v], va);
      if (kFull) {
        if (accumulate) r = _mm256_add_ps(r, _mm256_loadu_ps(out));
        _mm256_storeu_ps(out, r);
      } else {
        if (accumulate) r = _mm256_add_ps(r, _mm256_maskload_ps(out, mask[v]));
        _mm256_maskstore_ps(out, mask[v], r);
      }
    }
}

template <int NV, bool kFull>
inline void rows_of_tiles(int64_t m, int64_t steps, const TileA<float>& a, const TileB<float>& b, float* c,
                          int64_t ldc, int64_t cols, float alpha, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    tile<6, NV, kFull>(steps, TileA<float>{a.data + i * a.row_stride, a.row_stride, a.k_stride}, b, c + i * ldc,
                       ldc, cols, alpha, accumulate);
  const TileA<float> rest{a.data + i * a.row_stride, a.row_stride, a.k_stride};
  float* cr = c + i * ldc;
  switch (m - i) {
#define FASTADAPTER_TILE_CASE(R) \
  case R: tile<R, NV, kFull>(steps, rest, b, cr, ldc, cols, alpha, accumulate); break;
    FASTADAPTER_TILE_CASE(1) FASTADAPTER_TILE_CASE(2) FASTADAPTER_TILE_CASE(3) FASTADAPTER_TILE_CASE(4)
    FASTADAPTER_TILE_CASE(5)
#undef FASTADAPTER_TILE_CASE
    default: break;
  }
}

}  // namespace detail

// C[m, n] = alpha · A B (+ C when `accumulate`) over `steps` k steps. Reads exactly n columns of B.
template <typename T>
inline void tile_gemm(int64_t m, int64_t n, int64_t steps, float alpha, const TileA<T>& a, const TileB<T>& b,
                      bool accumulate, float* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float>, "the AVX2 tiles multiply fp32");
  if (m <= 0 || n <= 0) return;
  // 16 columns at a time: the B panel (steps × 16) stays in L1 while every row of A streams past it.
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t cols = std::min<int64_t>(16, n - j);
    const TileB<T> bj{b.data + j, b.k_stride};
    if (cols == 16)
      detail::rows_of_tiles<2, true>(m, steps, a, bj, c + j, ldc, cols, alpha, accumulate);
    else if (cols > 8)
      detail::rows_of_tiles<2, false>(m, steps, a, bj, c + j, ldc, cols, alpha, accumulate);
    else if (cols == 8)
      detail::rows_of_tiles<1, true>(m, steps, a, bj, c + j, ldc, cols, alpha, accumulate);
    else
      detail::rows_of_tiles<1, false>(m, steps, a, bj, c + j, ldc, cols, alpha, accumulate);
  }
}

// Pair-major bf16 rows (tile_gemm_avx512.h): never called here, where bf16 runs in fp32.
inline void interleave_rows(const float* x, int64_t rows, int64_t width, int64_t ld, at::BFloat16* out,
                            int64_t out_width) {
  (void)x, (void)rows, (void)width, (void)ld, (void)out, (void)out_width;
  TORCH_CHECK(false, "fastadapter_cpu: interleave_rows is part of the AVX512-BF16 tiles");
}

// The backward's pair-major probabilities and gradients (tile_gemm_avx512.h): never called here either.
inline void probability_and_grad_pairs(const float* s, const float* dp, int64_t ld, int64_t rows, int64_t width,
                                       const int64_t* seen, const float* lse, const float* delta, float scale,
                                       at::BFloat16* p_pairs, at::BFloat16* ds_pairs, int64_t out_width,
                                       at::BFloat16* ds_rows) {
  (void)s, (void)dp, (void)ld, (void)rows, (void)width, (void)seen, (void)lse, (void)delta, (void)scale,
      (void)p_pairs, (void)ds_pairs, (void)out_width, (void)ds_rows;
  TORCH_CHECK(false, "fastadapter_cpu: probability_and_grad_pairs is part of the AVX512-BF16 tiles");
}

// How an input [L, D] of one (sequence, head) becomes a B operand (the kinds of tile_gemm_avx512.h). Here only
// kTransposed: B = Xᵀ, element (d, j) = X[j][d], the keys of a score product (q kᵀ, dO vᵀ); fp32 rows (kRows) are
// read in place.
enum class PackKind { kTransposed, kRows, kColumns, kCopy };

// Packed panels of an input, one per (sequence, head): sequence n has `rows(n)` rows; the panels of different
// sequences differ in size (varlen), so each sequence's panels start at base[n]. plan_panels lays them out,
// pack_panel writes one, pack_panels all (the interface of tile_gemm_avx512.h).
template <typename T>
struct PackedPanels {
  PackKind kind = PackKind::kTransposed;
  int64_t head_dim = 0;
  T* data = nullptr;           // every panel (memory of the call's Workspace)
  std::vector<int64_t> base;   // [N] first element of sequence n's panels
  std::vector<int64_t> size;   // [N] elements of one panel of sequence n
  std::vector<int64_t> pitch;  // [N] k_stride of sequence n's panels

  TileB<T> at(int64_t n, int64_t h) const { return {data + base[n] + h * size[n], pitch[n]}; }
};

// The panels of `heads` heads of `num_seqs` sequences, sequence n of `rows(n)` rows, laid out in memory taken from
// `workspace` (workspace.h) and not yet written: pack_panel writes panel (n, h).
template <typename T, typename LenFn>
PackedPanels<T> plan_panels(PackKind kind, int64_t num_seqs, int64_t heads, int64_t head_dim, const LenFn& rows,
                            Workspace& workspace, bool zero_nonfinite = false) {
  static_assert(std::is_same_v<T, float>, "the AVX2 tiles multiply fp32");
  TORCH_CHECK(kind == PackKind::kTransposed && !zero_nonfinite,
              "fastadapter_cpu: fp32 rows are read in place, not packed");
  PackedPanels<T> packed;
  packed.kind = kind;
  packed.head_dim = head_dim;
  packed.base.resize(num_seqs);
  packed.size.resize(num_seqs);
  packed.pitch.resize(num_seqs);
  int64_t total = 0;
  for (int64_t n = 0; n < num_seqs; ++n) {
    // A whole number of cache lines plus one: a power-of-two pitch would map every row of a B panel to the same
    // few sets of the L1 (as in tile_gemm_avx512.h).
    packed.pitch[n] = round_up(rows(n), 16) + 16;
    packed.size[n] = head_dim * packed.pitch[n];
    packed.base[n] = total;
    total += heads * packed.size[n];
  }
  packed.data = workspace.take<float>(total);
  return packed;
}

// Writes panel (n, h) of `packed` from its `len` rows, row i at first + i · row_stride elements: the columns up to
// round_up(L, 16) (zeros past L), since the workspace holds what an earlier call left. `pair_buffer` unused here
// (the interface of tile_gemm_avx512.h).
template <typename T>
void pack_panel(const PackedPanels<T>& packed, int64_t n, int64_t h, int64_t len, const T* first, int64_t row_stride,
                std::vector<T>& /*pair_buffer*/) {
  const int64_t head_dim = packed.head_dim, pitch = packed.pitch[n];
  T* panel = packed.data + packed.base[n] + h * packed.size[n];
  // 16 rows at a time: their elements d are read together and written as one row segment of the panel.
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t block = std::min<int64_t>(16, len - j0);
    for (int64_t d = 0; d < head_dim; ++d) {
      T* o = panel + d * pitch + j0;
      for (int64_t jj = 0; jj < block; ++jj) o[jj] = first[(j0 + jj) * row_stride + d];
      for (int64_t jj = block; jj < 16; ++jj) o[jj] = 0.f;
    }
  }
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
