// Forward kernel of zero-init attention on CPU (DESIGN.md §1): flash-style online softmax over the words plus
// one prefix tile with its own softmax, gated by γ, all in one pass over each tile of query rows.
//
// A tile is `bq` query positions of one sequence times the `G = Hq / Hkv` query heads that share a kv head:
// stacking the group's heads makes every K/V block read once per group (GQA/MQA) and turns single-token decode
// into a small GEMM instead of G matrix-vector products. Memory stays O(S): the only per-tile buffers are
// [rows, BK] scores and [rows, D] accumulators.
//
// The products q kᵀ and p v run on register tiles over K (and V) packed once per (sequence, kv head)
// (tile_gemm.h: AVX-512 for fp32 and bf16, AVX2 for fp32), for bf16 on AMX tiles over the same panels where the CPU
// has them (tile_gemm_amx.h), else on MKL; the prefix tile's two products run on the same. On the tiles the panels
// are each thread's own, packed by the task that reads them (run_on_own_panels). Compiled once per kernel variant
// (dispatch.h).
//
// Decode (at most 16 query rows per sequence, long KV cache) has its own path, run_decode: key-major loops in
// memory order, split over the keys (split-K) so that batch 1 still uses every thread.
#pragma once

#include "attention_cpu.h"
#include "tile_gemm.h"

namespace fastadapter_cpu::FASTADAPTER_ISA {
namespace forward_kernel {

constexpr int64_t kRowsPerTile = 64;    // stacked query rows (heads × positions) per tile, register tiles
// ... from kLongFrom query positions on: twice the rows read each K and V panel half as often per row, where the
// panels no longer stay in L2 (a kv head's K and V take 1 MB at S = 1024 in fp32). With 128 the register tiles'
// forward ran 1.03-1.18x faster at S = 1024-2048 (bf16 at S = 1024, Hkv = 8: 0.98x), against 0.95x at S = 512 (fp32,
// Hkv = 8), where the causal diagonal's masked half weighs more (B = 1, Hq = 32, D = 128, 2-core AMD Zen 5).
constexpr int64_t kLongRowsPerTile = 128;
constexpr int64_t kLongFrom = 1024;
// ... and on library products (MKL: AMX on Intel CPUs) and AMX tiles, whose cost per call (MKL packing kᵀ and v,
// AMX set-up) wants more rows per call: 256 ran the forward 1.16-1.22x faster than 64 at S = 1024 on MKL (bf16 and
// fp32, B = 1, Hq = 32, Hkv = 8, D = 128, 2-core Xeon with AMX), as fast at S = 512; on AMX tiles 1.08x at 1024.
constexpr int64_t kLibraryRowsPerTile = 256;
// ... but on AMX at most max(128, S / 8) positions per tile: the causal diagonal block computes the scores of the
// tile's positions against keys up to its last one, half of them masked, which at 256 positions of one head (MHA,
// G = 1) is a large share of a short sequence. 128 ran the bf16 MHA forward 1.03-1.08x faster at S = 512-1024 (64:
// 0.90-1.0x; B = 1, Hq = Hkv = 32, D = 128, 2-core Xeon); from S = 2048 on, where the diagonal weighs less and fewer
// rows per tile would read the K and V panels more often, the two were within that machine's noise, so longer
// sequences keep the larger tiles.
constexpr int64_t kAmxMinPositionsPerTile = 128;
constexpr int64_t kKeysPerBlock = 256;  // keys per step of the online softmax
constexpr int64_t kDiagonalBand = 16;   // rows per score product on the causal diagonal, register tiles
constexpr int64_t kDecodeMaxRows = 16;  // at most this many query positions per sequence: decode path
constexpr int64_t kDecodeKeys = 64;     // keys per step of the decode path

// One tile of query rows: sequence n, kv head hkv, positions [i0, i0 + bq), query heads hkv·G .. hkv·G + G − 1.
// Row r of the tile is head hkv·G + r / bq at position i0 + r % bq.
struct Tile {
  int64_t n, hkv, i0, bq;
};

// Per-thread scratch: sized for the largest tile once, reused by every task the thread runs.
template <typename T>
struct Scratch {
  std::vector<T> q;         // [rows, D] the tile's query rows, gathered
  std::vector<float> s;     // [rows, BK] scores (fp32: then the probabilities)
  std::vector<T> p;         // [rows, BK] probabilities in T (reduced-precision GEMM input)
  std::vector<float> acc;   // [rows, D] unnormalised Σ p v
  std::vector<float> m, l;  // [rows] running max and sum of the word softmax (rounded up to 16: gated_softmax_rows)
  std::vector<float> gamma;   // [rows] the gate of each row's head (rounded up to 16)
  std::vector<int64_t> seen;  // [rows] keys of the current block each row sees

