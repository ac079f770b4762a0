// bf16 products on AMX tiles (Sapphire Rapids and later): one `tdpbf16ps` multiplies a 16 × 32 bf16 tile of A
// by a 32 × 16 tile of B into a 16 × 16 fp32 tile of C, eight times the multiply rate of the `vdpbf16ps` register
// tiles (tile_gemm_avx512.h) on the same core. The operands are the register tiles' own: B pair-packed
// (pack_panels, interleave_rows: word (p, j) = (B[2p][j], B[2p+1][j]) at data + p · k_stride + 2 j), which is the
// layout AMX reads B in, and A row-major (k_stride 2, every row's K contiguous), which is the layout AMX reads A in.
// A product whose K runs over rows (pᵀ dO, dsᵀ q) is computed transposed instead (dOᵀ p, qᵀ ds), with A from
// PackKind::kColumns; see attention_backward.h.
//
//   C[M, N] (fp32) = alpha · A B  (+ C when accumulating), 32 × 32 blocks of C in four tiles (tmm0-3), A in
//   tmm4-5, B in tmm6-7
//
// Compiled in the avx512 variant when the compiler has AMX intrinsics (GCC 11 and later); used only where
// amx_usable() (dispatch.h) says the CPU and OS run them, and FASTADAPTER_CPU_GEMM does not say otherwise
// (use_amx below). The reference is the register tiles' tile_gemm and MKL's products: the tests
// run all three against the fp32 reference.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

// Included by tile_gemm.h after the variant's register tiles (TileA, TileB, round_up, and on AVX-512 the
// FASTADAPTER_HAS_TILE_GEMM helpers).

#if defined(FASTADAPTER_HAS_TILE_GEMM) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FASTADAPTER_HAS_AMX 1
#endif

namespace fastadapter_cpu::FASTADAPTER_ISA {

#ifdef FASTADAPTER_HAS_AMX
constexpr bool kHasAmx = true;
#else
constexpr bool kHasAmx = false;
#endif

template <typename T>
inline bool use_amx(int64_t head_dim) {
  if constexpr (!kHasAmx || !std::is_same_v<T, at::BFloat16>) {
    (void)head_dim;
    return false;
  } else {
    if (head_dim % 2 != 0 || !amx_usable()) return false;
    const char* env = std::getenv("FASTADAPTER_CPU_GEMM");
    return env == nullptr || (std::strcmp(env, "mkl") != 0 && std::strcmp(env, "tiles") != 0);
  }
}

#ifdef FASTADAPTER_HAS_AMX
namespace amx_detail {

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes: C 16 × 16 fp32, A 16 × 32 bf16, B 16 pairs × 16 words. Loaded on every call:
// MKL and oneDNN configure the tiles their own way on the same threads.
inline void configure_tiles() {
  TileConfig config;
  std::memset(&config, 0, sizeof(config));
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// C block [rows, cols] (≤ 32 × 32) = alpha · tiles (+ C): the four C tiles stored to `block` ([32, 32] fp32) first.
inline void write_block(const float* block, int64_t rows, int64_t cols, float alpha, bool accumulate, float* c,
                        int64_t ldc) {
  const __m512 va = _mm512_set1_ps(alpha);
  const __mmask16 m0 = detail::lanes(cols), m1 = detail::lanes(cols - 16);
  for (int64_t r = 0; r < rows; ++r) {
    float* out = c + r * ldc;
    __m512 x0 = _mm512_mul_ps(_mm512_load_ps(block + 32 * r), va);
    __m512 x1 = _mm512_mul_ps(_mm512_load_ps(block + 32 * r + 16), va);
    if (accumulate) {
      x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, out));
      x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, out + 16));
    }
    _mm512_mask_storeu_ps(out, m0, x0);
    if (cols > 16) _mm512_mask_storeu_ps(out + 16, m1, x1);
  }
}

}  // namespace amx_detail
#endif

