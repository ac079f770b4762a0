// Shared pieces of the CPU kernels of zero-init attention (DESIGN.md §1): how a (sequence, head, row) maps to
// memory, row-major tile GEMMs, vectorised row helpers and the work scheduler.
//
// Compiled once per kernel variant (kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp, see dispatch.h):
// everything here lives in the variant's namespace fastadapter_cpu::FASTADAPTER_ISA, so the copies compiled for
// different instruction sets never merge at link time.
#pragma once

#ifndef FASTADAPTER_ISA
#error "attention_cpu.h is compiled inside a kernel variant (csrc/kernels_*.cpp), which defines FASTADAPTER_ISA"
#endif

// at::vec picks its implementation from CPU_CAPABILITY_* macros that PyTorch defines per kernel file; here they
// follow the instruction set of the variant being compiled (its target pragma and macros), and the variant
// names at::vec's inline namespace (CPU_CAPABILITY), so that these instantiations can never be confused with
// libtorch's or another variant's.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX2
#endif
#ifndef CPU_CAPABILITY
#error "a kernel variant defines CPU_CAPABILITY (at::vec's namespace) before including attention_cpu.h"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "transpose_16x16.h"
#include "vec_exp.h"

namespace fastadapter_cpu::FASTADAPTER_ISA {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Where element (sequence n, head h, row i, 0) of a tensor lives. Covers [B, S, H, D] tensors with any strides
// (transposed bhsd views included), packed varlen [T, H, D] tensors, and the lse layouts [B, H, S] / [H, T].
struct RowLayout {
  int64_t batch_stride = 0;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
  const int32_t* cu_seqlens = nullptr;  // rows of sequence n start at cu_seqlens[n] (varlen)
  int64_t first_head = 0;               // the first head the rows hold (a buffer of some heads only)