  // `width` ≥ 16: the prefix's scores take rows of 16 (gated_softmax_rows), for 16 rows past the last.
  void reserve(int64_t rows, int64_t head_dim, int64_t width) {
    const int64_t padded = round_up(rows, 16);
    q.resize(rows * head_dim);
    s.resize(padded * width);
    if constexpr (!std::is_same_v<T, float>) p.resize(rows * width);
    acc.resize(rows * head_dim);
    m.resize(padded);
    l.resize(padded);
    gamma.resize(padded);
    seen.resize(rows);
  }
};

template <typename T>
struct Operands {
  Rows<const T> q, k, v, prefix_k, prefix_v;
  const float* gate;
  Rows<T> out;
  Rows<float> lse_w, lse_p;
  // Register tiles (tile_gemm.h): kᵀ packed per (sequence, kv head) for q kᵀ, and for bf16 v in pairs of rows
  // for p v (fp32 reads v's rows in place). Null on the MKL path.
  const PackedPanels<T>* keys_t = nullptr;
  const PackedPanels<T>* value_rows = nullptr;
  bool amx = false;  // bf16 products on AMX tiles over the same panels (tile_gemm_amx.h)
  // Tiles (register or AMX): prefix_kᵀ, and for bf16 prefix_v in pairs of rows, per (prefix row, kv head), for the
  // prefix tile's two products (fp32 reads prefix_v's rows in place). Null on the MKL path.
  const PackedPanels<T>* prefix_keys_t = nullptr;
  const PackedPanels<T>* prefix_value_rows = nullptr;
  // keys_t and value_rows hold one (sequence, kv head)'s panels, as panel (0, 0): a thread's own (run_on_own_panels).
  bool one_group = false;

