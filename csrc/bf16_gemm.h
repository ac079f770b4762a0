// bf16 tile GEMMs on AVX512-BF16 (`vdpbf16ps`): the attention kernels' bf16 matrix products, at twice the
// multiply rate of fp32 FMA on the same cores (MKL's bf16 GEMM does not use these instructions on every CPU).
//
//   C[M, N] (fp32) = alpha · A B  (+ C when accumulating)
//
// `vdpbf16ps` multiplies pairs: lane j of the result gains A[i][2p] B[2p][j] + A[i][2p+1] B[2p+1][j]. So
//  * A is read as 32-bit words, word (i, p) = (A[i][2p], A[i][2p+1]), at `data + i * row_stride + p * pair_stride`
//    (elements): a row-major matrix with even K has row_stride = lda, pair_stride = 2; a "pair-major" buffer
//    built from two rows at a time (see interleave_rows) has row_stride = 2, pair_stride = 2 · width;
//  * B is "pair-packed": word (p, j) = (B[2p][j], B[2p+1][j]) at `data + p * pair_stride + 2 j`, columns padded
//    with zeros to a multiple of 32 so that full vectors can always be loaded.
// Packed operands come from pack_transposed (B = Xᵀ for X rows [L, D]: the keys of q kᵀ) and pack_row_pairs
// (B = X, pairs of consecutive rows: the values of p v), once per (sequence, head) panel, O(S) memory.
//
// The instructions exist only with AVX512-BF16 (`-march=native` on such a CPU): elsewhere kHasBf16Dot is false
// and the kernels keep the MKL path. FASTADAPTER_CPU_BF16_GEMM=mkl forces that path (tests run both).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define FASTADAPTER_HAS_BF16_DOT 1
#endif

namespace fastadapter_cpu {

#ifdef FASTADAPTER_HAS_BF16_DOT
constexpr bool kHasBf16Dot = true;
#else
constexpr bool kHasBf16Dot = false;
#endif

// Whether the bf16 products of this call use the `vdpbf16ps` tiles (head_dim must be even: q's rows are read
// as pairs in place).
inline bool use_bf16_dot(int64_t head_dim) {
  if (!kHasBf16Dot || head_dim % 2 != 0) return false;
  const char* env = std::getenv("FASTADAPTER_CPU_BF16_GEMM");
  return env == nullptr || std::strcmp(env, "mkl") != 0;
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// A bf16 operand read as pairs (see the file comment).
struct PairsA {
  const at::BFloat16* data;
  int64_t row_stride;   // elements between rows i and i + 1
  int64_t pair_stride;  // elements between pairs p and p + 1
};

// A pair-packed B (see the file comment): word (p, j) at data + p * pair_stride + 2 j.
struct PairsB {
  const at::BFloat16* data;
  int64_t pair_stride;
};

#ifdef FASTADAPTER_HAS_BF16_DOT
namespace detail {

inline __m512bh broadcast_pair(const at::BFloat16* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return (__m512bh)_mm512_set1_epi32(word);
}

// MR rows × 16·NV columns of C, all `pairs` pairs of K: accumulators stay in registers (MR · NV ≤ 16 zmm).
template <int MR, int NV>
inline void tile(int64_t pairs, const at::BFloat16* a, int64_t a_row, int64_t a_pair, const at::BFloat16* b,
                 int64_t b_pair, float* c, int64_t ldc, int64_t cols, float alpha, bool accumulate) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * b_pair + 32 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512bh av = broadcast_pair(a + i * a_row + p * a_pair);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int v = 0; v < NV; ++v) {
    const int64_t left = cols - 16 * v;
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    for (int i = 0; i < MR; ++i) {
      float* out = c + i * ldc + 16 * v;
      __m512 r = _mm512_mul_ps(acc[i][v], va);
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, out));
      _mm512_mask_storeu_ps(out, mask, r);
    }
  }
}

template <int NV>
inline void rows_of_tiles(int64_t m, int64_t pairs, const PairsA& a, const at::BFloat16* b, int64_t b_pair,
                          float* c, int64_t ldc, int64_t cols, float alpha, bool accumulate) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    tile<8, NV>(pairs, a.data + i * a.row_stride, a.row_stride, a.pair_stride, b, b_pair, c + i * ldc, ldc, cols,
                alpha, accumulate);
  const at::BFloat16* ar = a.data + i * a.row_stride;
  float* cr = c + i * ldc;
  switch (m - i) {
#define FASTADAPTER_TILE_CASE(R) \
  case R: tile<R, NV>(pairs, ar, a.row_stride, a.pair_stride, b, b_pair, cr, ldc, cols, alpha, accumulate); break;
    FASTADAPTER_TILE_CASE(1) FASTADAPTER_TILE_CASE(2) FASTADAPTER_TILE_CASE(3) FASTADAPTER_TILE_CASE(4)
    FASTADAPTER_TILE_CASE(5) FASTADAPTER_TILE_CASE(6) FASTADAPTER_TILE_CASE(7)
#undef FASTADAPTER_TILE_CASE
    default: break;
  }
}

}  // namespace detail
#endif

