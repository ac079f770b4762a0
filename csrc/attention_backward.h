// Backward kernel of zero-init attention on CPU (DESIGN.md §1, "Backward"): probabilities are recomputed from
// the saved log-sum-exps tile by tile, so memory stays O(S) (never an S×S buffer).
//
// Two passes:
//  1. prefix pass, one task per (sequence, kv head): the prefix softmax (P ~ 10 keys) is recomputed whole; it
//     gives D_p = rowsum(dO ∘ O_p), the word pass's D_w = rowsum(dO ∘ out) − γ D_p, the prefix part of dq,
//     dprefix_k, dprefix_v and dγ. The task owns its (sequence, kv head) slice of every prefix gradient, and
//     writes its rows of dq's first fp32 copy (0 without a prefix), so that copy is never zero-filled first.
//  2. word pass, one task per (sequence, kv head, chunk of key blocks): for each block of keys it walks every
//     query block that sees it (all query heads of the group) and accumulates dk, dv of the block in
//     registers-to-L2 sized buffers, written once. dq receives contributions from every key block, so each
//     chunk adds into its own fp32 copy of dq; the copies are summed at the end. Each sequence gets as many
//     chunks as its share of the work asks for (word_tasks: one unless it is long against the rest of a ragged
//     batch, or batch × kv heads is too small to keep the threads busy). Keys past seqused_k are never read;
//     the sequence's first chunk writes their dk, dv as 0.
// In bf16 on tiles (register or AMX), when every (sequence, kv head) is one word task, the two passes run as one
// (group_passes): a task per (sequence, kv head) packs its panels, runs its prefix task and its word task into its
// thread's own fp32 dq rows, and writes those rows, so that no scratch of the call's size is written and read back.
// The word pass's five products run on register tiles over operands packed once per (sequence, head)
// (tile_gemm.h: AVX-512 for fp32 and bf16, AVX2 for fp32), for bf16 on AMX tiles where the CPU has them
// (tile_gemm_amx.h; the two products over the query rows transposed, and q, dO read from contiguous copies, see
// PackedOperands), else on MKL; the prefix pass's thin products (P ~ 10) run on the same. Compiled once per kernel
// variant (dispatch.h).
#pragma once

#include "attention_cpu.h"
#include "tile_gemm.h"

namespace fastadapter_cpu::FASTADAPTER_ISA {
namespace backward_kernel {

constexpr int64_t kQueryBlock = 64;   // query rows per tile
// ... for bf16 on library products (MKL's AMX products on Intel CPUs, which pack their operands on every call):
// 128 ran the backward 1.06x faster than 64 at S = 512 and 1024 (B = 1, Hq = 32, Hkv = 8, D = 128, 2-core Xeon with
// AMX); fp32 ran 1.04x slower with 128, so it keeps 64. AMX tiles take 128 too (64 and 256 measured within noise).
constexpr int64_t kLibraryBf16QueryBlock = 128;
constexpr int64_t kPrefixRows = 512;  // query rows per step of the prefix pass: its products are thin (P ~ 10)
constexpr int64_t kKeyBlock = 128;    // keys per tile
// ... on AMX tiles: 256 ran the bf16 backward 1.10-1.12x faster at S = 1024-2048 (2-core Xeon, B = 1, Hq = 32,
// Hkv = 8, D = 128); fp32 on MKL and the register tiles ran 1.03-1.05x slower with 256 there, so they keep 128 ...
constexpr int64_t kWideKeyBlock = 256;
// ... and fp32 on the register tiles from kLongKeys keys on: 1.02-1.04x at S = 2048-4096 (B = 1, Hq = 32,
// Hkv = 8 and 32, D = 128, 2-core AMD Zen 5); bf16 on the register tiles measured 0.96-1.07x and keeps 128.
constexpr int64_t kLongKeys = 2048;
constexpr int64_t kMaxChunks = 8;     // at most this many fp32 copies of dq

template <typename T>
struct Operands {
  Rows<const T> q, k, v, prefix_k, prefix_v, out, grad_out;
  const float* gate;
  Rows<const float> lse_w, lse_p;
  Rows<float> delta_w;  // D_w, lse layout
  Rows<T> dk, dv;
  at::Tensor dq_acc;    // fp32 [chunks, *q.shape] (head-major underneath), unscaled; undefined in group_passes
  float* dprefix_k;     // fp32 [N, Hkv, P, D], unscaled
  float* dprefix_v;     // fp32 [N, Hkv, P, D]
  float* dgamma;        // fp32 [N, Hq]
};

// Register tiles (tile_gemm.h): the B operands of the word pass's five products, packed once per (sequence,
// head): kᵀ and vᵀ for the scores q kᵀ and dO vᵀ; for bf16 also k, q and dO in pairs of rows for ds k, dsᵀ q and
// pᵀ dO (fp32 reads those rows in place: copying them measured no faster). On AMX (tile_gemm_amx.h), which reads
// A row-major only, the two products over the query rows run transposed, dvᵀ += dOᵀ p and dkᵀ += qᵀ ds, with qᵀ
// and dOᵀ packed as A (PackKind::kColumns) and p, ds in pairs of rows as B; q and dO, the A of the scores and of
// the prefix pass's products, are read from contiguous copies (PackKind::kCopy), from which the columns are packed.
template <typename T>
struct PackedOperands {
  PackedPanels<T> keys_t, values_t;
  std::optional<PackedPanels<T>> key_rows, query_rows, grad_rows;  // bf16 register tiles
  std::optional<PackedPanels<T>> query_cols, grad_cols;            // bf16 AMX tiles
  std::optional<PackedPanels<T>> query_copy, grad_copy;            // AMX: q and dO with their rows contiguous

  // Rows [i0, ...) of (sequence n, head h) of `copy` (query_copy or grad_copy), as the A of an AMX product over D.
  static TileA<T> copy_rows(const std::optional<PackedPanels<T>>& copy, int64_t n, int64_t h, int64_t i0) {
    const TileB<T> panel = copy->at(n, h);
    return TileA<T>{panel.data + i0 * panel.k_stride, panel.k_stride, 2};
  }
  // Prefix pass: prefix_kᵀ and prefix_vᵀ for q prefix_kᵀ and dO prefix_vᵀ, and for bf16 prefix_k and prefix_v in
  // pairs of rows for ds_p prefix_k and p_p prefix_v, per (prefix row, kv head); fp32 reads those rows in place.
  std::optional<PackedPanels<T>> prefix_keys_t, prefix_values_t, prefix_key_rows, prefix_value_rows;
  bool amx = false;
  // group_passes: the word panels hold one (sequence, kv head) and its query heads, those of the task that packed
  // them (pack_group): (n, hkv) maps to panel (0, 0), query head h to (0, h mod group).
  bool one_group = false;
  int64_t group = 1;

