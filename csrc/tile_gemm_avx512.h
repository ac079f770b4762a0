// Register-tiled products of the attention kernels on AVX-512: fp32 FMA, and bf16 pair dots (`vdpbf16ps`) at
// twice the multiply rate of fp32 on the same cores (MKL's bf16 GEMM does not use them on every CPU: on this
// project's AMD machine it runs no faster than fp32). Their B operands are packed once per (sequence, head), so
// the tiles skip the repacking MKL does on every call (a sixth of the forward's time at 2048 tokens).
//
//   C[M, N] (fp32) = alpha · A B  (+ C when accumulating),  accumulators of MR × 32 in registers
//
// A k step is one fp32 element, or for bf16 one pair of elements: lane j gains A[i][2p] B[2p][j] +
// A[i][2p+1] B[2p+1][j]. So for bf16 A is read as 32-bit words (A[i][2p], A[i][2p+1]) and B is "pair-packed":
// word (p, j) = (B[2p][j], B[2p+1][j]) at data + p * k_stride + 2 j. pack_panels makes every B operand.
//
// The tiles need AVX-512F/BW and AVX512-BF16 (the avx512 variant, kernels_avx512.cpp): elsewhere (the generic
// variant) kHasTileGemm is false and the kernels use MKL. bf16 runs on AMX tiles over the same panels where the
// CPU has them (tile_gemm_amx.h); on Intel CPUs fp32 (and bf16 without AMX) takes MKL's own products instead
// (use_tile_gemm). FASTADAPTER_CPU_GEMM=mkl / =tiles / =amx force a choice (the tests run each). fp16 always uses
// MKL.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "transpose_16x16.h"
#include "vec_exp.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define FASTADAPTER_HAS_TILE_GEMM 1
#endif