// C[m, n] = alpha · A B (+ C when `accumulate`), K = 2 · pairs (A and B zero where K is padded).
// B's columns must be readable (zero) up to round_up(n, 32).
inline void bf16_dot_gemm(int64_t m, int64_t n, int64_t pairs, float alpha, const PairsA& a, const PairsB& b,
                          bool accumulate, float* c, int64_t ldc) {
#ifdef FASTADAPTER_HAS_BF16_DOT
  if (m <= 0 || n <= 0) return;
  // 32 columns at a time: the B panel (pairs × 32 words) stays in L1 while every row of A streams past it.
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t cols = std::min<int64_t>(32, n - j);
    const at::BFloat16* bj = b.data + 2 * j;
    if (cols > 16)
      detail::rows_of_tiles<2>(m, pairs, a, bj, b.pair_stride, c + j, ldc, cols, alpha, accumulate);
    else
      detail::rows_of_tiles<1>(m, pairs, a, bj, b.pair_stride, c + j, ldc, cols, alpha, accumulate);
  }
#else
  (void)m, (void)n, (void)pairs, (void)alpha, (void)a, (void)b, (void)accumulate, (void)c, (void)ldc;
  TORCH_CHECK(false, "fastadapter_cpu: bf16_dot_gemm needs AVX512-BF16");
#endif
}

// Rows 2u and 2u + 1 of an fp32 [rows, width] block (leading dimension ld) as bf16 words
// (x[2u][j], x[2u+1][j]) at out[u * 2 · out_width + 2 j]: the pair-major A of a product whose K runs over the
// rows (pᵀ dO, dsᵀ q). An odd last row is paired with zeros; columns from width to out_width are zero.
inline void interleave_rows(const float* x, int64_t rows, int64_t width, int64_t ld, at::BFloat16* out,
                            int64_t out_width) {
#ifdef FASTADAPTER_HAS_BF16_DOT
  // Lane order of (a0..a15, b0..b15) -> (a0, b0, a1, b1, ...).
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(kInterleave);
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

// Pair-packed panels of a bf16 input, one per (sequence, head): sequence n has `rows(n)` rows; the panels of
// different sequences differ in size (varlen), so each sequence's panels start at base[n].
struct PackedPanels {
  at::Tensor storage;          // bf16, every panel, zero-padded
  std::vector<int64_t> base;   // [N] first element of sequence n's panels
  std::vector<int64_t> size;   // [N] elements of one panel of sequence n
  std::vector<int64_t> pitch;  // [N] pair_stride of sequence n's panels
  int64_t heads = 0;

  PairsB at(int64_t n, int64_t h) const {
    return {storage.const_data_ptr<at::BFloat16>() + base[n] + h * size[n], pitch[n]};
  }
};

// Panels for B = Xᵀ, X the rows [L, D] of one (sequence, head): word (p, j) = (X[j][2p], X[j][2p+1]), L padded
// to a multiple of 32. `row(n, h, j)` points at row j. Product: scores q Xᵀ (q kᵀ; dO vᵀ).
// Panels for B = X with pairs of rows: word (u, d) = (X[2u][d], X[2u+1][d]), D padded to a multiple of 32.
// Product: p X over the rows (p v; ds k; pᵀ dO; dsᵀ q).
enum class PackKind { kTransposed, kRowPairs };

template <typename RowFn, typename LenFn>
PackedPanels pack_panels(PackKind kind, int64_t num_seqs, int64_t heads, int64_t head_dim, const LenFn& rows,
                         const RowFn& row) {
  PackedPanels packed;
  packed.heads = heads;
  packed.base.resize(num_seqs);
  packed.size.resize(num_seqs);
  packed.pitch.resize(num_seqs);
  const int64_t pairs_d = (head_dim + 1) / 2, padded_d = round_up(head_dim, 32);
  int64_t total = 0;
  for (int64_t n = 0; n < num_seqs; ++n) {
    const int64_t len = rows(n);
    if (kind == PackKind::kTransposed) {
      packed.pitch[n] = 2 * round_up(len, 32);
      packed.size[n] = pairs_d * packed.pitch[n];
    } else {
      packed.pitch[n] = 2 * padded_d;
      packed.size[n] = ((len + 1) / 2) * packed.pitch[n];
    }
    packed.base[n] = total;
    total += heads * packed.size[n];
  }
  packed.storage = at::zeros({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kBFloat16));
  at::BFloat16* out = packed.storage.data_ptr<at::BFloat16>();
  at::parallel_for(0, num_seqs * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / heads, h = task % heads, len = rows(n);
      at::BFloat16* panel = out + packed.base[n] + h * packed.size[n];
      const int64_t pitch = packed.pitch[n];
      if (kind == PackKind::kTransposed) {
        // 32-bit words: panel word (p, j) = X word (j, p), a transpose of the [L, D/2] word matrix.
        for (int64_t j = 0; j < len; ++j) {
          const at::BFloat16* x = row(n, h, j);
          for (int64_t p = 0; p < head_dim / 2; ++p) std::memcpy(panel + p * pitch + 2 * j, x + 2 * p, 4);
          if (head_dim % 2) panel[(pairs_d - 1) * pitch + 2 * j] = x[head_dim - 1];
        }
      } else {
        for (int64_t u = 0; u < (len + 1) / 2; ++u) {
          const at::BFloat16* x0 = row(n, h, 2 * u);
          const at::BFloat16* x1 = 2 * u + 1 < len ? row(n, h, 2 * u + 1) : nullptr;
          at::BFloat16* o = panel + u * pitch;
          for (int64_t d = 0; d < head_dim; ++d) {
            o[2 * d] = x0[d];
            if (x1) o[2 * d + 1] = x1[d];
          }
        }
      }
    }
  });
  return packed;
}

}  // namespace fastadapter_cpu