  // The operands of the word and prefix passes, by (sequence, head) of the problem.
  TileB<T> keys(int64_t n, int64_t hkv) const { return keys_t.at(seq(n), kv(hkv)); }
  TileB<T> values(int64_t n, int64_t hkv) const { return values_t.at(seq(n), kv(hkv)); }
  TileB<T> key_pairs(int64_t n, int64_t hkv) const { return key_rows->at(seq(n), kv(hkv)); }
  const uint8_t* key_flags(int64_t n, int64_t hkv, int64_t rows) const {
    return key_rows->nonfinite_rows(seq(n), kv(hkv), rows);
  }
  TileA<T> queries(int64_t n, int64_t h, int64_t i0) const { return copy_rows(query_copy, seq(n), head(h), i0); }
  TileA<T> grads(int64_t n, int64_t h, int64_t i0) const { return copy_rows(grad_copy, seq(n), head(h), i0); }
  TileB<T> query_columns(int64_t n, int64_t h) const { return query_cols->at(seq(n), head(h)); }
  TileB<T> grad_columns(int64_t n, int64_t h) const { return grad_cols->at(seq(n), head(h)); }
  // The bf16 register tiles' q and dO rows in pairs, by (sequence, query head) of the problem.
  TileB<T> query_pairs(int64_t n, int64_t h) const { return query_rows->at(seq(n), head(h)); }
  TileB<T> grad_pairs(int64_t n, int64_t h) const { return grad_rows->at(seq(n), head(h)); }

 private:
  int64_t seq(int64_t n) const { return one_group ? 0 : n; }
  int64_t kv(int64_t hkv) const { return one_group ? 0 : hkv; }
  int64_t head(int64_t h) const { return one_group ? h % group : h; }
};

// The panels of the whole call, each kind in a pass of its own (`word_panels`), and the prefix's; without
// `word_panels` (group_passes) only the prefix's, which every sequence's task reads. Packing the word panels of a
// (sequence, kv head) in its prefix task, into the call's panels, measured no faster than these passes (bf16
// forward + backward, S = 512-1024, 2-core Xeon with AMX: 0.98-1.06x): what group_passes gains comes from its
// threads' panels and dq rows being overwritten in place.
template <typename T>
PackedOperands<T> pack_operands(const Problem& pb, const Operands<T>& op, bool amx, bool word_panels, Workspace& ws) {
  const int64_t d = pb.head_dim;
  auto rows_k = [&](int64_t n) { return pb.rows_k(n); };
  auto rows_q = [&](int64_t n) { return pb.rows_q(n); };
  auto rows = [](const Rows<const T>& x) { return [&x](int64_t n, int64_t h, int64_t i) { return x.at(n, h, i); }; };
  const int64_t n = pb.num_seqs, hkv = pb.heads_kv;
  PackedOperands<T> packed;
  if (word_panels) {
    packed.keys_t = pack_panels<T>(PackKind::kTransposed, n, hkv, d, rows_k, rows(op.k), ws);
    packed.values_t = pack_panels<T>(PackKind::kTransposed, n, hkv, d, rows_k, rows(op.v), ws);
  }
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    packed.amx = amx;
    if (word_panels) {
      packed.key_rows = pack_panels<T>(PackKind::kRows, n, hkv, d, rows_k, rows(op.k), ws,
                                       /*zero_nonfinite=*/true);  // for ds k over the causal diagonal
      const PackKind over_queries = packed.amx ? PackKind::kColumns : PackKind::kRows;
      auto& query_panels = packed.amx ? packed.query_cols : packed.query_rows;
      auto& grad_panels = packed.amx ? packed.grad_cols : packed.grad_rows;
      if (packed.amx) {
        // q and dO read once from their own rows, into the copies; the columns are packed from the copies.
        packed.query_copy = pack_panels<T>(PackKind::kCopy, n, pb.heads_q, d, rows_q, rows(op.q), ws);
        packed.grad_copy = pack_panels<T>(PackKind::kCopy, n, pb.heads_q, d, rows_q, rows(op.grad_out), ws);
        auto rows_of_copy = [](const std::optional<PackedPanels<T>>& copy) {
          return [&copy](int64_t n, int64_t h, int64_t i) { return PackedOperands<T>::copy_rows(copy, n, h, i).data; };
        };
        query_panels = pack_panels<T>(over_queries, n, pb.heads_q, d, rows_q, rows_of_copy(packed.query_copy), ws);
        grad_panels = pack_panels<T>(over_queries, n, pb.heads_q, d, rows_q, rows_of_copy(packed.grad_copy), ws);
      } else {
        query_panels = pack_panels<T>(over_queries, n, pb.heads_q, d, rows_q, rows(op.q), ws);
        grad_panels = pack_panels<T>(over_queries, n, pb.heads_q, d, rows_q, rows(op.grad_out), ws);
      }
    }
  }
  if (pb.prefix_len > 0) {
    auto rows_p = [&](int64_t) { return pb.prefix_len; };
    const int64_t bp = pb.prefix_batch;
    packed.prefix_keys_t = pack_panels<T>(PackKind::kTransposed, bp, hkv, d, rows_p, rows(op.prefix_k), ws);
    packed.prefix_values_t = pack_panels<T>(PackKind::kTransposed, bp, hkv, d, rows_p, rows(op.prefix_v), ws);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      packed.prefix_key_rows = pack_panels<T>(PackKind::kRows, bp, hkv, d, rows_p, rows(op.prefix_k), ws);
      packed.prefix_value_rows = pack_panels<T>(PackKind::kRows, bp, hkv, d, rows_p, rows(op.prefix_v), ws);
    }
  }
  return packed;
}

// Word panels for one (sequence, kv head) at a time (PackedOperands::one_group), sized for the longest sequence,
// in the layouts pack_operands gives the same products, with `shared`'s prefix panels: a thread's own, which each
// of its tasks overwrites (pack_group).
template <typename T>
PackedOperands<T> group_operands(const Problem& pb, const PackedOperands<T>& shared, Workspace& ws) {
  const int64_t keys = pb.longest_k(), rows = pb.longest_q();
  auto len_k = [keys](int64_t) { return keys; };
  auto len_q = [rows](int64_t) { return rows; };
  const int64_t d = pb.head_dim, group = pb.group();
  PackedOperands<T> packed = shared;
  packed.keys_t = plan_panels<T>(PackKind::kTransposed, 1, 1, d, len_k, ws);
  packed.values_t = plan_panels<T>(PackKind::kTransposed, 1, 1, d, len_k, ws);
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    packed.key_rows = plan_panels<T>(PackKind::kRows, 1, 1, d, len_k, ws, /*zero_nonfinite=*/true);
    if (packed.amx) {
      packed.query_copy = plan_panels<T>(PackKind::kCopy, 1, group, d, len_q, ws);
      packed.grad_copy = plan_panels<T>(PackKind::kCopy, 1, group, d, len_q, ws);
      packed.query_cols = plan_panels<T>(PackKind::kColumns, 1, group, d, len_q, ws);
      packed.grad_cols = plan_panels<T>(PackKind::kColumns, 1, group, d, len_q, ws);
    } else {
      packed.query_rows = plan_panels<T>(PackKind::kRows, 1, group, d, len_q, ws);
      packed.grad_rows = plan_panels<T>(PackKind::kRows, 1, group, d, len_q, ws);
    }
  }
  packed.one_group = true;
  packed.group = group;
  return packed;
}