  TileB<T> key_panel(const Tile& t) const { return one_group ? keys_t->at(0, 0) : keys_t->at(t.n, t.hkv); }
  TileB<T> value_panel(const Tile& t) const { return one_group ? value_rows->at(0, 0) : value_rows->at(t.n, t.hkv); }
  const uint8_t* nonfinite_values(const Tile& t, int64_t rows) const {
    return one_group ? value_rows->nonfinite_rows(0, 0, rows) : value_rows->nonfinite_rows(t.n, t.hkv, rows);
  }
};

template <typename T>
void gather_queries(const Problem& pb, const Operands<T>& op, const Tile& t, T* dst) {
  const int64_t group = pb.group(), d = pb.head_dim;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t ii = 0; ii < t.bq; ++ii)
      std::copy_n(op.q.at(t.n, t.hkv * group + g, t.i0 + ii), d, dst + (g * t.bq + ii) * d);
}

// The keys [0, end) that any row of the tile may see.
inline int64_t tile_key_end(const Problem& pb, const Tile& t) {
  return pb.visible_keys(t.n, t.i0 + t.bq - 1);
}

// What a tile costs, for the schedule: the keys its rows see (words, prefix and one for the rest), times its rows.
inline int64_t tile_cost(const Problem& pb, const Tile& t) { return t.bq * (tile_key_end(pb, t) + pb.prefix_len + 1); }

// Online softmax over the keys [key_begin, key_end) for the tile's gathered queries: updates m, l, acc.
template <typename T>
void accumulate_words(const Problem& pb, const Operands<T>& op, const Tile& t, int64_t key_begin, int64_t key_end,
                      Scratch<T>& sc) {
  const int64_t rows = pb.group() * t.bq, d = pb.head_dim;
  for (int64_t j0 = key_begin; j0 < key_end; j0 += kKeysPerBlock) {
    const int64_t nk = std::min(kKeysPerBlock, key_end - j0);
    for (int64_t r = 0; r < rows; ++r)
      sc.seen[r] = std::clamp<int64_t>(pb.visible_keys(t.n, t.i0 + r % t.bq) - j0, 0, nk);
    // Register tiles on the causal diagonal: whether some band of kDiagonalBand rows sees fewer keys than nk (the
    // tile's positions of one head, MHA; a GQA tile's bands each end at the tile's last position).
    bool banded = false;
    for (int64_t r0 = 0; r0 < rows && !banded; r0 += kDiagonalBand)
      banded = sc.seen[std::min(rows, r0 + kDiagonalBand) - 1] < nk;
    // s = q kᵀ for this block of keys (the softmax applies the scale; it reads a row's scores up to seen[r] only)
    if constexpr (kTileable<T>) {
      if (op.keys_t) {
        constexpr int64_t step = kStep<T>;
        const TileB<T> kt = op.key_panel(t);
        const TileA<T> q{sc.q.data(), d, step};
        const TileB<T> keys{kt.data + step * j0, kt.k_stride};
        if (op.amx || !banded) {
          tile_product<T>(op.amx, rows, nk, d / step, 1.f, q, keys, false, sc.s.data(), kKeysPerBlock);
        } else {
          // Each band of rows multiplies only the keys its rows see, where one product over every row would
          // compute scores the mask drops (a quarter of an MHA tile's diagonal block: 64 positions of one head).
          // MHA forward 1.02-1.05x at S = 512-1024 (B = 1, Hq = 32, D = 128, 2-core AMD Zen 5).
          for (int64_t r0 = 0; r0 < rows; r0 += kDiagonalBand) {
            const int64_t r1 = std::min(rows, r0 + kDiagonalBand);
            const int64_t band_keys = *std::max_element(sc.seen.begin() + r0, sc.seen.begin() + r1);
            tile_gemm<T>(r1 - r0, band_keys, d / step, 1.f, TileA<T>{q.data + r0 * d, d, step}, keys, false,
                         sc.s.data() + r0 * kKeysPerBlock, kKeysPerBlock);
          }
        }
      }
    }
    if (!op.keys_t) {
      gemm(false, true, rows, nk, d, 1.f, sc.q.data(), d, op.k.at(t.n, t.hkv, j0), op.k.ld(), 0.f,
           sc.s.data(), kKeysPerBlock);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* s = sc.s.data() + r * kKeysPerBlock;
      const int64_t seen = sc.seen[r];
      // -- the running max; p = exp(scale · s − max) over the keys the row sees, 0 past them (masked, future keys)
      const float m_new = seen > 0 ? std::max(sc.m[r], pb.scale * row_max(s, seen)) : sc.m[r];
      float sum;
      if constexpr (std::is_same_v<T, float>) {
        sum = seen > 0 ? exp_shift_sum(s, seen, m_new, pb.scale) : 0.f;
        std::fill(s + seen, s + nk, 0.f);
      } else {
        sum = exp_shift_sum_rounded(s, seen, nk, m_new, pb.scale, sc.p.data() + r * kKeysPerBlock);
      }
      if (seen > 0) {  // -- update the running sum, rescale what was accumulated under the old max
        // 0 when nothing was seen before; in vector lanes, where a call to expf would spill the exp's constants
        const float correction = first_lane(exp_lanes(Vec(sc.m[r] - m_new)));
        sc.l[r] = sc.l[r] * correction + sum;
        // Nothing seen before (m −inf): acc is 0, or NaN for a row whose scores were all −inf, and stays so.
        if (correction != 1.f && sc.m[r] != kNegInf) scale_row(sc.acc.data() + r * d, d, correction);
        sc.m[r] = m_new;
      }
    }
    // -- acc += p v, each row over the keys it sees only (masked_rows_product)
    const T* v = op.v.at(t.n, t.hkv, j0);
    bool pairs = false;
    const uint8_t* nonfinite = nullptr;  // bf16 tiles: v's rows packed with NaN and infinities zeroed
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      pairs = op.value_rows != nullptr;
      if (pairs) nonfinite = op.nonfinite_values(t, pb.rows_k(t.n)) + j0;
    }
    const auto* weights = [&] {  // the probabilities as the product reads them
      if constexpr (std::is_same_v<T, float>) return sc.s.data(); else return sc.p.data();
    }();
    masked_rows_product<T>(rows, sc.seen.data(), pairs, nonfinite, weights, kKeysPerBlock, v, op.v.ld(),
                           sc.acc.data(), d, d, [&](int64_t r0, int64_t r1, int64_t keys) {
      float* acc = sc.acc.data() + r0 * d;
      if constexpr (std::is_same_v<T, float>) {
        if (op.keys_t) {  // fp32 reads v's rows in place
          tile_gemm<T>(r1 - r0, d, keys, 1.f, TileA<T>{sc.s.data() + r0 * kKeysPerBlock, kKeysPerBlock, 1},
                       TileB<T>{v, op.v.ld()}, true, acc, d);
          return;
        }
      } else if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (op.value_rows) {  // keys in pairs: `keys` is even
          const TileB<T> vp = op.value_panel(t);
          const TileA<T> p{sc.p.data() + r0 * kKeysPerBlock, kKeysPerBlock, 2};
          const TileB<T> values{vp.data + (j0 / 2) * vp.k_stride, vp.k_stride};
          tile_product<T>(op.amx, r1 - r0, d, keys / 2, 1.f, p, values, true, acc, d);
          return;
        }
      }
      gemm(false, false, r1 - r0, d, keys, 1.f, weights + r0 * kKeysPerBlock, kKeysPerBlock, v, op.v.ld(), 1.f, acc,
           d);
    });
  }
}