  int64_t offset(int64_t n, int64_t h, int64_t i) const {
    const int64_t row = cu_seqlens ? static_cast<int64_t>(cu_seqlens[n]) + i : i;
    return (cu_seqlens ? 0 : n * batch_stride) + row * row_stride + (h - first_head) * head_stride;
  }
};

// A data pointer and its layout.
template <typename T>
struct Rows {
  T* data = nullptr;
  RowLayout layout;
  T* at(int64_t n, int64_t h, int64_t i) const { return data + layout.offset(n, h, i); }
  int64_t ld() const { return layout.row_stride; }
};

// Layout of a [B, S, H, D] (4-d) or varlen [T, H, D] (3-d) tensor whose last dimension is contiguous.
inline RowLayout bshd_layout(const at::Tensor& t, const int32_t* cu_seqlens) {
  RowLayout l;
  if (t.dim() == 4) {
    l.batch_stride = t.stride(0);
    l.row_stride = t.stride(1);
    l.head_stride = t.stride(2);
  } else {
    l.row_stride = t.stride(0);
    l.head_stride = t.stride(1);
    l.cu_seqlens = cu_seqlens;
  }
  return l;
}

// Layout of the contiguous fp32 lse: [B, Hq, Sq] batched, [Hq, T] varlen.
inline RowLayout lse_layout(const at::Tensor& lse, const int32_t* cu_seqlens) {
  RowLayout l;
  l.row_stride = 1;
  if (cu_seqlens) {
    l.head_stride = lse.size(1);
    l.cu_seqlens = cu_seqlens;
  } else {
    l.batch_stride = lse.size(1) * lse.size(2);
    l.head_stride = lse.size(2);
  }
  return l;
}

template <typename T>
Rows<const T> rows_of(const at::Tensor& t, const int32_t* cu_seqlens) {
  return Rows<const T>{t.const_data_ptr<T>(), bshd_layout(t, cu_seqlens)};
}

template <typename T>
Rows<T> mutable_rows_of(at::Tensor& t, const int32_t* cu_seqlens) {
  return Rows<T>{t.data_ptr<T>(), bshd_layout(t, cu_seqlens)};
}

// The dtypes of the kernels, fp32 accumulation: fp32, bf16 and fp16 in a variant with reduced-precision
// products (FASTADAPTER_REDUCED_PRECISION_PRODUCTS: AVX512-BF16 tiles, MKL's bf16/fp16 GEMMs); elsewhere fp32
// only, and the entry points run bf16 and fp16 inputs in fp32 (see run_in_fp32).
#ifdef FASTADAPTER_REDUCED_PRECISION_PRODUCTS
constexpr bool kReducedPrecisionProducts = true;
#define FASTADAPTER_DISPATCH(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
#else
constexpr bool kReducedPrecisionProducts = false;
#define FASTADAPTER_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__))
#endif

// A bf16/fp16 input as the fp32 tensor a variant without reduced-precision products computes on: one exact
// conversion of O(S·D) elements per call, against the O(S²·D) work of the kernels, and each result is rounded
// once (at the end), where MKL's bf16 GEMM would need the probabilities and ds rounded to bf16 before every
// product. The fp32 tiles are also the fast products of these CPUs (benchmarks/cpu_kernel_targets.py).
inline at::Tensor run_in_fp32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// k or v ([B, S, Hkv, D] or varlen [Tk, Hkv, D]) as run_in_fp32 gives it, but with seqused_k only the key rows
// the kernels read are converted (the rest of the fp32 copy is left unwritten and is never read): a decode step
// over a padded KV cache converts each row's used keys, not the whole cache, which would cost as much as the
// step itself (defined below, after the row helpers).
at::Tensor used_keys_in_fp32(const Problem& pb, const at::Tensor& t);

// -- tile GEMMs ------------------------------------------------------------------------------------------------
//
// C[m, n] = alpha · op(A) op(B) + beta · C, all row-major, C in fp32. op(X) = Xᵀ when the flag is set.
// With MKL (every x86 build of PyTorch links it into libtorch_cpu and exports these entry points) the tiles go
// straight to MKL's single-threaded kernels: inside at::parallel_for MKL does not spawn threads of its own.
// bf16/fp16 tiles use MKL's mixed-precision GEMMs (bf16 × bf16 → fp32, AMX where the CPU has it), which is
// also what PyTorch's own flash-attention CPU kernel does.
#ifdef FASTADAPTER_WITH_MKL
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
}
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: swap the operands, keep the flags.
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int mi = int(n), ni = int(m), ki = int(k), la = int(ldb), lb = int(lda), lc = int(ldc);
  sgemm_(&trb, &tra, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
}
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* a,
                 int64_t lda, const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_gemm_bf16bf16f32(kCblasRowMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans,
                         int(m), int(n), int(k), alpha, reinterpret_cast<const uint16_t*>(a), int(lda),
                         reinterpret_cast<const uint16_t*>(b), int(ldb), beta, c, int(ldc));
}
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const at::Half* a, int64_t lda,
                 const at::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_gemm_f16f16f32(kCblasRowMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans,
                       int(m), int(n), int(k), alpha, reinterpret_cast<const uint16_t*>(a), int(lda),
                       reinterpret_cast<const uint16_t*>(b), int(ldb), beta, c, int(ldc));
}
#else
// Portable path (PyTorch built without MKL): the tiles as strided tensor views through at::addmm_.
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1},
                           at::TensorOptions().dtype(dtype));
    return (trans ? t.t() : t).to(at::kFloat);
  };
  auto ct = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (k == 0) {  // C = beta C, with C not read when beta is 0 (BLAS)
    if (beta == 0.f) ct.zero_();
    else ct.mul_(beta);
    return;
  }
  ct.addmm_(view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, alpha);
}
#endif

// -- vectorised rows -------------------------------------------------------------------------------------------

// x in lanes [0, count), `fill` in the others (a compare and a blend, where Vec::set is a call with a switch).
inline Vec first_lanes(const Vec& x, int64_t count, float fill) {
  return Vec::blendv(Vec(fill), x, Vec::arange(0.f, 1.f) < Vec(static_cast<float>(count)));
}