namespace fastadapter_cpu::FASTADAPTER_ISA {

#ifdef FASTADAPTER_HAS_TILE_GEMM
constexpr bool kHasTileGemm = true;
#else
constexpr bool kHasTileGemm = false;
#endif

// The dtypes the tiles multiply.
template <typename T>
constexpr bool kTileable = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;

// Elements of one k step: one fp32, a pair of bf16.
template <typename T>
constexpr int64_t kStep = std::is_same_v<T, float> ? 1 : 2;

// Whether this call's bf16 products run on AMX tiles (tile_gemm_amx.h): by default wherever the CPU and OS run
// them (amx_usable, dispatch.h) and the build has the intrinsics; FASTADAPTER_CPU_GEMM=tiles (the vdpbf16ps
// register tiles) or =mkl turns them off, =amx asks for them (still only where they run). head_dim even, as for
// the register tiles. The AMX kernels keep the register tiles' structure and packed operands (use_tile_gemm).
template <typename T>
inline bool use_amx(int64_t head_dim);

// Whether this call's products use the register tiles (or, for bf16, the AMX tiles: use_amx): fp32, and bf16
// with an even head_dim (q's rows are read as pairs in place). By default where MKL is not native (AMD:
// mkl_is_native, dispatch.h) or AMX runs bf16, and always without MKL; FASTADAPTER_CPU_GEMM=tiles or =mkl forces
// the choice (the tests run both).
template <typename T>
inline bool use_tile_gemm(int64_t head_dim) {
  if constexpr (!kTileable<T>) {
    return false;
  } else {
    if (!kHasTileGemm || head_dim % kStep<T> != 0) return false;
    const char* env = std::getenv("FASTADAPTER_CPU_GEMM");
    if (env != nullptr && std::strcmp(env, "mkl") == 0) return false;
    if (env != nullptr && std::strcmp(env, "tiles") == 0) return true;
    if (use_amx<T>(head_dim)) return true;
#ifdef FASTADAPTER_WITH_MKL
    return !mkl_is_native();
#else
    return true;
#endif
  }
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// The A operand of a product: k step (i, k) at data + i * row_stride + k * k_stride (elements). A row-major matrix
// has row_stride = lda and k_stride = kStep; fp32 reads a transposed view in place (pᵀ: row_stride 1,
// k_stride ld); bf16 reads a pair-major buffer from interleave_rows (row_stride 2, k_stride 2 · width).
template <typename T>
struct TileA {
  const T* data;
  int64_t row_stride;
  int64_t k_stride;
};

// The B operand: k row k (fp32 elements, or bf16 pairs) at data + k * k_stride.
template <typename T>
struct TileB {
  const T* data;
  int64_t k_stride;
};

#ifdef FASTADAPTER_HAS_TILE_GEMM
namespace detail {

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// The lane order that turns cvtne2ps_pbh(b, a) = (a0..a15, b0..b15) into pair words (a0, b0, a1, b1, ...).
inline __m512i pair_order() {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(kInterleave);
}

// MR rows × 16·NV columns of C over all k steps. The MR · NV ≤ 16 accumulators must stay in registers: the loops
// over rows and vectors are unrolled completely (GCC otherwise kept part of `acc` on the stack and stored it at
// every step, which measured 4x slower inside the backward kernel). kPrefetch: each k step also prefetches the two
// cache lines (32 columns) of `next_b`'s k row, the block of B that tile_gemm reads next.
template <int MR, int NV, typename T, bool kPrefetch = false>
__attribute__((always_inline)) inline void tile(int64_t steps, const TileA<T>& a, const TileB<T>& b, float* c,
                                                int64_t ldc, int64_t cols, float alpha, bool accumulate,
                                                const T* next_b = nullptr) {
  __mmask16 mask[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) mask[v] = lanes(cols - 16 * v);
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const T* ak = a.data;
  const T* bk = b.data;
  for (int64_t k = 0; k < steps; ++k, ak += a.k_stride, bk += b.k_stride) {
    if constexpr (kPrefetch) {
      const char* nb = reinterpret_cast<const char*>(next_b + k * b.k_stride);
      _mm_prefetch(nb, _MM_HINT_T0);
      _mm_prefetch(nb + 64, _MM_HINT_T0);
    }
    if constexpr (std::is_same_v<T, float>) {
      __m512 bv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], bk + 16 * v);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(ak[i * a.row_stride]);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
      }
    } else {
      __m512bh bv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_maskz_loadu_epi32(mask[v], bk + 32 * v);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        int32_t word;
        std::memcpy(&word, ak + i * a.row_stride, sizeof(word));
        const __m512bh av = (__m512bh)_mm512_set1_epi32(word);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
      }
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* out = c + i * ldc + 16 * v;
      __m512 r = _mm512_mul_ps(acc[i][v], va);
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask[v], out));
      _mm512_mask_storeu_ps(out, mask[v], r);
    }
}

template <int NV, typename T>
inline void rows_of_tiles(int64_t m, int64_t steps, const TileA<T>& a, const TileB<T>& b, float* c, int64_t ldc,
                          int64_t cols, float alpha, bool accumulate, const T* next_b) {
  int64_t i = 0;
  if (next_b != nullptr && m >= 8) {
    tile<8, NV, T, true>(steps, a, b, c, ldc, cols, alpha, accumulate, next_b);
    i = 8;
  }
  for (; i + 8 <= m; i += 8)
    tile<8, NV>(steps, TileA<T>{a.data + i * a.row_stride, a.row_stride, a.k_stride}, b, c + i * ldc, ldc, cols,
                alpha, accumulate);
  const TileA<T> rest{a.data + i * a.row_stride, a.row_stride, a.k_stride};
  float* cr = c + i * ldc;
  switch (m - i) {
#define FASTADAPTER_TILE_CASE(R) \
  case R: tile<R, NV>(steps, rest, b, cr, ldc, cols, alpha, accumulate); break;
    FASTADAPTER_TILE_CASE(1) FASTADAPTER_TILE_CASE(2) FASTADAPTER_TILE_CASE(3) FASTADAPTER_TILE_CASE(4)
    FASTADAPTER_TILE_CASE(5) FASTADAPTER_TILE_CASE(6) FASTADAPTER_TILE_CASE(7)
#undef FASTADAPTER_TILE_CASE
    default: break;
  }
}

}  // namespace detail
#endif