// Normalises the word part, adds γ · softmax(q prefix_kᵀ) prefix_v and writes out and both log-sum-exps.
template <typename T>
void finish_tile(const Problem& pb, const Operands<T>& op, const Tile& t, Scratch<T>& sc) {
  const int64_t group = pb.group(), rows = group * t.bq, d = pb.head_dim, plen = pb.prefix_len;
  // lse = m + log(sum) for the rows of each head of the tile (contiguous in the lse layout), −inf where the sum is 0
  auto write_lse = [&](const Rows<float>& lse) {
    for (int64_t g = 0; g < group; ++g)
      at::vec::map2([](Vec m, Vec l) { return Vec::blendv(Vec(kNegInf), m + l.log(), l != Vec(0.f)); },
                    lse.at(t.n, t.hkv * group + g, t.i0), sc.m.data() + g * t.bq, sc.l.data() + g * t.bq, t.bq);
  };
  // Rows that see no word (Sq > Sk, causal) give 0 and lse −inf; a row that saw a NaN score has a NaN sum, and
  // gives NaN (its lse too).
  write_lse(op.lse_w);
  for (int64_t r = 0; r < rows; ++r) scale_row(sc.acc.data() + r * d, d, sc.l[r] != 0.f ? 1.f / sc.l[r] : 0.f);
  if (plen > 0) {
    // The whole prefix (P ~ 10) is one block: plain softmax, no running max needed. Its probabilities are
    // scaled by γ / sum so that one GEMM adds γ · softmax(s_p) prefix_v onto the word output.
    const int64_t pn = pb.prefix_row(t.n);
    float* s = sc.s.data();
    // The tiles read bf16 probabilities as pairs: an odd P gets a zero column. The scores' rows are at least 16
    // wide (gated_softmax_rows' register transpose).
    const bool tiles = op.prefix_keys_t != nullptr;
    const int64_t ldp = tiles && kStep<T> == 2 ? plen + plen % 2 : plen, lds = std::max<int64_t>(plen, 16);
    if constexpr (kTileable<T>) {
      if (tiles)
        tile_product<T>(op.amx, rows, plen, d / kStep<T>, pb.scale, TileA<T>{sc.q.data(), d, kStep<T>},
                        op.prefix_keys_t->at(pn, t.hkv), false, s, lds);
    }
    if (!tiles)
      gemm(false, true, rows, plen, d, pb.scale, sc.q.data(), d, op.prefix_k.at(pn, t.hkv, 0), op.prefix_k.ld(),
           0.f, s, lds);
    for (int64_t g = 0; g < group; ++g)
      std::fill_n(sc.gamma.begin() + g * t.bq, t.bq, pb.gamma(op.gate, t.n, t.hkv * group + g));
    // the word part's m and l are spent: they hold the prefix's for its lse
    gated_softmax_rows<T>(s, lds, rows, plen, sc.gamma.data(), sc.p.data(), ldp, sc.m.data(), sc.l.data());
    write_lse(op.lse_p);
    if (tiles) {
      if constexpr (std::is_same_v<T, float>) {  // prefix_v's rows in place
        tile_gemm<T>(rows, d, plen, 1.f, TileA<T>{s, lds, 1}, TileB<T>{op.prefix_v.at(pn, t.hkv, 0), op.prefix_v.ld()},
                     true, sc.acc.data(), d);
      } else if constexpr (std::is_same_v<T, at::BFloat16>) {
        tile_product<T>(op.amx, rows, d, ldp / 2, 1.f, TileA<T>{sc.p.data(), ldp, 2},
                        op.prefix_value_rows->at(pn, t.hkv), true, sc.acc.data(), d);
      }
    } else {
      if constexpr (std::is_same_v<T, float>)
        gemm(false, false, rows, d, plen, 1.f, s, lds, op.prefix_v.at(pn, t.hkv, 0), op.prefix_v.ld(), 1.f,
             sc.acc.data(), d);
      else
        gemm(false, false, rows, d, plen, 1.f, sc.p.data(), ldp, op.prefix_v.at(pn, t.hkv, 0), op.prefix_v.ld(),
             1.f, sc.acc.data(), d);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) *op.lse_p.at(t.n, t.hkv * group + r / t.bq, t.i0 + r % t.bq) = kNegInf;
  }
  for (int64_t r = 0; r < rows; ++r)
    convert_row(sc.acc.data() + r * d, op.out.at(t.n, t.hkv * group + r / t.bq, t.i0 + r % t.bq), d);
}

template <typename T>
void reset_state(Scratch<T>& sc, int64_t rows, int64_t d) {
  std::fill_n(sc.m.begin(), rows, kNegInf);
  std::fill_n(sc.l.begin(), rows, 0.f);
  std::fill_n(sc.acc.begin(), rows * d, 0.f);
}

template <typename T>
void run_decode(const Problem& pb, const Operands<T>& op, int64_t longest);

// Positions [begin, end) of sequence n, kv head hkv, in tiles of bq: a task of run_on_own_panels.
struct Span {
  int64_t n, hkv, begin, end;
};

// A thread's own kᵀ and (bf16) v panels of one (sequence, kv head) at a time, sized for the longest sequence, and
// which one they hold.
template <typename T>
struct OwnPanels {
  PackedPanels<T> keys_t, value_rows;
  int64_t n = -1, hkv = -1;
  std::vector<T> pair_buffer;  // pack_panel's scratch
};