// Lane 0 of x: a register move where at::vec's store(ptr, 1) is a masked store, whose value a load right after it
// cannot take from the store buffer (it waits for the store to reach the cache).
inline float first_lane(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtss_f32(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtss_f32(x);
#else
  float lanes[Vec::size()];
  x.store(lanes);
  return lanes[0];
#endif
}

// max(x, acc) per lane for a row's running max. AVX-512: one vmaxps, a lane where x is NaN giving acc's, where
// at::vec::maximum adds a compare and a blend per call and the blend lengthens the chain of the running max; the
// row's NaN still reaches its result, because every caller exponentiates the row against the max and sums the exps,
// and exp_lanes carries a NaN score into the sum (vec_exp.h). Elsewhere at::vec::maximum, which keeps the NaN in
// the max itself (at::vec's exp_u20 clamps a NaN to a number): the reference.
inline Vec max_lanes(const Vec& x, const Vec& acc) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(x, acc);
#else
  return at::vec::maximum(x, acc);
#endif
}

// max_j x[j] for j < n (−inf when n = 0), through max_lanes: on AVX-512 a NaN of the row is left to the exps that
// follow (see there). Vector lanes throughout, four running maxima, the last partial vector blended with −inf, so
// that short rows (the prefix's P ~ 10 keys) take no scalar loop.
inline float row_max(const float* x, int64_t n) {
  constexpr int64_t kLanes = Vec::size();
  Vec acc0(kNegInf), acc1(kNegInf), acc2(kNegInf), acc3(kNegInf);
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    acc0 = max_lanes(Vec::loadu(x + j), acc0);
    acc1 = max_lanes(Vec::loadu(x + j + kLanes), acc1);
    acc2 = max_lanes(Vec::loadu(x + j + 2 * kLanes), acc2);
    acc3 = max_lanes(Vec::loadu(x + j + 3 * kLanes), acc3);
  }
  for (; j + kLanes <= n; j += kLanes) acc0 = max_lanes(Vec::loadu(x + j), acc0);
  if (j < n) acc1 = max_lanes(first_lanes(Vec::loadu(x + j, n - j), n - j, kNegInf), acc1);
  Vec acc = max_lanes(max_lanes(acc0, acc1), max_lanes(acc2, acc3));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return max_lanes(a, b); }, acc);
}

// x[j] = exp(scale · x[j] − shift) for j < n; returns the sum. The attention kernels pass unscaled scores q kᵀ
// and the softmax scale here, so that their products need no epilogue.
inline float exp_shift_sum(float* x, int64_t n, float shift, float scale = 1.f) {
  const Vec vshift(shift), vscale(scale);
  Vec vsum(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = exp_lanes(at::vec::fmsub(Vec::loadu(x + j), vscale, vshift));
    e.store(x + j);
    vsum = vsum + e;
  }
  if (j < n) {
    Vec e = exp_lanes(at::vec::fmsub(Vec::loadu(x + j, n - j), vscale, vshift));
    e.store(x + j, n - j);
    vsum = vsum + first_lanes(e, n - j, 0.f);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

// out = e^x as the softmax of the kernels computes it (exp_lanes, vec_exp.h), x and out fp32 contiguous of one
// shape: the tests hold it against the exact exp.
void softmax_exp(const at::Tensor& x, const at::Tensor& out) {
  const float* src = x.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 4096, [&](int64_t begin, int64_t end) {
    at::vec::map([](Vec v) { return exp_lanes(v); }, dst + begin, src + begin, end - begin);
  });
}

// out[0, count) = the first `count` (≤ 2 · Vec::size()) of a's lanes then b's, rounded to T (bf16 or fp16) to
// nearest even. The avx512 variant rounds bf16 with AVX512-BF16's vcvtne2ps2bf16 (which reads fp32 denormals as
// 0); elsewhere at::vec rounds.
template <typename T>
inline void store_rounded(const Vec& a, const Vec& b, T* out, int64_t count) {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __mmask32 keep = count >= 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1;
    _mm512_mask_storeu_epi16(out, keep, (__m512i)_mm512_cvtne2ps_pbh(__m512(b), __m512(a)));
    return;
  }
#endif
  at::vec::convert_from_float<T>(a, b).store(out, count);
}