// Writes `packed`'s panels (group_operands) for (sequence n, kv head hkv): kᵀ and vᵀ, and for bf16 k's rows of the
// kv head and for each of its query heads, on AMX the copies of q and dO and their columns (packed from the
// copies), on the register tiles q and dO's rows in pairs.
template <typename T>
void pack_group(const Problem& pb, const Operands<T>& op, const PackedOperands<T>& packed, int64_t n, int64_t hkv,
                std::vector<T>& pair_buffer) {
  const int64_t keys = pb.rows_k(n), rows = pb.rows_q(n), d = pb.head_dim;
  pack_panel(packed.keys_t, 0, 0, keys, op.k.at(n, hkv, 0), op.k.ld(), pair_buffer);
  pack_panel(packed.values_t, 0, 0, keys, op.v.at(n, hkv, 0), op.v.ld(), pair_buffer);
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    pack_panel(*packed.key_rows, 0, 0, keys, op.k.at(n, hkv, 0), op.k.ld(), pair_buffer);
    for (int64_t g = 0; g < pb.group(); ++g) {
      const int64_t h = hkv * pb.group() + g;
      if (packed.amx) {
        pack_panel(*packed.query_copy, 0, g, rows, op.q.at(n, h, 0), op.q.ld(), pair_buffer);
        pack_panel(*packed.grad_copy, 0, g, rows, op.grad_out.at(n, h, 0), op.grad_out.ld(), pair_buffer);
        pack_panel(*packed.query_cols, 0, g, rows, packed.queries(n, h, 0).data, d, pair_buffer);
        pack_panel(*packed.grad_cols, 0, g, rows, packed.grads(n, h, 0).data, d, pair_buffer);
      } else {
        pack_panel(*packed.query_rows, 0, g, rows, op.q.at(n, h, 0), op.q.ld(), pair_buffer);
        pack_panel(*packed.grad_rows, 0, g, rows, op.grad_out.at(n, h, 0), op.grad_out.ld(), pair_buffer);
      }
    }
  }
}

// `rows` fp32 rows of width n (leading dimension ld) as GEMM input of type T: the rows themselves for fp32,
// else a rounded copy in `buffer`.
template <typename T>
const T* as_gemm_input(const float* rows_f, int64_t rows, int64_t n, int64_t ld, std::vector<T>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return rows_f;
  } else {
    for (int64_t r = 0; r < rows; ++r) convert_row(rows_f + r * ld, buffer.data() + r * ld, n);
    return buffer.data();
  }
}

// dq rows of chunk c for (sequence n, head h, row i): fp32, unscaled.
inline Rows<float> dq_rows(const at::Tensor& dq_acc, int64_t chunk, const int32_t* cu) {
  at::Tensor slice = dq_acc.select(0, chunk);
  return Rows<float>{slice.data_ptr<float>(), bshd_layout(slice, cu)};
}

// `rows` fp32 rows of width n (leading dimension ld) as the A operand of an AMX product over them: rounded to bf16
// with an even leading dimension (an odd n gets a zero column), so that the columns come in pairs.
template <typename T>
const T* as_pairs_input(const float* rows_f, int64_t rows, int64_t n, int64_t ld, std::vector<T>& buffer) {
  const int64_t ld_out = n + n % 2;
  for (int64_t r = 0; r < rows; ++r) {
    convert_row(rows_f + r * ld, buffer.data() + r * ld_out, n);
    if (ld_out > n) buffer[r * ld_out + n] = T(0.f);
  }
  return buffer.data();
}

// A thread's buffers for its prefix tasks.
template <typename T>
struct PrefixScratch {
  std::vector<float> s, dp, o, delta_p;  // delta_p: [rows] D_p
  std::vector<T> s_t, dp_t;
  std::vector<T> ds_pairs, gp_pairs;  // bf16 tiles: ds_p and γ p_p in pairs of rows
  std::vector<float> dpk_t, dpv_t;    // AMX: [D, P] sums of this task
};

