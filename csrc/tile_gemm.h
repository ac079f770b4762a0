// The register-tile products of the kernel variant being compiled (dispatch.h): fp32 FMA tiles on AVX2
// (tile_gemm_avx2.h), fp32 FMA and bf16 pair-dot tiles on AVX-512 (tile_gemm_avx512.h). Both give the same
// interface (kHasTileGemm, kTileable, use_tile_gemm, tile_gemm, plan_panels, pack_panel; pack_panels below); in the
// generic variant the AVX-512 header, compiled without those instructions, has kHasTileGemm false and the kernels
// use MKL. Every variant then has the AMX interface (tile_gemm_amx.h: kHasAmx, use_amx, amx_gemm), which only the
// avx512 variant compiled with AMX intrinsics runs.
#pragma once

#if defined(FASTADAPTER_TILES_AVX2)
#include "tile_gemm_avx2.h"
#else
#include "tile_gemm_avx512.h"
#endif
#include "tile_gemm_amx.h"

namespace fastadapter_cpu::FASTADAPTER_ISA {

// plan_panels, then every panel written (pack_panel) in parallel. `row(n, h, i)`: a pointer to row i of head h of
// sequence n (rows of one (sequence, head) are equally spaced).
template <typename T, typename LenFn, typename RowFn>
PackedPanels<T> pack_panels(PackKind kind, int64_t num_seqs, int64_t heads, int64_t head_dim, const LenFn& rows,
                            const RowFn& row, Workspace& workspace, bool zero_nonfinite = false) {
  PackedPanels<T> packed = plan_panels<T>(kind, num_seqs, heads, head_dim, rows, workspace, zero_nonfinite);
  at::parallel_for(0, num_seqs * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pair_buffer;  // pack_panel's scratch
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / heads, h = task % heads, len = rows(n);
      if (len == 0) continue;
      const T* first = reinterpret_cast<const T*>(row(n, h, 0));
      const int64_t row_stride = len > 1 ? reinterpret_cast<const T*>(row(n, h, 1)) - first : 0;
      pack_panel(packed, n, h, len, first, row_stride, pair_buffer);
    }
  });
  return packed;
}

// C[m, n] = alpha · A B (+ C when `accumulate`) on the AMX tiles (`amx`: bf16 only, tile_gemm_amx.h) or on the
// register tiles (tile_gemm), which read the same operands (amx_gemm: each k row of B readable to round_up(n, 16)
// words).
template <typename T>
inline void tile_product(bool amx, int64_t m, int64_t n, int64_t steps, float alpha, const TileA<T>& a,
                         const TileB<T>& b, bool accumulate, float* c, int64_t ldc) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (amx) return amx_gemm(m, n, steps, alpha, a, b, accumulate, c, ldc);
  }
  tile_gemm<T>(m, n, steps, alpha, a, b, accumulate, c, ldc);
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