// The forward's word softmax row for a reduced-precision product (T bf16 or fp16), in one pass where
// exp_shift_sum, a fill and convert_row take three: out[j] = T(exp(scale · x[j] − shift)) for the keys the row sees
// (j < seen), T(0) for seen ≤ j < n (a masked key's score is never read). Returns the sum of the fp32 exps. x is
// only read: everything after the softmax (the product p v and the keys masked_rows_product adds row by row) reads
// the probabilities in T. The reference is exp_shift_sum followed by convert_row.
template <typename T>
float exp_shift_sum_rounded(const float* x, int64_t seen, int64_t n, float shift, float scale, T* out) {
  constexpr int64_t kLanes = Vec::size();
  const Vec vshift(shift), vscale(scale);
  Vec sum_lo(0.f), sum_hi(0.f);  // two chains of additions
  // e over the kLanes keys from j, 0 past the row's keys, added to `sum`
  auto part = [&](int64_t j, Vec& sum) {
    const int64_t live = std::clamp<int64_t>(seen - j, 0, kLanes);
    if (live == 0) return Vec(0.f);
    Vec e;
    if (live == kLanes) {
      e = exp_lanes(at::vec::fmsub(Vec::loadu(x + j), vscale, vshift));
    } else {
      e = first_lanes(exp_lanes(at::vec::fmsub(Vec::loadu(x + j, live), vscale, vshift)), live, 0.f);
    }
    sum = sum + e;
    return e;
  };
  for (int64_t j = 0; j < n; j += 2 * kLanes) {
    const Vec lo = part(j, sum_lo), hi = part(j + kLanes, sum_hi);
    store_rounded(lo, hi, out + j, std::min<int64_t>(2 * kLanes, n - j));
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum_lo + sum_hi);
}

// x[j] *= a for j < n.
inline void scale_row(float* x, int64_t n, float a) {
  at::vec::map([a](Vec v) { return v * Vec(a); }, x, x, n);
}

// Vec::size() elements of a row in the tensors' dtype, as fp32.
template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// sum_j x[j] * y[j], each of x and y fp32 or in the tensors' dtype.
template <typename X, typename Y>
inline float dot_row(const X* x, const Y* y, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::fmadd(load_float(x + j), load_float(y + j), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) s += static_cast<float>(x[j]) * static_cast<float>(y[j]);
  return s;
}

// out[t] = sum_j x[j] * y[t][j] for four rows y[t] in the tensors' dtype: four independent FMA chains, so decode's
// key-by-key scores are not bound by the latency of one chain.
template <typename T>
inline void dot_row4(const float* x, const T* const (&y)[4], int64_t n, float (&out)[4]) {
  Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec xv = Vec::loadu(x + j);
    for (int t = 0; t < 4; ++t) acc[t] = at::vec::fmadd(xv, load_float(y[t] + j), acc[t]);
  }
  for (int t = 0; t < 4; ++t) {
    out[t] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[t]);
    for (int64_t i = j; i < n; ++i) out[t] += x[i] * static_cast<float>(y[t][i]);
  }
}

// y[j] += sum_t a[t] · x[t][j] for four rows x[t] in the tensors' dtype: y is loaded and stored once for four.
template <typename T>
inline void axpy_row4(const float (&a)[4], const T* const (&x)[4], float* y, int64_t n) {
  const Vec va[4] = {Vec(a[0]), Vec(a[1]), Vec(a[2]), Vec(a[3])};
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec acc = Vec::loadu(y + j);
    for (int t = 0; t < 4; ++t) acc = at::vec::fmadd(va[t], load_float(x[t] + j), acc);
    acc.store(y + j);
  }
  for (; j < n; ++j)
    for (int t = 0; t < 4; ++t) y[j] += a[t] * static_cast<float>(x[t][j]);
}

// y[j] += a · x[j] with x in the tensors' dtype.
template <typename T>
inline void axpy_row(float a, const T* x, float* y, int64_t n) {
  const Vec va(a);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) at::vec::fmadd(va, load_float(x + j), Vec::loadu(y + j)).store(y + j);
  for (; j < n; ++j) y[j] += a * static_cast<float>(x[j]);
}