// The prefix pass's task of (sequence n, kv head hkv) (see the top of this file), writing the first rows of dq of
// the group's query heads into `dq` (fp32, unscaled). With packed operands its thin products (P ~ 10) run on the
// word pass's tiles, over the prefix's panels (pack_operands), else on MKL, whose bf16 products on AMD convert to
// fp32 on every call (a sixth of the bf16 backward at S = 512 on a 2-core Zen 5). On AMX (bf16, `packed->amx`) the
// two over the query rows run transposed, dprefix_kᵀ += qᵀ ds_p and dprefix_vᵀ += dOᵀ (γ p_p), into per-task
// [D, P] sums added to dprefix_k, dprefix_v at the end; the register tiles read q and dO's rows as B (in place, or
// in pairs: query_rows, grad_rows) and add into dprefix_k, dprefix_v.
template <typename T>
void prefix_task(const Problem& pb, const Operands<T>& op, const PackedOperands<T>* packed, int64_t n, int64_t hkv,
                 const Rows<float>& dq, PrefixScratch<T>& sc) {
  const int64_t group = pb.group(), d = pb.head_dim, plen = pb.prefix_len, pn = pb.prefix_row(n);
  const bool tiles = kTileable<T> && packed && plen > 0;
  const bool amx = tiles && packed->amx;
  const bool pairs = tiles && std::is_same_v<T, at::BFloat16>;  // bf16 tiles read p_p, ds_p in pairs of columns
  const int64_t ldp = pairs ? plen + plen % 2 : plen;      // leading dimension of the bf16 p_p, ds_p
  const int64_t pair_width = round_up(std::max<int64_t>(plen, 1), 16);  // B of the transposed products
  if (sc.o.empty()) {
    sc.s.resize(kPrefixRows * std::max<int64_t>(plen, 1));
    sc.dp.resize(sc.s.size());
    sc.s_t.resize(kPrefixRows * std::max<int64_t>(ldp, 1));
    sc.dp_t.resize(sc.s_t.size());
    sc.o.resize(kPrefixRows * d);
    sc.delta_p.resize(kPrefixRows);
    if (pairs) {
      sc.ds_pairs.resize((kPrefixRows / 2 + 1) * 2 * pair_width);
      sc.gp_pairs.resize(sc.ds_pairs.size());
    }
    if (amx) {
      sc.dpk_t.resize(d * plen);
      sc.dpv_t.resize(d * plen);
    }
  }
  float* dpk = op.dprefix_k + (n * pb.heads_kv + hkv) * plen * d;
  float* dpv = op.dprefix_v + (n * pb.heads_kv + hkv) * plen * d;
  if (amx) {
    std::fill(sc.dpk_t.begin(), sc.dpk_t.end(), 0.f);
    std::fill(sc.dpv_t.begin(), sc.dpv_t.end(), 0.f);
  }
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hkv * group + g;
    const float gamma = pb.gamma(op.gate, n, h);
    float dgamma = 0.f;
    for (int64_t i0 = 0; i0 < pb.rows_q(n); i0 += kPrefixRows) {
      const int64_t m = std::min(kPrefixRows, pb.rows_q(n) - i0);
      const T* q = op.q.at(n, h, i0);
      const T* dout = op.grad_out.at(n, h, i0);
      float* delta_w = op.delta_w.at(n, h, i0);  // the lse layout's rows are contiguous
      // dO's rows, from its contiguous copy where AMX made one (fewer pages than dO's own rows)
      const TileA<T> dout_rows = packed && packed->grad_copy ? packed->grads(n, h, i0)
                                                             : TileA<T>{dout, op.grad_out.ld(), 1};
      row_dots(dout_rows.data, dout_rows.row_stride, op.out.at(n, h, i0), op.out.ld(), m, d, delta_w);
      if (plen == 0) {  // no ds_p prefix_k: the rows of dq's first copy start at 0
        for (int64_t r = 0; r < m; ++r) std::fill(dq.at(n, h, i0 + r), dq.at(n, h, i0 + r) + d, 0.f);
        continue;
      }
      // -- recompute p_p = softmax(scale · q prefix_kᵀ) from lse_p, and o_p = p_p prefix_v
      float* s = sc.s.data();
      float* dp = sc.dp.data();
      if constexpr (kTileable<T>) {
        if (tiles) {
          constexpr int64_t step = kStep<T>;
          const TileA<T> qa = amx ? packed->queries(n, h, i0) : TileA<T>{q, op.q.ld(), step};
          const TileA<T> da = amx ? packed->grads(n, h, i0) : TileA<T>{dout, op.grad_out.ld(), step};
          tile_product<T>(amx, m, plen, d / step, pb.scale, qa, packed->prefix_keys_t->at(pn, hkv), false, s, plen);
          for (int64_t r = 0; r < m; ++r) exp_shift_sum(s + r * plen, plen, *op.lse_p.at(n, h, i0 + r));
          if constexpr (std::is_same_v<T, float>) {  // prefix_v's rows in place
            tile_gemm<T>(m, d, plen, 1.f, TileA<T>{s, plen, 1}, TileB<T>{op.prefix_v.at(pn, hkv, 0), op.prefix_v.ld()},
                         false, sc.o.data(), d);
          } else {
            const T* p_in = as_pairs_input<T>(s, m, plen, plen, sc.s_t);
            tile_product<T>(amx, m, d, ldp / 2, 1.f, TileA<T>{p_in, ldp, 2}, packed->prefix_value_rows->at(pn, hkv),
                            false, sc.o.data(), d);
          }
          tile_product<T>(amx, m, plen, d / step, 1.f, da, packed->prefix_values_t->at(pn, hkv), false, dp, plen);
        }
      }
      if (!tiles) {
        gemm(false, true, m, plen, d, pb.scale, q, op.q.ld(), op.prefix_k.at(pn, hkv, 0), op.prefix_k.ld(), 0.f,
             s, plen);
        for (int64_t r = 0; r < m; ++r) exp_shift_sum(s + r * plen, plen, *op.lse_p.at(n, h, i0 + r));
        const T* p_in = as_gemm_input<T>(s, m, plen, plen, sc.s_t);
        gemm(false, false, m, d, plen, 1.f, p_in, plen, op.prefix_v.at(pn, hkv, 0), op.prefix_v.ld(), 0.f,
             sc.o.data(), d);
        // -- dp_p = dO prefix_vᵀ
        gemm(false, true, m, plen, d, 1.f, dout, op.grad_out.ld(), op.prefix_v.at(pn, hkv, 0), op.prefix_v.ld(),
             0.f, dp, plen);
      }
      // -- D_p = rowsum(dO ∘ o_p); ds_p = γ p_p (dp_p − D_p)
      float* delta_p = sc.delta_p.data();
      row_dots(sc.o.data(), d, dout_rows.data, dout_rows.row_stride, m, d, delta_p);
      const Vec g(gamma);
      for (int64_t r = 0; r < m; ++r) {
        dgamma += delta_p[r];
        delta_w[r] -= gamma * delta_p[r];
        const Vec dpr(delta_p[r]);
        at::vec::map2([g, dpr](Vec p, Vec grad) { return g * p * (grad - dpr); }, dp + r * plen, s + r * plen,
                      dp + r * plen, plen);
        at::vec::map([g](Vec p) { return g * p; }, s + r * plen, s + r * plen, plen);  // γ p_p, for dprefix_v
      }
      // dq = ds_p prefix_k (the first write of these rows of dq's first copy);  dprefix_k += ds_pᵀ q;
      // dprefix_v += (γ p_p)ᵀ dO   (scale applied at the end)
      if constexpr (std::is_same_v<T, float>) {
        if (tiles) {  // fp32 reads every operand in place: ds_pᵀ and (γ p_p)ᵀ are strided views
          tile_gemm<T>(m, d, plen, 1.f, TileA<T>{dp, plen, 1}, TileB<T>{op.prefix_k.at(pn, hkv, 0), op.prefix_k.ld()},
                       false, dq.at(n, h, i0), dq.ld());
          tile_gemm<T>(plen, d, m, 1.f, TileA<T>{dp, 1, plen}, TileB<T>{q, op.q.ld()}, true, dpk, d);
          tile_gemm<T>(plen, d, m, 1.f, TileA<T>{s, 1, plen}, TileB<T>{dout, op.grad_out.ld()}, true, dpv, d);
        }
      } else if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (tiles) {
          const T* ds_in = as_pairs_input<T>(dp, m, plen, plen, sc.dp_t);
          tile_product<T>(amx, m, d, ldp / 2, 1.f, TileA<T>{ds_in, ldp, 2}, packed->prefix_key_rows->at(pn, hkv),
                          false, dq.at(n, h, i0), dq.ld());
          interleave_rows(dp, m, plen, plen, sc.ds_pairs.data(), pair_width);
          interleave_rows(s, m, plen, plen, sc.gp_pairs.data(), pair_width);
          const int64_t row_pairs = (m + 1) / 2;
          if (amx) {
            const TileB<T> qc = packed->query_columns(n, h), gc = packed->grad_columns(n, h);
            amx_gemm(d, plen, row_pairs, 1.f, TileA<T>{qc.data + i0, qc.k_stride, 2},
                     TileB<T>{sc.ds_pairs.data(), 2 * pair_width}, true, sc.dpk_t.data(), plen);
            amx_gemm(d, plen, row_pairs, 1.f, TileA<T>{gc.data + i0, gc.k_stride, 2},
                     TileB<T>{sc.gp_pairs.data(), 2 * pair_width}, true, sc.dpv_t.data(), plen);
          } else {  // q and dO's rows in pairs (query_rows, grad_rows); i0 is even
            const TileB<T> qp = packed->query_pairs(n, h), gp = packed->grad_pairs(n, h);
            tile_gemm<T>(plen, d, row_pairs, 1.f, TileA<T>{sc.ds_pairs.data(), 2, 2 * pair_width},
                         TileB<T>{qp.data + (i0 / 2) * qp.k_stride, qp.k_stride}, true, dpk, d);
            tile_gemm<T>(plen, d, row_pairs, 1.f, TileA<T>{sc.gp_pairs.data(), 2, 2 * pair_width},
                         TileB<T>{gp.data + (i0 / 2) * gp.k_stride, gp.k_stride}, true, dpv, d);
          }
        }
      }
      if (!tiles) {
        const T* ds_in = as_gemm_input<T>(dp, m, plen, plen, sc.dp_t);
        const T* gp_in = as_gemm_input<T>(s, m, plen, plen, sc.s_t);
        gemm(false, false, m, d, plen, 1.f, ds_in, plen, op.prefix_k.at(pn, hkv, 0), op.prefix_k.ld(), 0.f,
             dq.at(n, h, i0), dq.ld());
        gemm(true, false, plen, d, m, 1.f, ds_in, plen, q, op.q.ld(), 1.f, dpk, d);
        gemm(true, false, plen, d, m, 1.f, gp_in, plen, dout, op.grad_out.ld(), 1.f, dpv, d);
      }
    }
    op.dgamma[n * pb.heads_q + h] = dgamma;
  }
  if (amx) {  // [D, P] -> [P, D]
    for (int64_t c = 0; c < plen; ++c)
      for (int64_t e = 0; e < d; ++e) {
        dpk[c * d + e] += sc.dpk_t[e * plen + c];
        dpv[c * d + e] += sc.dpv_t[e * plen + c];
      }
  }
}