// C[m, n] = alpha · A B (+ C when `accumulate`) over `steps` k steps (bf16: K = 2 · steps, A and B zero where K
// is padded). Reads exactly n columns of B.
template <typename T>
inline void tile_gemm(int64_t m, int64_t n, int64_t steps, float alpha, const TileA<T>& a, const TileB<T>& b,
                      bool accumulate, float* c, int64_t ldc) {
#ifdef FASTADAPTER_HAS_TILE_GEMM
  if (m <= 0 || n <= 0) return;
  // 32 columns at a time: the B panel (steps × 32) stays in L1 while every row of A streams past it. The first 8
  // rows prefetch the next 32 columns' k rows: those lie a page or more apart (a kᵀ panel's pitch is L + 16
  // elements, fp32 v is read in place, Hkv · D apart), and no hardware prefetcher follows a stream across pages.
  // The register tiles' forward ran 1.06-1.10x faster with it at S = 2048 (B = 1, Hq = 32, Hkv = 8, D = 128,
  // 2-core AMD Zen 5; as fast with Hkv = 32), forward + backward 1.02-1.03x.
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t cols = std::min<int64_t>(32, n - j);
    const TileB<T> bj{b.data + kStep<T> * j, b.k_stride};
    const T* next_b = j + 32 < n ? bj.data + kStep<T> * 32 : nullptr;
    if (cols > 16)
      detail::rows_of_tiles<2>(m, steps, a, bj, c + j, ldc, cols, alpha, accumulate, next_b);
    else
      detail::rows_of_tiles<1>(m, steps, a, bj, c + j, ldc, cols, alpha, accumulate, next_b);
  }
#else
  (void)m, (void)n, (void)steps, (void)alpha, (void)a, (void)b, (void)accumulate, (void)c, (void)ldc;
  TORCH_CHECK(false, "fastadapter_cpu: tile_gemm needs AVX-512 with BF16");
#endif
}

// Rows 2u and 2u + 1 of an fp32 [rows, width] block (leading dimension ld) as bf16 words
// (x[2u][j], x[2u+1][j]) at out[u * 2 · out_width + 2 j]: the pair-major A of a product whose K runs over the
// rows (pᵀ dO, dsᵀ q). An odd last row is paired with zeros; columns from width to out_width are zero.
inline void interleave_rows(const float* x, int64_t rows, int64_t width, int64_t ld, at::BFloat16* out,
                            int64_t out_width) {
#ifdef FASTADAPTER_HAS_TILE_GEMM
  const __m512i order = detail::pair_order();
  for (int64_t u = 0; u < (rows + 1) / 2; ++u) {
    const float* r0 = x + 2 * u * ld;
    const float* r1 = 2 * u + 1 < rows ? r0 + ld : nullptr;
    at::BFloat16* o = out + u * 2 * out_width;
    for (int64_t j = 0; j < out_width; j += 16) {
      const int64_t left = std::min<int64_t>(16, std::max<int64_t>(width - j, 0));
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 a = _mm512_maskz_loadu_ps(mask, r0 + j);
      const __m512 b = r1 ? _mm512_maskz_loadu_ps(mask, r1 + j) : _mm512_setzero_ps();
      const __m512i ab = _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(b, a));
      const int64_t words = std::min<int64_t>(16, out_width - j);
      _mm512_mask_storeu_epi32(o + 2 * j, words >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << words) - 1), ab);
    }
  }
#else
  (void)x, (void)rows, (void)width, (void)ld, (void)out, (void)out_width;
  TORCH_CHECK(false, "fastadapter_cpu: interleave_rows needs AVX512-BF16");
#endif
}