// The causal diagonal of a product over keys, acc[r] += Σ_j w[r][j] x[j] for the keys j < seen[r] of each row
// (w[r][j] = 0 past them): a key that row r does not see must not reach it, not even as 0 · NaN (the contract:
// a row's output depends only on the keys and values it sees, and a masked future value may hold anything), and
// which path a row takes must not depend on what it does not see either, so that its bits do not.
// `product(r0, r1, keys)` adds the keys [0, keys) for the rows [r0, r1) (register or AMX tile, MKL).
//  - x read in place (`nonfinite` null): the product is called for the whole row range when every row sees the
//    same keys, else in bands of 8 rows over the keys each band's first-seeing row sees, and the few keys past
//    that (the band's own diagonal) are added row by row.
//  - x packed with its NaN and infinities zeroed (pack_panels' zero_nonfinite; `nonfinite[j]` flags key j): one
//    product over every key some row sees, where a row's w = 0 past its keys adds exactly 0, then each flagged key
//    the row sees is added again from x itself, so that its NaN or infinity reaches exactly the rows that see it.
// `pairs`: the product takes keys in pairs (bf16 tiles), so its key count is even. w: fp32, or the weights in T as
// a reduced-precision product reads them (the forward's probabilities), so that the keys added row by row weigh
// what the product's keys weigh.
template <typename T, typename W, typename Product>
void masked_rows_product(int64_t rows, const int64_t* seen, bool pairs, const uint8_t* nonfinite, const W* w,
                         int64_t ldw, const T* x, int64_t ldx, float* acc, int64_t ld_acc, int64_t width,
                         const Product& product) {
  // acc[r] += w[r][j] · x[j]
  auto add_key = [&](int64_t r, int64_t j) {
    axpy_row(static_cast<float>(w[r * ldw + j]), x + j * ldx, acc + r * ld_acc, width);
  };
  const int64_t lo = *std::min_element(seen, seen + rows), hi = *std::max_element(seen, seen + rows);
  if (nonfinite != nullptr) {
    const int64_t keys = pairs ? hi & ~int64_t(1) : hi;
    if (keys > 0) product(0, rows, keys);
    for (int64_t j = 0; j < keys; ++j)
      if (nonfinite[j])
        for (int64_t r = 0; r < rows; ++r)
          if (j < seen[r]) add_key(r, j);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = keys; j < seen[r]; ++j) add_key(r, j);
    return;
  }
  const int64_t band = lo == hi ? rows : 8;
  for (int64_t r0 = 0; r0 < rows; r0 += band) {
    const int64_t r1 = std::min(rows, r0 + band);
    int64_t common = *std::min_element(seen + r0, seen + r1);
    if (pairs) common &= ~int64_t(1);
    if (common > 0) product(r0, r1, common);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = common; j < seen[r]; ++j) add_key(r, j);
  }
}

// dst[r][c] = scale · src[c][r] for r < rows, c < cols: src fp32 [cols, ld_src], dst fp32 [rows, ld_dst]. The
// avx512 variant moves 16 × 16 blocks through registers (transpose_16x16); the scalar loop is its reference, and
// takes the rows that fill no block.
inline void transpose_scaled(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float scale, float* dst,
                             int64_t ld_dst) {
  int64_t r0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vscale = _mm512_set1_ps(scale);
  for (; r0 + 16 <= rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      __m512 v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        v[i] = i < nc ? _mm512_loadu_ps(src + (c0 + i) * ld_src + r0) : _mm512_setzero_ps();
      transpose_16x16(v);
      const __mmask16 keep = nc >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nc) - 1);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_mask_storeu_ps(dst + (r0 + j) * ld_dst + c0, keep, _mm512_mul_ps(v[j], vscale));
    }
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld_dst + c] = scale * src[c * ld_src + r];
}

// dst[j] = T(src[j]) for j < n (store_rounded's rounding).
template <typename T>
inline void convert_row(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    constexpr int64_t kLanes = Vec::size();
    int64_t j = 0;
    for (; j + 2 * kLanes <= n; j += 2 * kLanes)
      store_rounded(Vec::loadu(src + j), Vec::loadu(src + j + kLanes), dst + j, 2 * kLanes);
    if (j < n) {
      const int64_t left = n - j;
      store_rounded(Vec::loadu(src + j, std::min(left, kLanes)),
                    left > kLanes ? Vec::loadu(src + j + kLanes, left - kLanes) : Vec(0.f), dst + j, left);
    }
  }
}

constexpr int64_t kPageBytes = 4096;