// The prefix pass: one task per (sequence, kv head), into dq's first copy, longest sequences first (a task's cost
// is its query rows), balanced for ragged batches.
template <typename T>
void prefix_pass(const Problem& pb, const Operands<T>& op, const PackedOperands<T>* packed) {
  const Rows<float> dq = dq_rows(op.dq_acc, 0, pb.cu_seqlens_q);  // the prefix pass writes the first copy
  std::vector<PrefixScratch<T>> scratch(at::get_num_threads());
  std::vector<int64_t> order(pb.num_seqs);
  for (int64_t n = 0; n < pb.num_seqs; ++n) order[n] = n;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return pb.rows_q(a) > pb.rows_q(b); });
  parallel_tasks(pb.num_seqs * pb.heads_kv, [&](int64_t task, int64_t slot) {
    prefix_task(pb, op, packed, order[task / pb.heads_kv], task % pb.heads_kv, dq, scratch[slot]);
  });
}

// Keys per tile of the word pass: on AMX tiles (`amx`), or fp32 on the register tiles (`fp32_tiles`) from
// kLongKeys keys on, kWideKeyBlock, else kKeyBlock.
inline int64_t word_key_block(const Problem& pb, bool amx, bool fp32_tiles) {
  return amx || (fp32_tiles && pb.longest_k() >= kLongKeys) ? kWideKeyBlock : kKeyBlock;
}

// One task of the word pass: chunk `chunk` (of `chunks`) of the key blocks of sequence n, kv head hkv.
struct WordTask {
  int64_t n, hkv, chunk, chunks;
};

// The word pass's tasks, most expensive first, and how many fp32 copies of dq they write. Each sequence splits its
// key blocks into as many chunks as its share of the work asks for (~4 tasks per thread in all, at most
// kMaxChunks, at most one per key block): a long sequence of a ragged batch gets several tasks, a short one a
// single task, so the tasks cost about the same. A chunk's cost is its key blocks times the query rows that
// read them.
inline std::vector<WordTask> word_tasks(const Problem& pb, int64_t key_block, int64_t* copies) {
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> blocks(pb.num_seqs), work(pb.num_seqs);
  int64_t total = 0;
  for (int64_t n = 0; n < pb.num_seqs; ++n) {
    blocks[n] = (pb.rows_k(n) + key_block - 1) / key_block;
    work[n] = blocks[n] * (pb.rows_q(n) + 1);
    total += work[n] * pb.heads_kv;
  }
  const int64_t per_task = std::max<int64_t>((total + 4 * threads - 1) / (4 * threads), 1);
  std::vector<WordTask> tasks;
  std::vector<int64_t> cost;
  *copies = 1;
  for (int64_t n = 0; n < pb.num_seqs; ++n) {
    // At least one task per sequence, even without keys: it writes the dk, dv rows of the keys nobody reads.
    const int64_t chunks = std::clamp<int64_t>((work[n] + per_task - 1) / per_task, 1,
                                               std::max<int64_t>(std::min(kMaxChunks, blocks[n]), 1));
    *copies = std::max(*copies, chunks);
    for (int64_t hkv = 0; hkv < pb.heads_kv; ++hkv)
      for (int64_t c = 0; c < chunks; ++c) {
        tasks.push_back({n, hkv, c, chunks});
        cost.push_back(work[n] / chunks);
      }
  }
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<WordTask> sorted;
  sorted.reserve(tasks.size());
  for (int64_t i : order) sorted.push_back(tasks[i]);
  return sorted;
}

// A thread's buffers for its word tasks.
template <typename T>
struct WordScratch {
  std::vector<float> s, dp, dk, dv;  // dk, dv: [key_block, D], or on AMX dkᵀ, dvᵀ [D, key_block]
  std::vector<T> p_t, ds_t, ds_rows;
  std::vector<int64_t> seen;  // [query_block] keys of the block each query row sees
};

