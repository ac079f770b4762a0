// The 16 × 16 register transpose of the avx512 variant: 32-bit lanes, so fp32 values or pairs of bf16 alike (the
// shuffles move bits, never round them). Used where rows must become columns: dkᵀ and dvᵀ back to rows
// (transpose_scaled), 16 rows' sums or softmaxes at once (row_dots, gated_softmax_rows), the keys' panels
// (pack_panels' transpose_words).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace fastadapter_cpu::FASTADAPTER_ISA {

// Transposes the 16 × 16 block v[0..15] (v[i] = row i) in registers: v[j] becomes column j.
__attribute__((always_inline)) inline void transpose_16x16(__m512 (&v)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // pairs of rows, interleaved by element
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // quads: 4 rows' elements 4k..4k+3 in each 128-bit lane
    v[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    v[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    v[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    v[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: rows 0-7 and 8-15 each gathered by lane pairs
    t[i] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0xDD);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
#endif