// Asks for the `bytes` from p in the caches (a hint, no effect on results). The rows of one head of a [B, S, H, D]
// tensor lie H · D elements apart, a page each for LLaMA-7B's q (8 KB), where the hardware prefetchers do not follow.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// out[r] = Σ_j x[r · ldx + j] · y[r · ldy + j] for r < rows, j < n; x and y fp32 or in the tensors' dtype. On
// AVX-512, 16 rows at a time: each row's products summed into one vector, then the 16 vectors transposed in
// registers (transpose_16x16) and added, which gives the 16 sums with no horizontal reduction per row, while the
// next block's rows are prefetched. Adds in another order than the reference, dot_row per row, so the two can
// differ in the last bits. Reads rows [0, rows) only.
template <typename X, typename Y>
inline void row_dots(const X* x, int64_t ldx, const Y* y, int64_t ldy, int64_t rows, int64_t n, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t kLanes = 16;
  // count (< 16) elements of a row as fp32, 0 in the other lanes
  auto load_part = [](const auto* p, int64_t count) {
    float part[kLanes] = {};
    for (int64_t k = 0; k < count; ++k) part[k] = static_cast<float>(p[k]);
    return Vec::loadu(part);
  };
  // Rows a page or more apart are prefetched; closer ones the hardware streams (the backward's copy of dO).
  const bool far_x = ldx * static_cast<int64_t>(sizeof(X)) >= kPageBytes;
  const bool far_y = ldy * static_cast<int64_t>(sizeof(Y)) >= kPageBytes;
  int64_t r0 = 0;
  for (; r0 < rows; r0 += kLanes) {
    const int64_t live = std::min<int64_t>(kLanes, rows - r0);
    for (int64_t i = r0 + kLanes; i < std::min(rows, r0 + 2 * kLanes); ++i) {  // the next block's rows
      if (far_x) prefetch_bytes(x + i * ldx, n * static_cast<int64_t>(sizeof(X)));
      if (far_y) prefetch_bytes(y + i * ldy, n * static_cast<int64_t>(sizeof(Y)));
    }
    __m512 acc[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) {
      Vec sum(0.f);
      if (i < live) {
        const X* xi = x + (r0 + i) * ldx;
        const Y* yi = y + (r0 + i) * ldy;
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) sum = at::vec::fmadd(load_float(xi + j), load_float(yi + j), sum);
        if (j < n) sum = at::vec::fmadd(load_part(xi + j, n - j), load_part(yi + j, n - j), sum);
      }
      acc[i] = sum;
    }
    transpose_16x16(acc);
    Vec total(acc[0]);
    for (int64_t i = 1; i < kLanes; ++i) total = total + Vec(acc[i]);
    total.store(out + r0, live);
  }
#else
  for (int64_t r = 0; r < rows; ++r) out[r] = dot_row(x + r * ldx, y + r * ldy, n);
#endif
}

// The row's maximum and sum of a softmax (gated_softmax_row).
struct MaxSum {
  float max, sum;
};

// One row of the prefix's gated softmax: x[j] = γ · exp(x[j] − max) / Σ_j' exp(x[j'] − max) for j < n, and for a
// reduced-precision T the same rounded into out[0, n) (out[n] = 0 too when `pad`: the zero column that pairs an
// odd P for AMX). Returns the max and the sum (the prefix's lse). The reference of gated_softmax_rows, and its path
// where the block path does not apply.
template <typename T>
inline MaxSum gated_softmax_row(float* x, int64_t n, float gamma, T* out, bool pad) {
  const float mx = row_max(x, n);
  const float sum = exp_shift_sum(x, n, mx);
  scale_row(x, n, gamma / sum);
  if constexpr (!std::is_same_v<T, float>) {
    convert_row(x, out, n);
    if (pad) out[n] = T(0.f);
  }
  return {mx, sum};
}