// C[m, n] = alpha · A B (+ C when `accumulate`) over `steps` pairs of K (K = 2 · steps) on AMX. A: bf16 row-major,
// a.k_stride == 2, row i at a.data + i · a.row_stride. B: pair-packed, k row p at b.data + p · b.k_stride; every
// k row readable to round_up(n, 16) words (columns past n only reach columns of C that are never written). Rows of
// A past m and K past 2 · steps are never read: the last partial block of rows and the last partial chunk of K are
// copied into zero-padded scratch.
inline void amx_gemm(int64_t m, int64_t n, int64_t steps, float alpha, const TileA<at::BFloat16>& a,
                     const TileB<at::BFloat16>& b, bool accumulate, float* c, int64_t ldc) {
#ifdef FASTADAPTER_HAS_AMX
  using bf16 = at::BFloat16;
  TORCH_CHECK(a.k_stride == 2, "fastadapter_cpu: amx_gemm reads A row-major (k_stride 2), got ", a.k_stride);
  if (m <= 0 || n <= 0 || steps <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < std::max<int64_t>(m, 0); ++i) std::fill_n(c + i * ldc, std::max<int64_t>(n, 0), 0.f);
    return;
  }
  const int64_t chunks = steps / 16;      // K chunks of 32 read in place
  const int64_t tail = steps - 16 * chunks;  // pairs of the last chunk, copied and zero-padded
  const int64_t n_words = round_up(n, 32);
  thread_local std::vector<bf16> a_rows, a_tail, b_tail;
  thread_local std::vector<float> block_storage;
  if (block_storage.size() < 32 * 32 + 16) block_storage.resize(32 * 32 + 16);
  float* block = reinterpret_cast<float*>(round_up(reinterpret_cast<intptr_t>(block_storage.data()), 64));
  if (tail > 0) {
    // A's last chunk for every row (round_up(m, 32) rows of 32; rows past m only reach rows of C never written)
    // and B's last chunk (16 pair rows of n_words words), K past 2 · steps zero in both: a stale NaN there would
    // reach every element of C as 0 · NaN.
    if (a_tail.size() < static_cast<size_t>(round_up(m, 32) * 32)) a_tail.resize(round_up(m, 32) * 32);
    for (int64_t i = 0; i < m; ++i) {
      bf16* dst = a_tail.data() + i * 32;
      std::memcpy(dst, a.data + i * a.row_stride + 32 * chunks, 2 * tail * sizeof(bf16));
      std::memset(dst + 2 * tail, 0, (32 - 2 * tail) * sizeof(bf16));
    }
    if (b_tail.size() < static_cast<size_t>(16 * 2 * n_words)) b_tail.resize(16 * 2 * n_words);
    for (int64_t p = 0; p < tail; ++p)
      std::memcpy(b_tail.data() + p * 2 * n_words, b.data + (16 * chunks + p) * b.k_stride, 2 * n * sizeof(bf16));
    std::memset(b_tail.data() + tail * 2 * n_words, 0, (16 - tail) * 2 * n_words * sizeof(bf16));
  }
  amx_detail::configure_tiles();
  const int64_t b_bytes = b.k_stride * static_cast<int64_t>(sizeof(bf16));
  const int64_t c_bytes = ldc * static_cast<int64_t>(sizeof(float));
  const int64_t tail_b_bytes = 2 * n_words * static_cast<int64_t>(sizeof(bf16));
  for (int64_t i0 = 0; i0 < m; i0 += 32) {
    const int64_t rows = std::min<int64_t>(32, m - i0);
    const bool two_rows = rows > 16;
    const bf16* ai = a.data + i0 * a.row_stride;
    int64_t a_ld = a.row_stride;
    if (rows < 32 && chunks > 0) {  // the last partial block of rows: read from a copy, never past row m
      a_ld = 32 * chunks;  // rows past `rows` stay as they are: they only reach rows of C never written
      if (a_rows.size() < static_cast<size_t>(32 * a_ld)) a_rows.resize(32 * a_ld);
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(a_rows.data() + i * a_ld, ai + i * a.row_stride, a_ld * sizeof(bf16));
      ai = a_rows.data();
    }
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
      const bool two_cols = n - j0 > 16;
      // A whole 32 × 32 block with alpha 1 goes straight between C and the tiles; others pass through `block`.
      const bool direct = alpha == 1.f && rows == 32 && n - j0 >= 32;
      float* cb = c + i0 * ldc + j0;
      if (direct && accumulate) {
        _tile_loadd(0, cb, c_bytes);
        _tile_loadd(1, cb + 16, c_bytes);
        _tile_loadd(2, cb + 16 * ldc, c_bytes);
        _tile_loadd(3, cb + 16 * ldc + 16, c_bytes);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      // K chunks in place, then the zero-padded copy of the last partial one.
      for (int64_t kc = 0; kc < chunks + (tail > 0 ? 1 : 0); ++kc) {
        const bool copied = kc == chunks;
        const bf16* ak = copied ? a_tail.data() + i0 * 32 : ai + 32 * kc;
        const int64_t ak_ld = copied ? 32 : a_ld;
        const bf16* bk = copied ? b_tail.data() + 2 * j0 : b.data + 16 * kc * b.k_stride + 2 * j0;
        const int64_t bk_bytes = copied ? tail_b_bytes : b_bytes;
        _tile_loadd(4, ak, ak_ld * static_cast<int64_t>(sizeof(bf16)));
        _tile_loadd(6, bk, bk_bytes);
        _tile_dpbf16ps(0, 4, 6);
        if (two_cols) {
          _tile_loadd(7, bk + 32, bk_bytes);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
          _tile_loadd(5, ak + 16 * ak_ld, ak_ld * static_cast<int64_t>(sizeof(bf16)));
          _tile_dpbf16ps(2, 5, 6);
          if (two_cols) _tile_dpbf16ps(3, 5, 7);
        }
      }
      if (direct) {
        _tile_stored(0, cb, c_bytes);
        _tile_stored(1, cb + 16, c_bytes);
        _tile_stored(2, cb + 16 * ldc, c_bytes);
        _tile_stored(3, cb + 16 * ldc + 16, c_bytes);
        continue;
      }
      _tile_stored(0, block, 128);
      _tile_stored(1, block + 16, 128);
      _tile_stored(2, block + 16 * 32, 128);
      _tile_stored(3, block + 16 * 32 + 16, 128);
      amx_detail::write_block(block, rows, std::min<int64_t>(32, n - j0), alpha, accumulate, cb, ldc);
    }
  }
  _tile_release();
#else
  (void)m, (void)n, (void)steps, (void)alpha, (void)a, (void)b, (void)accumulate, (void)c, (void)ldc;
  TORCH_CHECK(false, "fastadapter_cpu: amx_gemm needs a build with AMX intrinsics (GCC 11 or later)");
#endif
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
