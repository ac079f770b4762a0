// The avx2 kernel variant (dispatch.h): AVX2 + FMA, fp32 FMA register tiles (tile_gemm_avx2.h), 256-bit
// at::vec rows; bf16 and fp16 computed in fp32. Chosen at run time on CPUs with AVX2 and FMA but without
// AVX-512 BF16 (registration.cpp), so it must not use any instruction beyond the target below.
#include "kernel_includes.h"

#ifdef FASTADAPTER_HAS_AVX2_VARIANT
// GCC's C++ front end does not define the ISA macros for a target pragma; at::vec and the tiles read them.
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,sse3,ssse3,sse4.1,sse4.2")
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

#define FASTADAPTER_ISA avx2
#define CPU_CAPABILITY fastadapter_avx2
#define FASTADAPTER_TILES_AVX2 1
#include "attention_backward.h"
#include "attention_forward.h"
#include "decode_linear.h"
#include "training_rows.h"
#endif