// One task of the word pass, adding into the rows of `dq` (fp32, unscaled) that its keys reach.
template <typename T>
void word_task(const Problem& pb, const Operands<T>& op, const WordTask& t, const PackedOperands<T>* packed,
               const Rows<float>& dq, WordScratch<T>& sc) {
  const int64_t group = pb.group(), d = pb.head_dim;
  const bool amx = packed && packed->amx;
  const int64_t key_block = word_key_block(pb, amx, std::is_same_v<T, float> && packed != nullptr);
  const int64_t query_block =
      (!packed || amx) && std::is_same_v<T, at::BFloat16> ? kLibraryBf16QueryBlock : kQueryBlock;
  const int64_t chunk = t.chunk, chunks = t.chunks, hkv = t.hkv, n = t.n;
  if (sc.s.empty()) {
    for (auto* buf : {&sc.s, &sc.dp}) buf->resize(std::max(query_block * key_block, 16 * d));  // s: also [16, D]
    for (auto* buf : {&sc.p_t, &sc.ds_t, &sc.ds_rows}) buf->resize(query_block * key_block);
    for (auto* buf : {&sc.dk, &sc.dv}) buf->resize(key_block * d);
    sc.seen.resize(query_block);
  }
  if (chunk == 0) {  // keys past seqused_k: never read, so their gradients are 0
    for (int64_t j = pb.rows_k(n); j < pb.stored_k(n); ++j) {
      std::fill_n(op.dk.at(n, hkv, j), d, T(0.f));
      std::fill_n(op.dv.at(n, hkv, j), d, T(0.f));
    }
  }
  const int64_t sq = pb.rows_q(n), sk = pb.rows_k(n);
  const int64_t blocks = (sk + key_block - 1) / key_block;
  // Blocks chunk, chunk + chunks, ...: interleaved so that, under the causal mask, chunks cost the same.
  for (int64_t b = chunk; b < blocks; b += chunks) {
    const int64_t j0 = b * key_block, block_keys = std::min(key_block, sk - j0);
    std::fill(sc.dk.begin(), sc.dk.end(), 0.f);
    std::fill(sc.dv.begin(), sc.dv.end(), 0.f);
    const T* k = op.k.at(n, hkv, j0);
    const T* v = op.v.at(n, hkv, j0);
    // bf16 tiles: k's rows packed with NaN and infinities zeroed, for ds k (masked_rows_product)
    const uint8_t* key_flags = nullptr;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (packed) key_flags = packed->key_flags(n, hkv, pb.rows_k(n)) + j0;
    }
    // The first query row that sees key j0 (bottom-right causal alignment); even for bf16 tiles, whose query
    // rows come in pairs (the row before it sees none of these keys: its p is 0).
    int64_t i_first = pb.causal ? std::max<int64_t>(0, j0 - (sk - sq)) : 0;
    if (packed && std::is_same_v<T, at::BFloat16>) i_first &= ~int64_t(1);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hkv * group + g;
      for (int64_t i0 = i_first; i0 < sq; i0 += query_block) {
        const int64_t m = std::min(query_block, sq - i0);
        // Keys of the block that some row of this query block sees: under the causal mask the diagonal blocks
        // end early, and the products below run over those keys only.
        const int64_t nk = pb.causal ? std::clamp<int64_t>(pb.visible_keys(n, i0 + m - 1) - j0, 0, block_keys)
                                     : block_keys;
        if (nk == 0) continue;
        const T* q = op.q.at(n, h, i0);
        const T* dout = op.grad_out.at(n, h, i0);
        float* s = sc.s.data();
        float* dp = sc.dp.data();
        // -- p = exp(scale · q kᵀ − lse_w), masked (the products leave out the scale);  dp = dO vᵀ;
        //    ds = p ∘ (dp − D_w)
        if constexpr (kTileable<T>) {
          if (packed) {
            constexpr int64_t step = kStep<T>;
            const TileB<T> kt = packed->keys(n, hkv), vt = packed->values(n, hkv);
            const TileA<T> qa = amx ? packed->queries(n, h, i0) : TileA<T>{q, op.q.ld(), step};
            const TileA<T> da =
                amx ? packed->grads(n, h, i0) : TileA<T>{dout, op.grad_out.ld(), step};
            const TileB<T> kb{kt.data + step * j0, kt.k_stride}, vb{vt.data + step * j0, vt.k_stride};
            tile_product<T>(amx, m, nk, d / step, 1.f, qa, kb, false, s, key_block);
            tile_product<T>(amx, m, nk, d / step, 1.f, da, vb, false, dp, key_block);
          }
        }
        if (!packed) {
          gemm(false, true, m, nk, d, 1.f, q, op.q.ld(), k, op.k.ld(), 0.f, s, key_block);
          gemm(false, true, m, nk, d, 1.f, dout, op.grad_out.ld(), v, op.v.ld(), 0.f, dp, key_block);
        }
        const float* lse = op.lse_w.at(n, h, i0);  // the lse layout's rows are contiguous
        const float* delta = op.delta_w.at(n, h, i0);
        // The keys each row sees: the mask's alone, never the values (a row that saw no word has none; one
        // whose lse is not finite, a NaN or infinite score, only spoils its own gradients): which path a row
        // takes in masked_rows_product depends on the other rows' counts.
        for (int64_t r = 0; r < m; ++r)
          sc.seen[r] = std::clamp<int64_t>(pb.visible_keys(n, i0 + r) - j0, 0, nk);
        const bool pair_tiles = std::is_same_v<T, at::BFloat16> && packed;
        if (!pair_tiles) {
          for (int64_t r = 0; r < m; ++r) {
            float* srow = s + r * key_block;
            float* dprow = dp + r * key_block;
            exp_shift_sum(srow, sc.seen[r], lse[r], pb.scale);
            std::fill(srow + sc.seen[r], srow + nk, 0.f);
            const Vec dr(delta[r]);
            at::vec::map2([dr](Vec p, Vec g) { return p * (g - dr); }, dprow, srow, dprow, nk);
            std::fill(dprow + sc.seen[r], dprow + nk, 0.f);  // masked keys: not 0 · (dO vᵀ), which NaN spoils
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          if (packed) {
            // fp32 reads every operand in place: pᵀ and dsᵀ are strided views of p and ds.
            tile_gemm<T>(nk, d, m, 1.f, TileA<T>{s, 1, key_block}, TileB<T>{dout, op.grad_out.ld()},
                         true, sc.dv.data(), d);
            tile_gemm<T>(nk, d, m, 1.f, TileA<T>{dp, 1, key_block}, TileB<T>{q, op.q.ld()},
                         true, sc.dk.data(), d);
            masked_rows_product<T>(m, sc.seen.data(), false, nullptr, dp, key_block, k, op.k.ld(), dq.at(n, h, i0),
                                   dq.ld(), d, [&](int64_t r0, int64_t r1, int64_t keys) {
              tile_gemm<T>(r1 - r0, d, keys, 1.f, TileA<T>{dp + r0 * key_block, key_block, 1},
                           TileB<T>{k, op.k.ld()}, true, dq.at(n, h, i0 + r0), dq.ld());
            });
            continue;
          }
        } else if constexpr (std::is_same_v<T, at::BFloat16>) {
          if (packed) {
            // p and ds as pairs of rows, for the two products over the query rows: on AMX the B of dvᵀ += dOᵀ p
            // and dkᵀ += qᵀ ds (readable to round_up(nk, 16) words), on the register tiles the A of
            // dv += pᵀ dO and dk += dsᵀ q. ds as rows, its odd last key paired with zero, for dq += ds k over
            // the keys (and the keys masked_rows_product adds row by row).
            const int64_t width = amx ? round_up(nk, 16) : nk, row_pairs = (m + 1) / 2;
            T* p_pairs = sc.p_t.data();
            T* ds_pairs = sc.ds_t.data();
            T* ds_rows = sc.ds_rows.data();
            probability_and_grad_pairs(s, dp, key_block, m, nk, sc.seen.data(), lse, delta, pb.scale, p_pairs,
                                       ds_pairs, width, ds_rows);
            if (amx) {
              const TileB<T> gc = packed->grad_columns(n, h), qc = packed->query_columns(n, h);
              amx_gemm(d, nk, row_pairs, 1.f, TileA<T>{gc.data + i0, gc.k_stride, 2},
                       TileB<T>{p_pairs, 2 * width}, true, sc.dv.data(), key_block);
              amx_gemm(d, nk, row_pairs, 1.f, TileA<T>{qc.data + i0, qc.k_stride, 2},
                       TileB<T>{ds_pairs, 2 * width}, true, sc.dk.data(), key_block);
            } else {
              const TileB<T> gp = packed->grad_pairs(n, h), qp = packed->query_pairs(n, h);
              tile_gemm<T>(nk, d, row_pairs, 1.f, TileA<T>{p_pairs, 2, 2 * width},
                           TileB<T>{gp.data + (i0 / 2) * gp.k_stride, gp.k_stride}, true, sc.dv.data(), d);
              tile_gemm<T>(nk, d, row_pairs, 1.f, TileA<T>{ds_pairs, 2, 2 * width},
                           TileB<T>{qp.data + (i0 / 2) * qp.k_stride, qp.k_stride}, true, sc.dk.data(), d);
            }
            const TileB<T> kp = packed->key_pairs(n, hkv);
            masked_rows_product<T>(m, sc.seen.data(), true, key_flags, ds_rows, key_block, k, op.k.ld(),
                                   dq.at(n, h, i0), dq.ld(), d, [&](int64_t r0, int64_t r1, int64_t keys) {
              const TileA<T> ds{ds_rows + r0 * key_block, key_block, 2};
              const TileB<T> keys_b{kp.data + (j0 / 2) * kp.k_stride, kp.k_stride};
              tile_product<T>(amx, r1 - r0, d, keys / 2, 1.f, ds, keys_b, true, dq.at(n, h, i0 + r0), dq.ld());
            });
            continue;
          }
        }
        const T* p_in = as_gemm_input<T>(s, m, nk, key_block, sc.p_t);
        const T* ds_in = as_gemm_input<T>(dp, m, nk, key_block, sc.ds_t);
        // dv += pᵀ dO;  dk += dsᵀ q;  dq += ds k   (scale applied at the end)
        gemm(true, false, nk, d, m, 1.f, p_in, key_block, dout, op.grad_out.ld(), 1.f, sc.dv.data(), d);
        gemm(true, false, nk, d, m, 1.f, ds_in, key_block, q, op.q.ld(), 1.f, sc.dk.data(), d);
        masked_rows_product<T>(m, sc.seen.data(), false, nullptr, dp, key_block, k, op.k.ld(), dq.at(n, h, i0),
                               dq.ld(),
                               d, [&](int64_t r0, int64_t r1, int64_t keys) {
          gemm(false, false, r1 - r0, d, keys, 1.f, ds_in + r0 * key_block, key_block, k, op.k.ld(), 1.f,
               dq.at(n, h, i0 + r0), dq.ld());
        });
      }
    }
    if (amx) {  // dkᵀ, dvᵀ [D, key_block] -> rows of dk, dv, 16 keys at a time
      float* rows = sc.s.data();  // [16, D], free until the next block
      for (int64_t r0 = 0; r0 < block_keys; r0 += 16) {
        const int64_t nr = std::min<int64_t>(16, block_keys - r0);
        transpose_scaled(sc.dk.data() + r0, key_block, nr, d, pb.scale, rows, d);
        for (int64_t r = 0; r < nr; ++r) convert_row(rows + r * d, op.dk.at(n, hkv, j0 + r0 + r), d);
        transpose_scaled(sc.dv.data() + r0, key_block, nr, d, 1.f, rows, d);
        for (int64_t r = 0; r < nr; ++r) convert_row(rows + r * d, op.dv.at(n, hkv, j0 + r0 + r), d);
      }
      continue;
    }
    for (int64_t r = 0; r < block_keys; ++r) {
      scale_row(sc.dk.data() + r * d, d, pb.scale);
      convert_row(sc.dk.data() + r * d, op.dk.at(n, hkv, j0 + r), d);
      convert_row(sc.dv.data() + r * d, op.dv.at(n, hkv, j0 + r), d);
    }
  }
}