// Tiles (register or AMX): every task packs the kᵀ and v panels it reads into its thread's own (OwnPanels), unless
// they hold them already, and runs its tiles over them, so no panels of the whole call are written and read back
// from memory.
// Tasks are whole (sequence, kv head)s, most expensive first, then the tiles of the last `threads` of them and of
// any above a quarter of a thread's share, for the dynamic schedule to even out, each one's tiles in a row (a
// thread that takes several packs that (sequence, kv head) once). Whole tasks throughout ran the forward 0.92-0.94x
// at S = 1024-2048 with Hkv = 8 (four long tasks per thread: the threads finished apart); with this tail, 0.98-1.22x
// (docs/cpu-kernels.md, "The forward's panels stay in the cache").
// `run_tile(operands, tile, slot)` runs one tile on the thread of `slot`.
template <typename T, typename RunTile>
void run_on_own_panels(const Problem& pb, const Operands<T>& op, int64_t bq, const RunTile& run_tile,
                       Workspace& workspace) {
  const int64_t threads = at::get_num_threads();
  std::vector<std::pair<int64_t, int64_t>> groups;  // (cost, n · Hkv + hkv)
  int64_t total = 0;
  for (int64_t n = 0; n < pb.num_seqs; ++n) {
    int64_t cost = 0;
    for (int64_t i0 = 0; i0 < pb.rows_q(n); i0 += bq)
      cost += tile_cost(pb, Tile{n, 0, i0, std::min(bq, pb.rows_q(n) - i0)});
    if (cost == 0) continue;
    for (int64_t hkv = 0; hkv < pb.heads_kv; ++hkv) groups.push_back({cost, n * pb.heads_kv + hkv});
    total += cost * pb.heads_kv;
  }
  std::stable_sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  const int64_t share = (total + 4 * threads - 1) / (4 * threads);
  std::vector<Span> spans, tiles;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t n = groups[g].second / pb.heads_kv, hkv = groups[g].second % pb.heads_kv;
    if (groups[g].first <= share && static_cast<int64_t>(g + threads) < static_cast<int64_t>(groups.size())) {
      spans.push_back({n, hkv, 0, pb.rows_q(n)});
    } else {
      const int64_t last = (pb.rows_q(n) - 1) / bq * bq;  // later tiles see more keys: first
      for (int64_t i0 = last; i0 >= 0; i0 -= bq) tiles.push_back({n, hkv, i0, std::min(i0 + bq, pb.rows_q(n))});
    }
  }
  spans.insert(spans.end(), tiles.begin(), tiles.end());

  auto len_k = [longest_k = pb.longest_k()](int64_t) { return longest_k; };
  const int64_t slots = std::min<int64_t>(threads, static_cast<int64_t>(spans.size()));
  std::vector<OwnPanels<T>> own(slots);
  constexpr bool kValuePanels = std::is_same_v<T, at::BFloat16>;  // fp32 reads v's rows in place
  for (OwnPanels<T>& o : own) {
    o.keys_t = plan_panels<T>(PackKind::kTransposed, 1, 1, pb.head_dim, len_k, workspace);
    if constexpr (kValuePanels)
      o.value_rows = plan_panels<T>(PackKind::kRows, 1, 1, pb.head_dim, len_k, workspace, /*zero_nonfinite=*/true);
  }
  parallel_tasks(static_cast<int64_t>(spans.size()), [&](int64_t task, int64_t slot) {
    const Span& span = spans[task];
    OwnPanels<T>& o = own[slot];
    if (o.n != span.n || o.hkv != span.hkv) {
      const int64_t keys = pb.rows_k(span.n);
      pack_panel(o.keys_t, 0, 0, keys, op.k.at(span.n, span.hkv, 0), op.k.ld(), o.pair_buffer);
      if constexpr (kValuePanels)
        pack_panel(o.value_rows, 0, 0, keys, op.v.at(span.n, span.hkv, 0), op.v.ld(), o.pair_buffer);
      o.n = span.n, o.hkv = span.hkv;
    }
    Operands<T> with_own = op;
    with_own.keys_t = &o.keys_t;
    if constexpr (kValuePanels) with_own.value_rows = &o.value_rows;
    with_own.one_group = true;
    for (int64_t i0 = span.begin; i0 < span.end; i0 += bq)
      run_tile(with_own, Tile{span.n, span.hkv, i0, std::min(bq, span.end - i0)}, slot);
  });
}

