// e^x on the lanes of a vector, for the attention kernels' softmax (the forward's word and prefix rows, the
// backward's recomputed probabilities). Included by attention_cpu.h and tile_gemm_avx512.h after at::vec, in the
// kernel variant's namespace.
//
// AVX-512: e^x = 2^n · e^r with n = round(x · log2(e)) and r = x − n · ln(2); e^r by a degree-6 polynomial and 2^n
// by vscalefps: fourteen instructions where at::vec's exp_u20 takes twenty (the exp is most of the softmax's
// arithmetic). Within 2 ulp of e^x wherever that is a normal float; 0 below (as exp_u20, so that no denormal
// reaches the sums) and for −inf; +inf from 88.8 on; NaN for NaN.
// Elsewhere (AVX2, generic) at::vec's exp_u20, which is also the reference the tests compare with.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace fastadapter_cpu::FASTADAPTER_ISA {

inline at::vec::Vectorized<float> exp_lanes(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // n = round(x · log2(e)), at most 200, so that +inf gives inf (a NaN x gives NaN through r below)
  const __m512 t = _mm512_min_ps(_mm512_set1_ps(200.f), _mm512_mul_ps(__m512(x), _mm512_set1_ps(1.44269504088896341f)));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x − n · ln 2 in two parts (Cody and Waite; n · kLn2High is exact), |r| ≤ ln(2) / 2
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), __m512(x));
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // e^r by its Taylor polynomial of degree 6 (error r^7 / 7! ≤ 1.2e-7 relative)
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __mmask16 tiny = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.f), _CMP_LT_OQ);  // and −inf
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
#else
  return x.exp_u20();
#endif
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