// The word pass: `tasks` (word_tasks), each into its chunk's copy of dq.
template <typename T>
void word_pass(const Problem& pb, const Operands<T>& op, const std::vector<WordTask>& tasks,
               const PackedOperands<T>* packed) {
  std::vector<WordScratch<T>> scratch(at::get_num_threads());
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t task, int64_t slot) {
    word_task(pb, op, tasks[task], packed, dq_rows(op.dq_acc, tasks[task].chunk, pb.cu_seqlens_q), scratch[slot]);
  });
}

// The prefix and word passes in bf16 on tiles (AMX or register) when every (sequence, kv head) is one word task
// (`tasks`, from word_tasks with one copy of dq). One task per (sequence, kv head) packs its own panels (pack_group, into its thread's
// group_operands), runs its prefix task, then its word task, which read them from the thread's cache, into its
// thread's fp32 dq rows of the group's query heads, and writes those rows to `dq` (scaled, in bf16). dq's fp32 copy
// and the panels of the whole call, written in passes of their own, came back from memory (about 27 MB per call
// at S = 512, Hq = 32, Hkv = 8, D = 128), where a thread's own are overwritten in place: forward + backward at
// S = 512-1024 1.08-1.14x back to back, 1.10-1.18x after a cache flush or two SDPA calls (2-core Xeon,
// benchmarks/results/cpu-build-ab-xeon-group*.txt); on the bf16 register tiles 1.05-1.10x at S = 512-1024 back to
// back, 1.03-1.08x after two SDPA calls, as fast at S = 2048 (2-core AMD Zen 5). fp32 measured 0.95-1.02x this way
// on MKL and 0.98-1.02x on the register tiles, so it keeps the passes of the whole call.
template <typename T>
void group_passes(const Problem& pb, const Operands<T>& op, const std::vector<WordTask>& tasks,
                  const PackedOperands<T>& packed, const Rows<T>& dq, Workspace& ws) {
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  const int64_t d = pb.head_dim, group = pb.group(), rows = pb.longest_q();
  std::vector<PackedOperands<T>> panels;
  std::vector<float*> dq_group;  // per slot: fp32 [group, rows, D], unscaled
  for (int64_t slot = 0; slot < slots; ++slot) {
    panels.push_back(group_operands(pb, packed, ws));
    dq_group.push_back(ws.take<float>(group * rows * d));
  }
  std::vector<PrefixScratch<T>> prefix_scratch(slots);
  std::vector<WordScratch<T>> word_scratch(slots);
  std::vector<std::vector<T>> pair_buffers(slots);
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t task, int64_t slot) {
    const WordTask& t = tasks[task];
    RowLayout layout;  // query heads hkv · group, ..., (hkv + 1) · group − 1 of sequence t.n
    layout.row_stride = d;
    layout.head_stride = rows * d;
    layout.first_head = t.hkv * group;
    const Rows<float> dq_acc{dq_group[slot], layout};
    pack_group(pb, op, panels[slot], t.n, t.hkv, pair_buffers[slot]);
    prefix_task(pb, op, &panels[slot], t.n, t.hkv, dq_acc, prefix_scratch[slot]);
    word_task(pb, op, t, &panels[slot], dq_acc, word_scratch[slot]);
    for (int64_t h = t.hkv * group; h < (t.hkv + 1) * group; ++h)
      for (int64_t i = 0; i < pb.rows_q(t.n); ++i) {  // scaled in place: the thread's next task overwrites it
        scale_row(dq_acc.at(t.n, h, i), d, pb.scale);
        convert_row(dq_acc.at(t.n, h, i), dq.at(t.n, h, i), d);
      }
  });
}

// dq = scale · Σ_c dq_acc[c] in q's dtype: one pass over the fp32 copies, row by row (torch's mul_ then copy_
// take two, its mixed-dtype mul_out measured slower still).
template <typename T>
void write_dq(const Problem& pb, const at::Tensor& dq_acc, int64_t chunks, const Rows<T>& dq) {
  std::vector<Rows<float>> copies;
  for (int64_t c = 0; c < chunks; ++c) copies.push_back(dq_rows(dq_acc, c, pb.cu_seqlens_q));
  const int64_t d = pb.head_dim, heads = pb.heads_q;
  const float scale = pb.scale;
  at::parallel_for(0, pb.num_seqs * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / heads, h = task % heads;
      for (int64_t i = 0; i < pb.rows_q(n); ++i) {
        at::vec::map([scale](Vec x) { return x * Vec(scale); }, row.data(), copies[0].at(n, h, i), d);
        for (int64_t c = 1; c < chunks; ++c)
          at::vec::map2([scale](Vec acc, Vec x) { return acc + x * Vec(scale); }, row.data(), row.data(),
                        copies[c].at(n, h, i), d);
        convert_row(row.data(), dq.at(n, h, i), d);
      }
    }
  });
}

}  // namespace backward_kernel

