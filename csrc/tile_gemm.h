// The register-tile products of the kernel variant being compiled (dispatch.h): fp32 FMA tiles on AVX2
// (tile_gemm_avx2.h), fp32 FMA and bf16 pair-dot tiles on AVX-512 (tile_gemm_avx512.h). Both give the same
// interface (kHasTileGemm, kTileable, use_tile_gemm, tile_gemm, pack_panels); in the generic variant the
// AVX-512 header, compiled without those instructions, has kHasTileGemm false and the kernels use MKL. Every
// variant then has the AMX interface (tile_gemm_amx.h: kHasAmx, use_amx, amx_gemm), which only the avx512
// variant compiled with AMX intrinsics runs.
#pragma once

#if defined(FASTADAPTER_TILES_AVX2)
#include "tile_gemm_avx2.h"
#else
#include "tile_gemm_avx512.h"
#endif
#include "tile_gemm_amx.h"
