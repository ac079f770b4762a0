// The avx512 kernel variant (dispatch.h): AVX-512 F/BW/VL/DQ + AVX512-BF16, fp32 FMA and bf16 `vdpbf16ps`
// register tiles (tile_gemm_avx512.h), 512-bit at::vec rows, bf16 and fp16 kernels (fp16 products on MKL).
// Chosen at run time only on CPUs with all of those (registration.cpp).
#include "kernel_includes.h"

#ifdef FASTADAPTER_HAS_AVX512_VARIANT
// GCC's C++ front end does not define the ISA macros for a target pragma; at::vec and the tiles read them.
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2,avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __BMI__ 1
#define __BMI2__ 1
#define __LZCNT__ 1
#define __POPCNT__ 1
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define __AVX512CD__ 1
#define __AVX512BF16__ 1
#if __GNUC__ >= 11  // the first GCC with AMX intrinsics (tile_gemm_amx.h); run only where amx_usable()
#pragma GCC target("amx-tile,amx-bf16")
#define __AMX_TILE__ 1
#define __AMX_BF16__ 1
#endif

#define FASTADAPTER_ISA avx512
#define CPU_CAPABILITY fastadapter_avx512
#define FASTADAPTER_REDUCED_PRECISION_PRODUCTS 1
#include "attention_backward.h"
#include "attention_forward.h"
#include "decode_linear.h"
#include "training_rows.h"

namespace fastadapter_cpu::avx512 {
bool bf16_products_on_amx() { return use_amx<at::BFloat16>(2); }
}  // namespace fastadapter_cpu::avx512
#endif