// The backward's probabilities and their gradient for a block of query rows, computed from the scores and written
// as the bf16 products read them, in one pass where exp_shift_sum, map2, two fills, interleave_rows (twice) and
// convert_row take seven. For row r and each key j < seen[r] it sees:
//   p = exp(scale · s[r][j] − lse[r]),  ds = p · (dp[r][j] − delta[r])
// and every other key gives exactly 0, whatever s and dp hold there (a masked key's dp may be NaN). Out:
//  - p_pairs, ds_pairs: pair-major, interleave_rows' layout (rows 2u and 2u + 1 as words of pair row u,
//    out_width ≥ width words per pair row, an odd last row paired with zeros);
//  - ds_rows: ds as bf16 rows (leading dimension ld), an odd width padded with one zero column (pairs of keys),
//    which the product ds k reads and masked_rows_product's keys added row by row too.
// s, dp: fp32 [rows, ld], only read; seen, lse, delta: [rows]. The reference is that seven-pass sequence
// (attention_backward.h, the MKL branch of word_pass, and the tests' reference implementation).
inline void probability_and_grad_pairs(const float* s, const float* dp, int64_t ld, int64_t rows, int64_t width,
                                       const int64_t* seen, const float* lse, const float* delta, float scale,
                                       at::BFloat16* p_pairs, at::BFloat16* ds_pairs, int64_t out_width,
                                       at::BFloat16* ds_rows) {
#ifdef FASTADAPTER_HAS_TILE_GEMM
  using Vec = at::vec::Vectorized<float>;
  const __m512i order = detail::pair_order();
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t row_words = width + (width & 1);
  const int64_t end = std::max(out_width, row_words);
  // p and ds of one row over the 16 keys from j: lanes past the row's keys are 0.
  auto row_part = [&](int64_t r, int64_t j, __m512& p, __m512& ds) {
    const __mmask16 live = detail::lanes(std::clamp<int64_t>(seen[r] - j, 0, 16));
    if (live == 0) {
      p = ds = _mm512_setzero_ps();
      return;
    }
    const __m512 x = _mm512_maskz_loadu_ps(live, s + r * ld + j);
    const __m512 e = exp_lanes(Vec(_mm512_fmsub_ps(x, vscale, _mm512_set1_ps(lse[r]))));
    p = _mm512_maskz_mov_ps(live, e);
    const float* g = dp + r * ld + j;
    ds = _mm512_maskz_mul_ps(live, p, _mm512_sub_ps(_mm512_maskz_loadu_ps(live, g), _mm512_set1_ps(delta[r])));
  };
  for (int64_t u = 0; u < (rows + 1) / 2; ++u) {
    const int64_t r0 = 2 * u;
    const bool second = r0 + 1 < rows;
    for (int64_t j = 0; j < end; j += 16) {
      __m512 p0, ds0, p1 = _mm512_setzero_ps(), ds1 = _mm512_setzero_ps();
      row_part(r0, j, p0, ds0);
      if (second) row_part(r0 + 1, j, p1, ds1);
      if (j < out_width) {
        const __mmask16 words = detail::lanes(out_width - j);
        const int64_t at = u * 2 * out_width + 2 * j;
        _mm512_mask_storeu_epi32(p_pairs + at, words, _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
        _mm512_mask_storeu_epi32(ds_pairs + at, words,
                                 _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(ds1, ds0)));
      }
      if (j < row_words) {
        const __mmask16 keys = detail::lanes(row_words - j);
        _mm256_mask_storeu_epi16(ds_rows + r0 * ld + j, keys, (__m256i)_mm512_cvtneps_pbh(ds0));
        if (second) _mm256_mask_storeu_epi16(ds_rows + (r0 + 1) * ld + j, keys, (__m256i)_mm512_cvtneps_pbh(ds1));
      }
    }
  }
#else
  (void)s, (void)dp, (void)ld, (void)rows, (void)width, (void)seen, (void)lse, (void)delta, (void)scale,
      (void)p_pairs, (void)ds_pairs, (void)out_width, (void)ds_rows;
  TORCH_CHECK(false, "fastadapter_cpu: probability_and_grad_pairs needs AVX512-BF16");
#endif
}