template <typename T>
void run_forward(const Problem& pb, const Operands<T>& op) {
  const int64_t group = pb.group(), d = pb.head_dim;
  // The products of this call (FASTADAPTER_CPU_GEMM and the CPU), decided once.
  const bool tile_products = use_tile_gemm<T>(d), amx = use_amx<T>(d);
  const int64_t longest = pb.longest_q();
  const int64_t rows_per_tile = !tile_products || amx ? kLibraryRowsPerTile
                                : longest >= kLongFrom ? kLongRowsPerTile
                                                       : kRowsPerTile;
  const int64_t positions = amx ? std::max(kAmxMinPositionsPerTile, longest / 8) : rows_per_tile;
  const int64_t bq_max = std::clamp<int64_t>(rows_per_tile / group, 1, positions);
  const int64_t bq = std::min(bq_max, std::max<int64_t>(longest, 1));
  const int64_t tile_rows = group * bq;
  if (longest <= kDecodeMaxRows) return run_decode(pb, op, longest);
  Workspace workspace;  // the packed panels
  // Tiles: panels per thread (run_on_own_panels), where they take no more memory than the call's: each thread's are
  // sized for the longest sequence, so many threads over few (sequence, kv head)s keep the call's panels (MQA at
  // batch 1 measured as fast either way on AMX: 0.99-1.01x at S = 1024 on 2 threads). On the register tiles they ran
  // the forward 1.02-1.18x faster back to back and 1.00-1.18x after two SDPA calls (S = 512-2048, B = 1, Hq = 32,
  // D = 128, 2-core AMD Zen 5; MHA at S = 512 gains most).
  bool own_panels = false;
  if (tile_products) {
    int64_t call_keys = 0;
    for (int64_t n = 0; n < pb.num_seqs; ++n) call_keys += pb.rows_k(n) * pb.heads_kv;
    own_panels = at::get_num_threads() * pb.longest_k() <= call_keys;
  }

  // Register tiles: K (and bf16 V) packed once per (sequence, kv head), read by every tile of the group; with
  // own_panels each task packs its own, and the prefix's panels are the call's.
  std::optional<PackedPanels<T>> keys_t, value_rows, prefix_keys_t, prefix_value_rows;
  Operands<T> ops = op;
  if constexpr (kTileable<T>) {
    if (tile_products && !own_panels) {
      auto rows_k = [&](int64_t n) { return pb.rows_k(n); };
      keys_t = pack_panels<T>(PackKind::kTransposed, pb.num_seqs, pb.heads_kv, d, rows_k,
                              [&](int64_t n, int64_t h, int64_t j) { return op.k.at(n, h, j); }, workspace);
      ops.keys_t = &*keys_t;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        value_rows = pack_panels<T>(PackKind::kRows, pb.num_seqs, pb.heads_kv, d, rows_k,
                                    [&](int64_t n, int64_t h, int64_t j) { return op.v.at(n, h, j); }, workspace,
                                    /*zero_nonfinite=*/true);
        ops.value_rows = &*value_rows;
      }
    }
    ops.amx = amx;
    if (tile_products && pb.prefix_len > 0) {  // the prefix's panels, which every tile of a kv head reads
      auto rows_p = [&](int64_t) { return pb.prefix_len; };
      prefix_keys_t = pack_panels<T>(PackKind::kTransposed, pb.prefix_batch, pb.heads_kv, d, rows_p,
                                     [&](int64_t n, int64_t h, int64_t j) { return op.prefix_k.at(n, h, j); },
                                     workspace);
      ops.prefix_keys_t = &*prefix_keys_t;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        prefix_value_rows = pack_panels<T>(PackKind::kRows, pb.prefix_batch, pb.heads_kv, d, rows_p,
                                           [&](int64_t n, int64_t h, int64_t j) { return op.prefix_v.at(n, h, j); },
                                           workspace);
        ops.prefix_value_rows = &*prefix_value_rows;
      }
    }
  }
  std::vector<Scratch<T>> scratch(at::get_num_threads());
  auto run_tile = [&](const Operands<T>& o, const Tile& t, int64_t slot) {
    Scratch<T>& sc = scratch[slot];
    if (sc.acc.empty()) sc.reserve(tile_rows, d, std::max(kKeysPerBlock, pb.prefix_len + 1));
    reset_state(sc, group * t.bq, d);
    gather_queries(pb, o, t, sc.q.data());
    accumulate_words(pb, o, t, 0, tile_key_end(pb, t), sc);
    finish_tile(pb, o, t, sc);
  };
  if constexpr (kTileable<T>) {
    if (own_panels) return run_on_own_panels<T>(pb, ops, bq, run_tile, workspace);
  }

  // Tiles, most expensive first (the keys a tile's rows see, times its rows): handing them out first keeps the
  // dynamic schedule balanced at the end, for ragged sequences as for the causal mask's late positions.
  std::vector<Tile> tiles;
  std::vector<int64_t> cost;
  for (int64_t n = 0; n < pb.num_seqs; ++n)
    for (int64_t i0 = 0; i0 < pb.rows_q(n); i0 += bq)
      for (int64_t hkv = 0; hkv < pb.heads_kv; ++hkv) tiles.push_back({n, hkv, i0, std::min(bq, pb.rows_q(n) - i0)});
  cost.reserve(tiles.size());
  for (const Tile& t : tiles) cost.push_back(tile_cost(pb, t));
  std::vector<int64_t> order(tiles.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t task, int64_t slot) {
    run_tile(ops, tiles[order[task]], slot);
  });
}