BackwardResult attention_backward(const Problem& pb, const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                                  const at::Tensor& prefix_v, const at::Tensor& gate, const at::Tensor& out,
                                  const at::Tensor& lse_w, const at::Tensor& lse_p) {
  using namespace backward_kernel;
  if (!kReducedPrecisionProducts && q.scalar_type() != at::kFloat) {
    auto [dq, dk, dv, dpk, dpv, dgate] = attention_backward(
        pb, run_in_fp32(grad_out), run_in_fp32(q), used_keys_in_fp32(pb, k), used_keys_in_fp32(pb, v), run_in_fp32(prefix_k),
        run_in_fp32(prefix_v), gate, run_in_fp32(out), lse_w, lse_p);
    const auto dtype = q.scalar_type();
    return {dq.to(dtype), dk.to(dtype), dv.to(dtype), dpk.to(dtype), dpv.to(dtype), dgate};
  }
  const int32_t* cu_q = pb.cu_seqlens_q;
  const int32_t* cu_k = pb.cu_seqlens_k;
  const auto f32 = q.options().dtype(at::kFloat);
  int64_t chunks = 1;  // fp32 copies of dq
  // Whether this call's bf16 products run on AMX tiles, decided once: the word pass's key block (word_tasks,
  // word_pass) and the packed operands (pack_operands) follow it.
  const bool amx = q.scalar_type() == at::kBFloat16 && use_amx<at::BFloat16>(pb.head_dim);
  const bool fp32_tiles = q.scalar_type() == at::kFloat && use_tile_gemm<float>(pb.head_dim);
  const std::vector<WordTask> tasks = word_tasks(pb, word_key_block(pb, amx, fp32_tiles), &chunks);
  std::vector<int64_t> dq_shape{chunks};
  dq_shape.insert(dq_shape.end(), q.sizes().begin(), q.sizes().end());
  // Head-major ([chunks, B, H, S, D] or [chunks, H, T, D]) behind q's logical shape: a head's dq rows are
  // contiguous, so the products that add into them touch few pages (bf16 backward 1.06-1.10x, fp32 1.06x at
  // S = 1024-2048 on a 2-core Xeon, B = 1, Hq = 32, Hkv = 8, D = 128, against q's own layout).
  const int64_t dims = static_cast<int64_t>(dq_shape.size());
  std::vector<int64_t> physical(dq_shape), order(dims);
  std::swap(physical[dims - 3], physical[dims - 2]);
  for (int64_t i = 0; i < dims; ++i) order[i] = i;
  std::swap(order[dims - 3], order[dims - 2]);
  Workspace workspace;  // dq_acc and the packed panels
  // bf16 on tiles (register or AMX) with one word task per (sequence, kv head): group_passes, with no dq_acc.
  const bool by_group = q.scalar_type() == at::kBFloat16 && use_tile_gemm<at::BFloat16>(pb.head_dim) && chunks == 1;
  at::Tensor dq_acc;
  if (!by_group) dq_acc = workspace.take_float(physical).permute(order);
  // The prefix pass writes every row of a sequence in the first copy; a word task adds into its chunk's copy
  // only the rows its keys reach.
  if (chunks > 1) dq_acc.narrow(0, 1, chunks - 1).zero_();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dprefix_k = at::zeros({pb.num_seqs, pb.heads_kv, pb.prefix_len, pb.head_dim}, f32);
  at::Tensor dprefix_v = at::zeros({pb.num_seqs, pb.heads_kv, pb.prefix_len, pb.head_dim}, f32);
  at::Tensor dgamma = at::zeros({pb.num_seqs, pb.heads_q}, f32);
  at::Tensor delta_w = at::empty(lse_w.sizes(), f32);

  FASTADAPTER_DISPATCH(q.scalar_type(), "fastadapter_cpu::backward", [&] {
    Operands<scalar_t> op{rows_of<scalar_t>(q, cu_q), rows_of<scalar_t>(k, cu_k), rows_of<scalar_t>(v, cu_k),
                          rows_of<scalar_t>(prefix_k, nullptr), rows_of<scalar_t>(prefix_v, nullptr),
                          rows_of<scalar_t>(out, cu_q), rows_of<scalar_t>(grad_out, cu_q),
                          gate.const_data_ptr<float>(),
                          Rows<const float>{lse_w.const_data_ptr<float>(), lse_layout(lse_w, cu_q)},
                          Rows<const float>{lse_p.const_data_ptr<float>(), lse_layout(lse_p, cu_q)},
                          Rows<float>{delta_w.data_ptr<float>(), lse_layout(delta_w, cu_q)},
                          mutable_rows_of<scalar_t>(dk, cu_k), mutable_rows_of<scalar_t>(dv, cu_k), dq_acc,
                          dprefix_k.data_ptr<float>(), dprefix_v.data_ptr<float>(), dgamma.data_ptr<float>()};
    std::optional<PackedOperands<scalar_t>> packed;
    if constexpr (kTileable<scalar_t>) {
      // group_passes packs the word panels task by task
      if (use_tile_gemm<scalar_t>(pb.head_dim)) packed = pack_operands(pb, op, amx, !by_group, workspace);
    }
    if (by_group) {
      TORCH_CHECK(packed.has_value(), "fastadapter_cpu: the backward on tiles found no packed operands");
      if constexpr (kTileable<scalar_t>)
        group_passes<scalar_t>(pb, op, tasks, *packed, mutable_rows_of<scalar_t>(dq, cu_q), workspace);
    } else {
      prefix_pass<scalar_t>(pb, op, packed ? &*packed : nullptr);  // writes D_w, which the word pass reads
      word_pass<scalar_t>(pb, op, tasks, packed ? &*packed : nullptr);
    }
  });
  if (cu_k && pb.packed_end_k() < k.size(0)) {  // keys of no sequence
    const int64_t end = pb.packed_end_k(), tail = k.size(0) - end;
    dk.narrow(0, end, tail).zero_();
    dv.narrow(0, end, tail).zero_();
  }

  if (!by_group) {
    FASTADAPTER_DISPATCH(q.scalar_type(), "fastadapter_cpu::backward_dq", [&] {
      write_dq<scalar_t>(pb, dq_acc, chunks, mutable_rows_of<scalar_t>(dq, cu_q));
    });
  }
  if (cu_q && pb.packed_end_q() < q.size(0)) dq.narrow(0, pb.packed_end_q(), q.size(0) - pb.packed_end_q()).zero_();
  // Prefix gradients: [N, Hkv, P, D] -> [Bp, P, Hkv, D], summed over the batch for a shared prompt.
  auto finish_prefix = [&](at::Tensor g, double factor) {
    if (pb.prefix_batch == 1) g = g.sum(0, /*keepdim=*/true);
    return g.mul_(factor).permute({0, 2, 1, 3}).to(prefix_k.scalar_type()).contiguous();
  };
  at::Tensor dpk = finish_prefix(dprefix_k, pb.scale);
  at::Tensor dpv = finish_prefix(dprefix_v, 1.0);
  // dgate = dγ · dγ/dgate, summed over the batch when one gate row serves every sequence.
  if (pb.gate_batch == 1) dgamma = dgamma.sum(0, /*keepdim=*/true);
  if (pb.gate_tanh) dgamma.mul_(1 - gate.tanh().square());
  return {dq, dk, dv, dpk, dpv, dgamma};
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