// How an input [L, D] of one (sequence, head) becomes an operand:
//  kTransposed: B = Xᵀ, the keys of a score product (q kᵀ, dO vᵀ). fp32: element (d, j) = X[j][d]; bf16: word
//    (p, j) = (X[j][2p], X[j][2p+1]).
//  kRows (bf16): B = X with its rows in pairs, word (u, d) = (X[2u][d], X[2u+1][d]), for a product over the rows
//    (p v, ds k, pᵀ dO, dsᵀ q). fp32 reads such rows in place: a copy measured no faster.
//  kColumns (bf16): A = Xᵀ row-major, element (d, i) = X[i][d] (word (d, u) = word (u, d) of kRows), the A operand
//    of an AMX product over the rows (dOᵀ p, qᵀ ds: tile_gemm_amx.h).
//  kCopy (bf16): A = X row-major with its rows contiguous, element (i, d) at i · D + d (TileB::k_stride = D), the A
//    operand of an AMX product over D (q kᵀ, dO vᵀ). X's own rows of one head lie Hq · D elements apart (8 KB for
//    LLaMA-7B), so a tile of 16 of them touches 16 pages, which nothing prefetches: the backward's two score
//    products took 1.7x fewer cycles on the copy (2-core Xeon with AMX, bf16, S = 512, Hq = 32, Hkv = 8).
enum class PackKind { kTransposed, kRows, kColumns, kCopy };

// Packed panels of an input, one per (sequence, head): sequence n has `rows(n)` rows; the panels of different
// sequences differ in size (varlen), so each sequence's panels start at base[n]. plan_panels lays them out,
// pack_panel writes one, pack_panels all.
template <typename T>
struct PackedPanels {
  PackKind kind = PackKind::kTransposed;
  int64_t head_dim = 0;
  T* data = nullptr;           // every panel (memory of the call's Workspace)
  std::vector<int64_t> base;   // [N] first element of sequence n's panels
  std::vector<int64_t> size;   // [N] elements of one panel of sequence n
  std::vector<int64_t> pitch;  // [N] k_stride of sequence n's panels

  // kRows packed with zero_nonfinite: nonfinite[first_row[n] + h · rows(n) + i] says row i of head h of sequence n
  // held a NaN or infinity (zeroed in the panel); null otherwise.
  uint8_t* nonfinite = nullptr;
  std::vector<int64_t> first_row;

  TileB<T> at(int64_t n, int64_t h) const { return {data + base[n] + h * size[n], pitch[n]}; }
  const uint8_t* nonfinite_rows(int64_t n, int64_t h, int64_t rows) const { return nonfinite + first_row[n] + h * rows; }
};


#ifdef FASTADAPTER_HAS_TILE_GEMM
namespace detail {

// Word (t, p) of `src` (rows of `src_words` 32-bit words) for t < len, p < words, transposed: word p of rows
// j .. j + 15 at out + p · pitch + j (words), 16 rows × 16 words at a time through a register transpose
// (transpose_16x16): the bf16 backward's packing took a quarter fewer cycles than with one gather per word (S = 512,
// 2-core Xeon). Columns up to round_up(len, 16) written (zeros past len).
inline void transpose_words(const int32_t* src, int64_t src_words, int64_t len, int64_t words, int32_t* out,
                            int64_t pitch) {
  for (int64_t j = 0; j < len; j += 16) {
    const int64_t live = std::min<int64_t>(16, len - j);
    const int32_t* x = src + j * src_words;
    for (int64_t p0 = 0; p0 < words; p0 += 16) {
      const int64_t count = std::min<int64_t>(16, words - p0);
      const __mmask16 cols = lanes(count);
      __m512 v[16];
#pragma GCC unroll 16
      for (int64_t i = 0; i < 16; ++i)
        v[i] = i < live ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(cols, x + i * src_words + p0))
                        : _mm512_setzero_ps();
      transpose_16x16(v);
      for (int64_t c = 0; c < count; ++c) _mm512_storeu_si512(out + (p0 + c) * pitch + j, _mm512_castps_si512(v[c]));
    }
  }
}