// Decode: a few query rows per sequence over a long KV cache. The work is reading K and V once, so the loop
// runs over keys in memory order ([S, H, D]: every head of a key position is contiguous) with every query row
// of the sequence in registers/L1, instead of per head (keys 16 KB apart for LLaMA-7B: one TLB miss per key).
// Each task takes a chunk of the keys of one sequence for all heads (split-K, so that batch 1 uses every
// thread) and leaves per-row (max, sum, accumulator); one task per (sequence, kv head) then merges the chunks
// and adds the prefix through finish_tile. Chunks hold the same number of key blocks in every sequence, so a
// ragged cache (rows of very different lengths, seqused_k) splits into tasks of equal cost: a long row gets
// many chunks, a short one few.
template <typename T>
void run_decode(const Problem& pb, const Operands<T>& op, int64_t longest) {
  const int64_t group = pb.group(), d = pb.head_dim, heads_q = pb.heads_q;
  const int64_t state_rows = heads_q * longest;  // row h · sq + i: head h, position i
  const int64_t threads = at::get_num_threads();
  // Keys sequence n reads: those its last query row sees.
  auto key_end_of = [&](int64_t n) { return pb.rows_q(n) > 0 ? pb.visible_keys(n, pb.rows_q(n) - 1) : 0; };
  int64_t total_blocks = 0;
  for (int64_t n = 0; n < pb.num_seqs; ++n) total_blocks += (key_end_of(n) + kDecodeKeys - 1) / kDecodeKeys;
  // ~4 tasks per thread: the dynamic schedule evens out what the equal split leaves.
  const int64_t blocks_per_chunk = std::max<int64_t>((total_blocks + 4 * threads - 1) / (4 * threads), 1);
  std::vector<int64_t> first_chunk(pb.num_seqs + 1, 0);  // sequence n's chunks: [first_chunk[n], first_chunk[n+1])
  std::vector<int64_t> chunk_seq;
  for (int64_t n = 0; n < pb.num_seqs; ++n) {
    const int64_t blocks = (key_end_of(n) + kDecodeKeys - 1) / kDecodeKeys;
    const int64_t chunks = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;
    first_chunk[n + 1] = first_chunk[n] + chunks;
    chunk_seq.insert(chunk_seq.end(), chunks, n);
  }
  const int64_t num_chunks = first_chunk[pb.num_seqs];
  const int64_t stride = state_rows * (d + 2);  // per chunk: acc [rows, D], m [rows], l [rows]
  std::vector<float> partial(static_cast<size_t>(num_chunks * stride));

  struct DecodeScratch {
    std::vector<float> q, s;  // [rows, D] scaled fp32 queries; [rows, kDecodeKeys] scores
  };
  std::vector<DecodeScratch> decode_scratch(threads);
  parallel_tasks(num_chunks, [&](int64_t task, int64_t slot) {
    const int64_t n = chunk_seq[task], chunk = task - first_chunk[n], sq = pb.rows_q(n), rows = heads_q * sq;
    float* acc = partial.data() + task * stride;
    float* m = acc + state_rows * d;
    float* l = m + state_rows;
    std::fill_n(m, rows, kNegInf);
    std::fill_n(l, rows, 0.f);
    std::fill_n(acc, rows * d, 0.f);
    const int64_t key_end = key_end_of(n);
    const int64_t begin = std::min(chunk * blocks_per_chunk * kDecodeKeys, key_end);
    const int64_t end = std::min((chunk + 1) * blocks_per_chunk * kDecodeKeys, key_end);
    if (begin >= end) return;
    DecodeScratch& sc = decode_scratch[slot];
    if (sc.q.empty()) {
      sc.q.resize(state_rows * d);
      sc.s.resize(state_rows * kDecodeKeys);
    }
    for (int64_t h = 0; h < heads_q; ++h)
      for (int64_t i = 0; i < sq; ++i) {
        float* qf = sc.q.data() + (h * sq + i) * d;
        convert_row_to_float(op.q.at(n, h, i), qf, d);
        scale_row(qf, d, pb.scale);
      }
    for (int64_t j0 = begin; j0 < end; j0 += kDecodeKeys) {
      const int64_t nk = std::min(kDecodeKeys, end - j0);
      // Rows j0 + jj .. j0 + jj + 3 of kv head hkv of k or v (past the block's last key, that key again).
      auto four_rows = [&](const Rows<const T>& x, int64_t hkv, int64_t jj, const T* (&out)[4]) {
        for (int t = 0; t < 4; ++t) out[t] = x.at(n, hkv, j0 + std::min<int64_t>(jj + t, nk - 1));
      };
      // -- scores, four keys at a time in memory order (past the last key: unused)
      for (int64_t jj = 0; jj < nk; jj += 4)
        for (int64_t hkv = 0; hkv < pb.heads_kv; ++hkv) {
          const T* keys[4];
          four_rows(op.k, hkv, jj, keys);
          for (int64_t r = hkv * group * sq; r < (hkv + 1) * group * sq; ++r) {
            float dots[4];
            dot_row4(sc.q.data() + r * d, keys, d, dots);
            for (int64_t t = 0; t < std::min<int64_t>(4, nk - jj); ++t) sc.s[r * kDecodeKeys + jj + t] = dots[t];
          }
        }
      // -- online softmax per row
      for (int64_t r = 0; r < rows; ++r) {
        float* s = sc.s.data() + r * kDecodeKeys;
        const int64_t seen = std::clamp<int64_t>(pb.visible_keys(n, r % sq) - j0, 0, nk);
        if (seen > 0) {
          const float m_new = std::max(m[r], row_max(s, seen));
          const float correction = std::exp(m[r] - m_new);
          l[r] = l[r] * correction + exp_shift_sum(s, seen, m_new);
          if (correction != 1.f) scale_row(acc + r * d, d, correction);
          m[r] = m_new;
        }
        std::fill(s + seen, s + nk, 0.f);
      }
      // -- acc += p v, four values at a time in memory order (past the last key, p = 0)
      for (int64_t jj = 0; jj < nk; jj += 4)
        for (int64_t hkv = 0; hkv < pb.heads_kv; ++hkv) {
          const T* values[4];
          four_rows(op.v, hkv, jj, values);
          for (int64_t r = hkv * group * sq; r < (hkv + 1) * group * sq; ++r) {
            // Only the values the row sees: a masked one must not reach it, not even as 0 · NaN.
            const int64_t seen = std::clamp<int64_t>(pb.visible_keys(n, r % sq) - j0, 0, nk) - jj;
            if (seen <= 0) continue;
            const float* p = sc.s.data() + r * kDecodeKeys + jj;
            if (seen >= 4) {
              const float p4[4] = {p[0], p[1], p[2], p[3]};
              axpy_row4(p4, values, acc + r * d, d);
            } else {
              for (int64_t u = 0; u < seen; ++u) axpy_row(p[u], values[u], acc + r * d, d);
            }
          }
        }
    }
  });

  // -- merge the chunks of every (sequence, kv head) tile and finish it; the tile's rows g · sq + i are the
  // state rows hkv · G · sq + g · sq + i.
  std::vector<Scratch<T>> scratch(threads);
  parallel_tasks(pb.num_seqs * pb.heads_kv, [&](int64_t task, int64_t slot) {
    const int64_t n = task / pb.heads_kv, hkv = task % pb.heads_kv, sq = pb.rows_q(n);
    if (sq == 0) return;
    const Tile t{n, hkv, 0, sq};
    const int64_t rows = group * sq, first = hkv * group * sq;
    Scratch<T>& sc = scratch[slot];
    if (sc.acc.empty()) sc.reserve(group * longest, d, std::max(kKeysPerBlock, pb.prefix_len));
    reset_state(sc, rows, d);
    for (int64_t chunk = first_chunk[n]; chunk < first_chunk[n + 1]; ++chunk) {
      const float* acc = partial.data() + chunk * stride;
      const float* m = acc + state_rows * d;
      const float* l = m + state_rows;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t s = first + r;
        if (l[s] == 0.f) continue;  // this chunk saw no key for the row
        const float m_new = std::max(sc.m[r], m[s]);
        const float old_scale = std::exp(sc.m[r] - m_new), new_scale = std::exp(m[s] - m_new);
        sc.l[r] = sc.l[r] * old_scale + l[s] * new_scale;
        float* a = sc.acc.data() + r * d;
        scale_row(a, d, old_scale);
        at::vec::map2([new_scale](Vec x, Vec y) { return x + y * Vec(new_scale); }, a, a, acc + s * d, d);
        sc.m[r] = m_new;
      }
    }
    gather_queries(pb, op, t, sc.q.data());
    finish_tile(pb, op, t, sc);
  });
}

}  // namespace forward_kernel

