// The kernel variants of fastadapter._C and their entry points. Each variant is the same forward and backward
// (attention_forward.h, attention_backward.h), decode-step linear (decode_linear.h) and a training step's row
// kernels (training_rows.h: RMSNorm, gated activation, token cross-entropy) compiled for one instruction set in its
// own translation unit and namespace; registration.cpp picks one per call from the CPU's features
// (__builtin_cpu_supports), or as FASTADAPTER_CPU_ISA says. No -march flag is ever used, so one binary runs on
// every x86-64 CPU:
//
//   generic  any CPU (the only variant off x86-64 or with another compiler than GCC): products on MKL, rows in
//            at::vec's portable code; bf16 and fp16 computed in fp32
//   avx2     AVX2 + FMA (Haswell, Zen and later): fp32 FMA register tiles (tile_gemm_avx2.h), 256-bit rows;
//            bf16 and fp16 computed in fp32
//   avx512   AVX-512 F/BW/VL/DQ + AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later): fp32 FMA and
//            bf16 `vdpbf16ps` register tiles (tile_gemm_avx512.h), 512-bit rows; fp16 on MKL
//
// The variants' functions are compiled under `#pragma GCC target` (per-function target attributes); the ATen
// and standard headers are included before the pragma, so the inline functions every variant shares are
// compiled for the baseline in each and the linker may keep any one copy.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "problem.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTADAPTER_HAS_AVX2_VARIANT 1
#if __GNUC__ >= 10  // the first GCC with AVX512-BF16 intrinsics
#define FASTADAPTER_HAS_AVX512_VARIANT 1
#endif
#endif

namespace fastadapter_cpu {

// Whether MKL runs its own kernels on this CPU: Intel's (AMX for bf16 where the CPU has it). There the library's
// products beat the AVX-512 register tiles (2-core Xeon with AMX, B = 1, Hq = 32, D = 128, S = 1024,
// forward+backward: bf16 2.6x, fp32 1.13x, benchmarks/results/cpu-kernel-targets-xeon.txt); on AMD the tiles win
// (2-core Zen 5, S = 512-4096: fp32 1.19-1.32x, bf16 2.17-2.61x, benchmarks/results/cpu-kernel-targets.txt). fastadapter/onednn_linear.py's mkl_is_native is the same test.
inline bool mkl_is_native() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

// Whether this CPU and OS let the process use AMX-BF16 (Sapphire Rapids and later): the CPU reports AMX-TILE and
// AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), and Linux grants the tile data state on request
// (arch_prctl ARCH_REQ_XCOMP_PERM; without it the first tile instruction faults). Asked once per process.
// FASTADAPTER_CPU_GEMM picks the products among those this says can run (tile_gemm_amx.h, use_amx).
inline bool amx_usable() {
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

// (out [q's shape, contiguous], lse_w, lse_p) for checked inputs; gate is fp32 [Bg, Hq] contiguous.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// (dq, dk, dv, dprefix_k, dprefix_v, dgate) with the inputs' shapes (contiguous).
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

#define FASTADAPTER_DECLARE_VARIANT(ISA)                                                                         \
  namespace ISA {                                                                                                \
  ForwardResult attention_forward(const Problem& problem, const at::Tensor& q, const at::Tensor& k,              \
                                  const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,   \
                                  const at::Tensor& gate);                                                       \
  BackwardResult attention_backward(const Problem& problem, const at::Tensor& grad_out, const at::Tensor& q,     \
                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,        \
                                    const at::Tensor& prefix_v, const at::Tensor& gate, const at::Tensor& out,   \
                                    const at::Tensor& lse_w, const at::Tensor& lse_p);                           \
  at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias); \
  void rms_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight, \
                        double eps, const at::Tensor& sum, const at::Tensor& y, const at::Tensor& rstd);        \
  void rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,                \
                         const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum,                      \
                         const at::Tensor& grad_x);                                                              \
  void gated_activation_forward(const at::Tensor& gate, const at::Tensor& up, bool gelu_tanh,                    \
                                const at::Tensor& out);                                                          \
  void gated_activation_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,           \
                                 bool gelu_tanh, const at::Tensor& grad_gate, const at::Tensor& grad_up);        \
  void cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target, int64_t ignore,                    \
                          const at::Tensor& loss);                                                               \
  void softmax_exp(const at::Tensor& x, const at::Tensor& out);                                                  \
  }

FASTADAPTER_DECLARE_VARIANT(generic)
#ifdef FASTADAPTER_HAS_AVX2_VARIANT
FASTADAPTER_DECLARE_VARIANT(avx2)
#endif
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
FASTADAPTER_DECLARE_VARIANT(avx512)
namespace avx512 {
// Whether this call's bf16 products (an even head_dim) run on AMX tiles: use_amx in tile_gemm_amx.h, which reads
// FASTADAPTER_CPU_GEMM.
bool bf16_products_on_amx();
}
#endif
#undef FASTADAPTER_DECLARE_VARIANT

}  // namespace fastadapter_cpu