// Rows 2u and 2u + 1 of a bf16 [len, width] block (row stride `stride`) as words (x[2u][d], x[2u+1][d]) at
// out + u · pitch + 2 d, for u < (len + 1) / 2 (an odd last row paired with zeros). With `nonfinite` (len flags),
// NaN and infinities are written as 0 and their rows flagged.
inline void pair_rows(const at::BFloat16* x, int64_t stride, int64_t len, int64_t width, at::BFloat16* out,
                      int64_t pitch, uint8_t* nonfinite = nullptr) {
  const __m256i exponent = _mm256_set1_epi16(0x7F80);
  // Lane order of (x0[0..15], x1[0..15]) -> (x0[0], x1[0], x0[1], x1[1], ...).
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t u = 0; u < (len + 1) / 2; ++u) {
    const at::BFloat16* x0 = x + 2 * u * stride;
    const bool partner = 2 * u + 1 < len;
    at::BFloat16* o = out + u * pitch;
    for (int64_t d = 0; d < width; d += 16) {
      const __mmask16 valid = lanes(width - d);
      __m256i a = _mm256_maskz_loadu_epi16(valid, x0 + d);
      __m256i b = partner ? _mm256_maskz_loadu_epi16(valid, x0 + stride + d) : _mm256_setzero_si256();
      if (nonfinite) {  // all exponent bits set: infinity or NaN
        const __mmask16 bad_a = _mm256_cmpeq_epi16_mask(_mm256_and_si256(a, exponent), exponent);
        const __mmask16 bad_b = _mm256_cmpeq_epi16_mask(_mm256_and_si256(b, exponent), exponent);
        if (bad_a) {
          a = _mm256_maskz_mov_epi16(static_cast<__mmask16>(~bad_a), a);
          nonfinite[2 * u] = 1;
        }
        if (bad_b) {
          b = _mm256_maskz_mov_epi16(static_cast<__mmask16>(~bad_b), b);
          nonfinite[2 * u + 1] = 1;
        }
      }
      const __m512i ab = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), interleave, _mm512_castsi256_si512(b));
      _mm512_mask_storeu_epi32(o + 2 * d, valid, ab);
    }
  }
}

}  // namespace detail
#endif

// The panels of `heads` heads of `num_seqs` sequences, sequence n of `rows(n)` rows, laid out in memory taken from
// `workspace` (workspace.h) and not yet written: pack_panel writes panel (n, h), so that a task can pack the panels
// it reads itself, while they are still in its cache. head_dim a multiple of kStep<T>.
// `zero_nonfinite` (kRows): the panels hold 0 for NaN and infinities and `nonfinite` flags their rows, for a
// product over keys that some rows must not see (masked_rows_product).
template <typename T, typename LenFn>
PackedPanels<T> plan_panels(PackKind kind, int64_t num_seqs, int64_t heads, int64_t head_dim, const LenFn& rows,
                            Workspace& workspace, bool zero_nonfinite = false) {
  static_assert(kTileable<T>);
  TORCH_CHECK(!zero_nonfinite || kind == PackKind::kRows, "fastadapter_cpu: zero_nonfinite packs rows (kRows) only");
  constexpr int64_t step = kStep<T>;
  TORCH_CHECK(head_dim % step == 0, "fastadapter_cpu: pack_panels needs head_dim a multiple of ", step, ", got ",
              head_dim);
  TORCH_CHECK((std::is_same_v<T, at::BFloat16>) || kind == PackKind::kTransposed,
              "fastadapter_cpu: fp32 rows are read in place, not packed");
  PackedPanels<T> packed;
  packed.kind = kind;
  packed.head_dim = head_dim;
  packed.base.resize(num_seqs);
  packed.size.resize(num_seqs);
  packed.pitch.resize(num_seqs);
  const int64_t words_d = head_dim / step;  // 32-bit words of one row
  int64_t total = 0;
  for (int64_t n = 0; n < num_seqs; ++n) {
    const int64_t len = rows(n), pairs = (len + step - 1) / step;
    // Pitches of a whole number of cache lines plus one: a power-of-two pitch (2 KB for 512 bf16 keys) would
    // map every row of a B panel to the same few sets of the 8-way L1 and evict the panel while it is in use.
    switch (kind) {
      case PackKind::kTransposed:
        packed.pitch[n] = step * (round_up(len, 16) + 16);
        packed.size[n] = words_d * packed.pitch[n];
        break;
      case PackKind::kRows:
        packed.pitch[n] = step * (round_up(head_dim, 16) + 16);
        packed.size[n] = pairs * packed.pitch[n];
        break;
      case PackKind::kColumns:
        packed.pitch[n] = step * (round_up(pairs, 16) + 16);
        packed.size[n] = head_dim * packed.pitch[n];
        break;
      case PackKind::kCopy:
        packed.pitch[n] = head_dim;
        packed.size[n] = len * head_dim;
        break;
    }
    packed.base[n] = total;
    total += heads * packed.size[n];
  }
  packed.data = workspace.take<T>(total);
  if (zero_nonfinite) {
    packed.first_row.resize(num_seqs);
    int64_t flags = 0;
    for (int64_t n = 0; n < num_seqs; ++n) {
      packed.first_row[n] = flags;
      flags += heads * rows(n);
    }
    packed.nonfinite = workspace.take<uint8_t>(flags);  // written by pack_panel
  }
  return packed;
}