ForwardResult attention_forward(const Problem& problem, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& gate) {
  using namespace forward_kernel;
  if (!kReducedPrecisionProducts && q.scalar_type() != at::kFloat) {
    auto [out, lse_w, lse_p] = attention_forward(problem, run_in_fp32(q), used_keys_in_fp32(problem, k),
                                                 used_keys_in_fp32(problem, v),
                                                 run_in_fp32(prefix_k), run_in_fp32(prefix_v), gate);
    return {out.to(q.scalar_type()), lse_w, lse_p};
  }
  const int32_t* cu_q = problem.cu_seqlens_q;
  const int32_t* cu_k = problem.cu_seqlens_k;
  at::Tensor out = at::empty(q.sizes(), q.options());
  const std::vector<int64_t> lse_sizes = lse_shape(q.sizes(), problem.varlen());
  at::Tensor lse_w = at::empty(lse_sizes, q.options().dtype(at::kFloat));
  at::Tensor lse_p = at::empty(lse_sizes, q.options().dtype(at::kFloat));
  FASTADAPTER_DISPATCH(q.scalar_type(), "fastadapter_cpu::forward", [&] {
    Operands<scalar_t> op{rows_of<scalar_t>(q, cu_q),      rows_of<scalar_t>(k, cu_k),
                          rows_of<scalar_t>(v, cu_k),      rows_of<scalar_t>(prefix_k, nullptr),
                          rows_of<scalar_t>(prefix_v, nullptr), gate.const_data_ptr<float>(),
                          mutable_rows_of<scalar_t>(out, cu_q),
                          Rows<float>{lse_w.data_ptr<float>(), lse_layout(lse_w, cu_q)},
                          Rows<float>{lse_p.data_ptr<float>(), lse_layout(lse_p, cu_q)}};
    run_forward<scalar_t>(problem, op);
  });
  if (cu_q && problem.packed_end_q() < q.size(0)) {
    const int64_t end = problem.packed_end_q(), tail = q.size(0) - end;
    out.narrow(0, end, tail).zero_();
    lse_w.narrow(1, end, tail).fill_(kNegInf);
    lse_p.narrow(1, end, tail).fill_(kNegInf);
  }
  return {out, lse_w, lse_p};
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