// Rows [0, rows) of the prefix's gated softmax (gated_softmax_row), row r with the gate gamma[r]: x row r at
// x + r · ldx, out row r at out + r · ld_out, its max and sum into max[r], sum[r]. On AVX-512 with a prefix of at
// most 16 keys the rows go 16 at a time through a register transpose (transpose_16x16), so that the max, the exps
// and the sum run across 16 rows at once with no horizontal reduction: the per-row path's latency chain (~150
// cycles a row on a Xeon with AMX) becomes ~25 instructions a row. Its sum adds the keys in order instead of
// gated_softmax_row's tree, so the two can differ in the last bit. The block path reads and computes 16 rows past
// the last block (their results unused): x, gamma, max and sum must hold round_up(rows, 16) rows, and
// ldx ≥ 16.
template <typename T>
inline void gated_softmax_rows(float* x, int64_t ldx, int64_t rows, int64_t n, const float* gamma, T* out,
                               int64_t ld_out, float* max, float* sum) {
  const bool pad = ld_out > n;  // the zero column that pairs an odd P for AMX
#if defined(CPU_CAPABILITY_AVX512)
  if (n <= 16 && ldx >= 16) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      __m512 v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(x + (r0 + i) * ldx);
      transpose_16x16(v);  // v[c]: key c of the 16 rows
      Vec mx(v[0]);
      for (int64_t c = 1; c < n; ++c) mx = at::vec::maximum(mx, Vec(v[c]));
      Vec total(0.f);
      for (int64_t c = 0; c < n; ++c) {
        v[c] = exp_lanes(at::vec::fmsub(Vec(v[c]), Vec(1.f), mx));
        total = total + Vec(v[c]);
      }
      const Vec factor = Vec::loadu(gamma + r0) / total;
      for (int64_t c = 0; c < 16; ++c) v[c] = c < n ? __m512(Vec(v[c]) * factor) : _mm512_setzero_ps();
      mx.store(max + r0);
      total.store(sum + r0);
      transpose_16x16(v);  // back to rows
      const int64_t live = std::min<int64_t>(16, rows - r0);
      for (int64_t i = 0; i < live; ++i) {
        Vec(v[i]).store(x + (r0 + i) * ldx, n);
        if constexpr (!std::is_same_v<T, float>) {
          store_rounded(Vec(v[i]), Vec(0.f), out + (r0 + i) * ld_out, n);
          if (pad) out[(r0 + i) * ld_out + n] = T(0.f);
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    T* rounded = std::is_same_v<T, float> ? nullptr : out + r * ld_out;
    const MaxSum ms = gated_softmax_row<T>(x + r * ldx, n, gamma[r], rounded, pad);
    max[r] = ms.max;
    sum[r] = ms.sum;
  }
}

template <typename T>
inline void convert_row_to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
void convert_used_keys(const Problem& pb, const at::Tensor& src, at::Tensor& dst) {
  const Rows<const T> from = rows_of<T>(src, pb.cu_seqlens_k);
  const Rows<float> to = mutable_rows_of<float>(dst, pb.cu_seqlens_k);
  // Rows [first[n], first[n + 1]) of the flat index are the used keys of sequence n: split evenly over threads.
  std::vector<int64_t> first(pb.num_seqs + 1, 0);
  for (int64_t n = 0; n < pb.num_seqs; ++n) first[n + 1] = first[n] + pb.rows_k(n);
  const int64_t heads = pb.heads_kv, d = pb.head_dim;
  at::parallel_for(0, first[pb.num_seqs], 64, [&](int64_t begin, int64_t end) {
    int64_t n = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t row = begin; row < end; ++row) {
      while (row >= first[n + 1]) ++n;
      const int64_t j = row - first[n];
      for (int64_t h = 0; h < heads; ++h) convert_row_to_float(from.at(n, h, j), to.at(n, h, j), d);
    }
  });
}

inline at::Tensor used_keys_in_fp32(const Problem& pb, const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;
  if (pb.seqused_k == nullptr) return t.to(at::kFloat);
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(t.scalar_type(), "fastadapter_cpu::used_keys_in_fp32",
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { convert_used_keys<scalar_t>(pb, t, out); })
                         AT_DISPATCH_CASE(at::kHalf, [&] { convert_used_keys<scalar_t>(pb, t, out); }));
  return out;
}

// -- scheduling ------------------------------------------------------------------------------------------------

// Runs fn(task, thread_slot) for every task in [0, num_tasks) on PyTorch's intra-op threads. Tasks are handed
// out one at a time from a shared counter (dynamic scheduling): causal tiles have very different costs, and
// at::parallel_for's static split would leave threads idle. thread_slot < at::get_num_threads() indexes
// per-thread scratch.
template <typename Fn>
void parallel_tasks(int64_t num_tasks, const Fn& fn) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t task = next.fetch_add(1); task < num_tasks; task = next.fetch_add(1)) fn(task, slot);
    }
  });
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