// Writes panel (n, h) of `packed` from its `len` rows (len = the plan's rows(n)), row i at first + i · row_stride
// elements. Everything the tiles read is written, whatever the workspace held: kTransposed, the columns up to
// round_up(L, 16); kRows, the head_dim columns of every row (odd bf16 partners as zeros); kColumns, the columns up
// to round_up(L, 32) (zeros past L); kCopy, every row. `pair_buffer`: scratch of kColumns.
// Rows a kilobyte or more apart (q and dO of LLaMA-7B: 8 KB) are read without software prefetches: prefetching the
// next 16 rows measured no faster, after a cache flush as back to back (bf16 forward and forward + backward, S = 512).
template <typename T>
void pack_panel(const PackedPanels<T>& packed, int64_t n, int64_t h, int64_t len, const T* first, int64_t row_stride,
                std::vector<T>& pair_buffer) {
#ifdef FASTADAPTER_HAS_TILE_GEMM
  if (len == 0) return;
  constexpr int64_t step = kStep<T>;
  const int64_t head_dim = packed.head_dim, pitch = packed.pitch[n];
  T* panel = packed.data + packed.base[n] + h * packed.size[n];
  if (packed.kind == PackKind::kTransposed) {
    // Panel word (p, j) = word p of row j.
    detail::transpose_words(reinterpret_cast<const int32_t*>(first), row_stride / step, len, head_dim / step,
                            reinterpret_cast<int32_t*>(panel), pitch / step);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (packed.kind == PackKind::kCopy) {
      for (int64_t i = 0; i < len; ++i) std::memcpy(panel + i * head_dim, first + i * row_stride, head_dim * sizeof(T));
    } else if (packed.kind == PackKind::kRows) {
      uint8_t* flags = packed.nonfinite ? packed.nonfinite + packed.first_row[n] + h * len : nullptr;
      if (flags) std::memset(flags, 0, len);  // pair_rows flags the rows it zeroes
      detail::pair_rows(first, row_stride, len, head_dim, panel, pitch, flags);
    } else {
      const int64_t pairs = (len + 1) / 2;
      pair_buffer.resize(pairs * 2 * head_dim);
      detail::pair_rows(first, row_stride, len, head_dim, pair_buffer.data(), 2 * head_dim);
      detail::transpose_words(reinterpret_cast<const int32_t*>(pair_buffer.data()), head_dim, pairs, head_dim,
                              reinterpret_cast<int32_t*>(panel), pitch / 2);
    }
  }
#else
  (void)packed, (void)n, (void)h, (void)len, (void)first, (void)row_stride, (void)pair_buffer;
  TORCH_CHECK(false, "fastadapter_cpu: pack_panel needs AVX512-BF16");
#endif
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
