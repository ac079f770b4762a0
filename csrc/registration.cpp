// The `fastadapter_cpu` operator library: schemas, input checks with messages that say what was expected, and
// the `fastadapter._C` Python module whose import registers the ops.
//
//   torch.ops.fastadapter_cpu.forward(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k,
//                                     max_seqlen_q, max_seqlen_k, causal, softmax_scale, gate_tanh)
//       -> (out, lse_w, lse_p)
//   torch.ops.fastadapter_cpu.backward(grad_out, q, k, v, prefix_k, prefix_v, gate, out, lse_w, lse_p,
//                                      cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, causal,
//                                      softmax_scale, gate_tanh)
//       -> (dq, dk, dv, dprefix_k, dprefix_v, dgate)
//
//   torch.ops.fastadapter_cpu.decode_linear(x, weight, bias) -> out
//       x [M, K] · weight [N, K]ᵀ (+ bias [N]) for the few rows of a decoding step (decode_linear.h)
//
//   torch.ops.fastadapter_cpu.rms_norm_forward(x, weight, eps) -> (y, rstd)
//   torch.ops.fastadapter_cpu.add_rms_norm_forward(x, residual, weight, eps) -> (sum, y, rstd)
//   torch.ops.fastadapter_cpu.rms_norm_backward(grad_y, x, weight, rstd, grad_sum) -> grad_x
//   torch.ops.fastadapter_cpu.gated_activation_forward(gate, up, gelu_tanh) -> out
//   torch.ops.fastadapter_cpu.gated_activation_backward(grad, gate, up, gelu_tanh) -> (grad_gate, grad_up)
//   torch.ops.fastadapter_cpu.cross_entropy_rows_(logits, target, ignore_index) -> loss  (logits become the gradient)
//       a training step's row kernels, fp32 (training_rows.h)
//
//   torch.ops.fastadapter_cpu.softmax_exp(x) -> e^x as the attention kernels' softmax computes it (vec_exp.h), fp32
//
//   torch.ops.fastadapter_cpu.cpu_path() -> (variant, why)
//
//   torch.ops.fastadapter_cpu.workspace_bytes() -> int, release_workspace(), fill_workspace(value)
//       the buffers the calling thread's kernel calls keep between calls (workspace.h)
//
// The contract of these ops is written once, in fastadapter/kernels/problem.py (AttentionProblem): the cpu backend
// calls them with a problem validated there, and its arguments in that file's OP_SCHEMA order. The checks below
// are cheap guards of the same conditions for a direct caller of torch.ops.fastadapter_cpu (no out-of-bounds read
// whatever the arguments); they do not define anything the Python contract does not. In short: dense
// q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; varlen q [Tq, Hq, D], k/v [Tk, Hkv, D] with cu_seqlens_q and cu_seqlens_k
// int32 [N+1] (the same tensor for packed self-attention); seqused_k int32 [B or N]; gate normalised to fp32
// [Bg, Hq]; lse fp32 [B, Hq, Sq] or [Hq, Tq].
// Inputs with no element (B = 0, S = 0, T = 0) give empty or zero results without entering a kernel. Every other
// call runs the kernel variant (dispatch.h) that this CPU supports best, or the one FASTADAPTER_CPU_ISA names.
//
// Compiled for the baseline (no target pragma): this file runs on every CPU, and it is linked first, so that the
// linker keeps its copies of the inline functions the variants share.
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "dispatch.h"
#include "workspace.h"

namespace fastadapter_cpu {
namespace {

// -- choice of the kernel variant ------------------------------------------------------------------------------

enum class Variant { kGeneric, kAvx2, kAvx512 };

const char* variant_name(Variant v) {
  return v == Variant::kAvx512 ? "avx512" : v == Variant::kAvx2 ? "avx2" : "generic";
}

// What this CPU (and its operating system: __builtin_cpu_supports checks that the vector state is saved) runs.
struct CpuFeatures {
  bool avx2 = false;    // AVX2 and FMA
  bool avx512 = false;  // AVX-512 F, BW, VL, DQ, CD and AVX512-BF16
  bool avx512f = false;
};

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    f.avx512f = __builtin_cpu_supports("avx512f");
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
    f.avx512 = f.avx2 && f.avx512f && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd") &&
               __builtin_cpu_supports("avx512bf16");
#endif
#endif
    return f;
  }();
  return features;
}

bool compiled(Variant v) {
  switch (v) {
    case Variant::kGeneric: return true;
#ifdef FASTADAPTER_HAS_AVX2_VARIANT
    case Variant::kAvx2: return true;
#endif
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
    case Variant::kAvx512: return true;
#endif
    default: return false;
  }
}

bool supported(Variant v) {
  const CpuFeatures& f = cpu_features();
  return compiled(v) && (v == Variant::kGeneric || (v == Variant::kAvx2 ? f.avx2 : f.avx512));
}

// The variant of this call and why: FASTADAPTER_CPU_ISA=avx512|avx2|generic forces one (an error where this
// CPU or this build cannot run it), else the widest one this CPU runs.
Variant choose_variant(std::string* why) {
  const char* env = std::getenv("FASTADAPTER_CPU_ISA");
  if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) {
    Variant forced;
    if (std::strcmp(env, "avx512") == 0) forced = Variant::kAvx512;
    else if (std::strcmp(env, "avx2") == 0) forced = Variant::kAvx2;
    else if (std::strcmp(env, "generic") == 0) forced = Variant::kGeneric;
    else TORCH_CHECK(false, "fastadapter_cpu: FASTADAPTER_CPU_ISA must be auto, avx512, avx2 or generic, got '", env, "'");
    TORCH_CHECK(compiled(forced), "fastadapter_cpu: FASTADAPTER_CPU_ISA=", env, " but this build has no ", env,
                " kernels (they need GCC 10 or newer on x86-64)");
    TORCH_CHECK(supported(forced), "fastadapter_cpu: FASTADAPTER_CPU_ISA=", env, " but this CPU lacks ",
                forced == Variant::kAvx2 ? "AVX2 or FMA" : "one of AVX-512 F/BW/VL/DQ/CD and AVX512-BF16");
    if (why) *why = std::string("forced by FASTADAPTER_CPU_ISA=") + env;
    return forced;
  }
  const CpuFeatures& f = cpu_features();
  if (supported(Variant::kAvx512)) {
    if (why) *why = "this CPU has AVX-512 with AVX512-BF16";
    return Variant::kAvx512;
  }
  if (supported(Variant::kAvx2)) {
    if (why)
      *why = !compiled(Variant::kAvx512) ? "this build has no AVX-512 kernels (GCC older than 10)"
             : f.avx512f                  ? "this CPU has AVX-512 but not AVX512-BF16"
                                          : "this CPU has AVX2 and FMA but no AVX-512";
    return Variant::kAvx2;
  }
  if (why)
    *why = !compiled(Variant::kAvx2) ? "this build has only the generic kernels (not x86-64 with GCC)"
                                     : "this CPU has no AVX2/FMA";
  return Variant::kGeneric;
}

// (variant, what it runs and why), for `python -m fastadapter.info`.
std::tuple<std::string, std::string> cpu_path_op() {
  std::string why;
  const Variant v = choose_variant(&why);
  const char* gemm = std::getenv("FASTADAPTER_CPU_GEMM");
  const bool mkl_forced = gemm != nullptr && std::strcmp(gemm, "mkl") == 0;
#ifdef FASTADAPTER_WITH_MKL
  const std::string library = "MKL";
#else
  const std::string library = "at::addmm";
#endif
  std::string what;
  switch (v) {
    case Variant::kAvx512: {
      const bool tiles_forced = gemm != nullptr && std::strcmp(gemm, "tiles") == 0;
#ifdef FASTADAPTER_WITH_MKL
      const bool library_default = mkl_is_native();
#else
      const bool library_default = false;
#endif
      // bf16 on AMX tiles wherever they run, unless FASTADAPTER_CPU_GEMM says mkl or tiles (use_amx).
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
      const bool amx = avx512::bf16_products_on_amx();
#else
      const bool amx = false;
#endif
      const std::string fp32 = library_default && !tiles_forced
                                   ? "fp32 on MKL (MKL's own kernels on this Intel CPU)"
                                   : "fp32 on FMA register tiles";
      if (mkl_forced)
        what = "AVX-512 rows, " + library + " products (FASTADAPTER_CPU_GEMM=mkl)";
      else if (amx)
        what = "AVX-512 rows, bf16 products on AMX tiles, " + fp32 + ", fp16 on " + library +
               " (FASTADAPTER_CPU_GEMM=tiles selects the AVX-512 register tiles, =mkl MKL)";
      else if (library_default && !tiles_forced)
        what = "AVX-512 rows, MKL products (MKL's own kernels on this Intel CPU; FASTADAPTER_CPU_GEMM=tiles selects "
               "the register tiles)";
      else
        what = "AVX-512 register tiles (fp32 FMA, bf16 vdpbf16ps; fp16 on " + library + ")";
      break;
    }
    case Variant::kAvx2:
#ifdef FASTADAPTER_WITH_MKL
      // MKL is the default here (measured faster than the AVX2 tiles, csrc/tile_gemm_avx2.h).
      what = gemm != nullptr && std::strcmp(gemm, "tiles") == 0
                 ? "AVX2 register tiles (FASTADAPTER_CPU_GEMM=tiles; fp32 FMA, bf16/fp16 computed in fp32)"
                 : "AVX2 rows, MKL products (faster than the AVX2 tiles here; FASTADAPTER_CPU_GEMM=tiles selects "
                   "them), bf16/fp16 computed in fp32";
#else
      what = mkl_forced ? "AVX2 rows, " + library + " products (FASTADAPTER_CPU_GEMM=mkl), bf16/fp16 in fp32"
                        : "AVX2 register tiles (fp32 FMA; bf16/fp16 computed in fp32)";
#endif
      break;
    case Variant::kGeneric:
      what = library + " products, portable rows, bf16/fp16 computed in fp32";
      break;
  }
  return {variant_name(v), what + ": " + why};
}

// -- input checks ----------------------------------------------------------------------------------------------

// The kernels read rows through GEMM leading dimensions: the last dimension must be contiguous and the row
// stride at least head_dim. Anything else (rare: expanded or oddly strided inputs) is copied once.
at::Tensor rows_ready(const at::Tensor& t, int64_t row_dim) {
  const int64_t d = t.size(-1);
  if (t.stride(-1) == 1 && t.stride(row_dim) >= d) return t;
  at::Tensor copy = at::empty(t.sizes(), t.options());  // canonical strides, even for size-1 dimensions
  copy.copy_(t);
  return copy;
}

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// The offsets `name` (cu_seqlens_q or cu_seqlens_k) of a varlen call over `tokens` packed rows: the guard of
// fastadapter/kernels/problem.py's validate_cu_seqlens.
const int32_t* check_offsets(const at::Tensor& cu, const char* name, int64_t tokens, int64_t max_seqlen,
                             const char* max_name) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 2 && cu.device().is_cpu(),
              "fastadapter_cpu: ", name, " must be a CPU int32 tensor [N+1] with N >= 1, got ", cu.scalar_type(),
              " ", shape_of(cu), " on ", cu.device());
  TORCH_CHECK(cu.is_contiguous(), "fastadapter_cpu: ", name, " must be contiguous");
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t n_seqs = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0 && c[n_seqs] <= tokens, "fastadapter_cpu: ", name, " must start at 0 and end at most at the "
              "number of tokens (", tokens, "), got ", c[0], " and ", c[n_seqs]);
  TORCH_CHECK(max_seqlen <= std::max<int64_t>(tokens, 1), "fastadapter_cpu: ", max_name, " must be at most the ",
              tokens, " packed tokens, got ", max_seqlen);
  for (int64_t n = 0; n < n_seqs; ++n)
    TORCH_CHECK(c[n + 1] >= c[n] && c[n + 1] - c[n] <= max_seqlen, "fastadapter_cpu: ", name, " must be "
                "non-decreasing with sequences no longer than ", max_name, " (", max_seqlen, "); sequence ", n,
                " spans [", c[n], ", ", c[n + 1], ")");
  return c;
}

// Checks every input and fills the problem description (the offsets and seqused_k must outlive it).
Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                     const at::Tensor& prefix_v, const at::Tensor& gate, const std::optional<at::Tensor>& cu_seqlens_q,
                     const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
                     int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale, bool gate_tanh) {
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), "fastadapter_cpu: cu_seqlens_q and "
              "cu_seqlens_k come together (varlen) or not at all (dense), got only ",
              cu_seqlens_q ? "cu_seqlens_q" : "cu_seqlens_k");
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t ndim = varlen ? 3 : 4;
  const char* q_layout = varlen ? "[Tq, Hq, D] (varlen)" : "[B, Sq, Hq, D]";
  const char* kv_layout = varlen ? "[Tk, Hkv, D] (varlen)" : "[B, Sk, Hkv, D]";
  TORCH_CHECK(q.dim() == ndim, "fastadapter_cpu: q must be ", q_layout, ", got shape ", shape_of(q));
  TORCH_CHECK(k.dim() == ndim && v.dim() == ndim, "fastadapter_cpu: k and v must be ", kv_layout, ", got k ",
              shape_of(k), " and v ", shape_of(v));
  TORCH_CHECK(prefix_k.dim() == 4 && prefix_v.dim() == 4, "fastadapter_cpu: prefix_k and prefix_v must be "
              "[Bp, P, Hkv, D], got ", shape_of(prefix_k), " and ", shape_of(prefix_v));
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastadapter_cpu: q must be float32, bfloat16 or float16, got ", dtype);
  for (const auto* t : {&k, &v, &prefix_k, &prefix_v})
    TORCH_CHECK(t->scalar_type() == dtype, "fastadapter_cpu: q, k, v, prefix_k and prefix_v must share one dtype, "
                "got ", t->scalar_type(), " and q ", dtype);
  for (const auto* t : {&q, &k, &v, &prefix_k, &prefix_v, &gate})
    TORCH_CHECK(t->device().is_cpu(), "fastadapter_cpu: every input must be a CPU tensor, got one on ",
                t->device());
  TORCH_CHECK(k.sizes() == v.sizes(), "fastadapter_cpu: k and v must have the same shape, got ", shape_of(k),
              " and ", shape_of(v));
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes(), "fastadapter_cpu: prefix_k and prefix_v must have the same "
              "shape, got ", shape_of(prefix_k), " and ", shape_of(prefix_v));

  Problem pb;
  pb.head_dim = q.size(-1);
  pb.heads_q = q.size(-2);
  pb.heads_kv = k.size(-2);
  TORCH_CHECK(pb.head_dim > 0 && pb.heads_q > 0 && pb.heads_kv > 0, "fastadapter_cpu: heads and head_dim must be "
              "positive, got q ", shape_of(q), " and k ", shape_of(k));
  TORCH_CHECK(k.size(-1) == pb.head_dim, "fastadapter_cpu: k has head_dim ", k.size(-1), " but q has ",
              pb.head_dim);
  TORCH_CHECK(pb.heads_q % pb.heads_kv == 0, "fastadapter_cpu: the query heads (", pb.heads_q, ") must be a "
              "multiple of the key/value heads (", pb.heads_kv, ")");
  if (varlen) {
    const at::Tensor& cu_q = *cu_seqlens_q;
    const at::Tensor& cu_k = *cu_seqlens_k;
    pb.cu_seqlens_q = check_offsets(cu_q, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q");
    pb.cu_seqlens_k = check_offsets(cu_k, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k");
    TORCH_CHECK(cu_q.size(0) == cu_k.size(0), "fastadapter_cpu: cu_seqlens_q and cu_seqlens_k must describe the "
                "same number of sequences, got ", cu_q.size(0) - 1, " and ", cu_k.size(0) - 1);
    pb.num_seqs = cu_q.size(0) - 1;
    pb.seqlen_q = max_seqlen_q;
    pb.seqlen_k = max_seqlen_k;
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), "fastadapter_cpu: k has batch ", k.size(0), " but q has ", q.size(0));
    pb.num_seqs = q.size(0);
    pb.seqlen_q = q.size(1);
    pb.seqlen_k = k.size(1);
  }
  if (seqused_k) {
    const at::Tensor& used = *seqused_k;
    TORCH_CHECK(used.scalar_type() == at::kInt && used.dim() == 1 && used.size(0) == pb.num_seqs &&
                used.device().is_cpu(), "fastadapter_cpu: seqused_k must be a CPU int32 tensor [", pb.num_seqs,
                "] (one length per sequence), got ", used.scalar_type(), " ", shape_of(used), " on ", used.device());
    TORCH_CHECK(used.is_contiguous(), "fastadapter_cpu: seqused_k must be contiguous");
    const int32_t* u = used.const_data_ptr<int32_t>();
    for (int64_t n = 0; n < pb.num_seqs; ++n)
      TORCH_CHECK(u[n] >= 0 && u[n] <= pb.stored_k(n), "fastadapter_cpu: seqused_k[", n, "] must be between 0 and "
                  "the ", pb.stored_k(n), " keys sequence ", n, " holds, got ", u[n]);
    pb.seqused_k = u;
  }
  TORCH_CHECK(prefix_k.size(0) == 1 || prefix_k.size(0) == pb.num_seqs, "fastadapter_cpu: the prefix batch must "
              "be 1 (shared prompt) or ", pb.num_seqs, " (one per sequence), got ", prefix_k.size(0));
  TORCH_CHECK(prefix_k.size(2) == pb.heads_kv && prefix_k.size(3) == pb.head_dim, "fastadapter_cpu: prefix_k must "
              "be [Bp, P, ", pb.heads_kv, ", ", pb.head_dim, "] (kv heads and head_dim of k), got ",
              shape_of(prefix_k));
  TORCH_CHECK(gate.scalar_type() == at::kFloat && gate.dim() == 2 && gate.size(1) == pb.heads_q &&
              (gate.size(0) == 1 || gate.size(0) == pb.num_seqs),
              "fastadapter_cpu: gate must be the normalised float32 [1 or ", pb.num_seqs, ", ", pb.heads_q,
              "] (raw gate per query head), got ", gate.scalar_type(), " ", shape_of(gate));
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "fastadapter_cpu: softmax_scale must be a positive "
              "finite number, got ", softmax_scale);
  pb.prefix_len = prefix_k.size(1);
  pb.prefix_batch = prefix_k.size(0);
  pb.gate_batch = gate.size(0);
  pb.causal = causal;
  pb.gate_tanh = gate_tanh;
  pb.scale = static_cast<float>(softmax_scale);
  return pb;
}

ForwardResult forward_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const at::Tensor& gate, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale, bool gate_tanh) {
  const Problem pb = check_inputs(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                  max_seqlen_q, max_seqlen_k, causal, softmax_scale, gate_tanh);
  const bool varlen = pb.varlen();
  if (q.numel() == 0) {  // B = 0, Sq = 0 or T = 0: nothing to compute (and no tile to split the work into)
    at::Tensor lse = at::full(lse_shape(q.sizes(), varlen), -std::numeric_limits<float>::infinity(),
                              q.options().dtype(at::kFloat));
    return {at::zeros(q.sizes(), q.options()), lse, lse.clone()};
  }
  const int64_t row_dim = varlen ? 0 : 1;
  const at::Tensor qr = rows_ready(q, row_dim), kr = rows_ready(k, row_dim), vr = rows_ready(v, row_dim);
  const at::Tensor pk = rows_ready(prefix_k, 1), pv = rows_ready(prefix_v, 1), g = gate.contiguous();
  switch (choose_variant(nullptr)) {
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
    case Variant::kAvx512: return avx512::attention_forward(pb, qr, kr, vr, pk, pv, g);
#endif
#ifdef FASTADAPTER_HAS_AVX2_VARIANT
    case Variant::kAvx2: return avx2::attention_forward(pb, qr, kr, vr, pk, pv, g);
#endif
    default: return generic::attention_forward(pb, qr, kr, vr, pk, pv, g);
  }
}

BackwardResult backward_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& gate, const at::Tensor& out,
    const at::Tensor& lse_w, const at::Tensor& lse_p, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale, bool gate_tanh) {
  const Problem pb = check_inputs(q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                  max_seqlen_q, max_seqlen_k, causal, softmax_scale, gate_tanh);
  const bool varlen = pb.varlen();
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "fastadapter_cpu: grad_out and out must "
              "have q's shape ", shape_of(q), ", got ", shape_of(grad_out), " and ", shape_of(out));
  TORCH_CHECK(grad_out.device().is_cpu() && out.device().is_cpu(), "fastadapter_cpu: grad_out and out must be CPU "
              "tensors");
  const std::vector<int64_t> expected_lse = lse_shape(q.sizes(), varlen);
  for (const auto* lse : {&lse_w, &lse_p})
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->sizes() == at::IntArrayRef(expected_lse) &&
                lse->device().is_cpu(), "fastadapter_cpu: lse_w and lse_p must be the forward's float32 ",
                varlen ? "[Hq, Tq]" : "[B, Hq, Sq]", " log-sum-exps, got ", lse->scalar_type(), " ",
                shape_of(*lse));
  if (q.numel() == 0) {  // no query: every gradient is zero
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options()),
            at::zeros(prefix_k.sizes(), prefix_k.options()), at::zeros(prefix_v.sizes(), prefix_v.options()),
            at::zeros(gate.sizes(), gate.options().dtype(at::kFloat))};
  }
  const int64_t row_dim = varlen ? 0 : 1;
  const at::Tensor go = rows_ready(grad_out.to(q.scalar_type()), row_dim), qr = rows_ready(q, row_dim);
  const at::Tensor kr = rows_ready(k, row_dim), vr = rows_ready(v, row_dim), pk = rows_ready(prefix_k, 1);
  const at::Tensor pv = rows_ready(prefix_v, 1), g = gate.contiguous();
  const at::Tensor o = rows_ready(out.to(q.scalar_type()), row_dim), lw = lse_w.contiguous(), lp = lse_p.contiguous();
  switch (choose_variant(nullptr)) {
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
    case Variant::kAvx512: return avx512::attention_backward(pb, go, qr, kr, vr, pk, pv, g, o, lw, lp);
#endif
#ifdef FASTADAPTER_HAS_AVX2_VARIANT
    case Variant::kAvx2: return avx2::attention_backward(pb, go, qr, kr, vr, pk, pv, g, o, lw, lp);
#endif
    default: return generic::attention_backward(pb, go, qr, kr, vr, pk, pv, g, o, lw, lp);
  }
}

// out [M, N] = x [M, K] · weight [N, K]ᵀ (+ bias [N]) on the kernel variant of this CPU (decode_linear.h).
at::Tensor decode_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "fastadapter_cpu: decode_linear "
              "needs x [M, K] and weight [N, K] with one K, got x ", shape_of(x), " and weight ", shape_of(weight));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastadapter_cpu: decode_linear "
              "takes float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype && (!bias || bias->scalar_type() == dtype), "fastadapter_cpu: "
              "decode_linear needs x, weight and bias of one dtype, got x ", dtype, ", weight ", weight.scalar_type(),
              bias ? std::string(", bias ") + c10::toString(bias->scalar_type()) : std::string());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && (!bias || bias->device().is_cpu()),
              "fastadapter_cpu: decode_linear takes CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "fastadapter_cpu: decode_linear needs contiguous x and "
              "weight (x ", shape_of(x), " strides ", x.strides(), ", weight strides ", weight.strides(), ")");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "fastadapter_cpu: decode_linear's "
              "bias must be [", weight.size(0), "] (one per output), got ", shape_of(*bias));
  if (x.size(0) == 0 || weight.size(0) == 0) return at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(1) == 0) {  // an empty sum: the bias alone
    at::Tensor out = at::zeros({x.size(0), weight.size(0)}, x.options());
    return bias ? out.add_(*bias) : out;
  }
  switch (choose_variant(nullptr)) {
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
    case Variant::kAvx512: return avx512::decode_linear(x, weight, bias);
#endif
#ifdef FASTADAPTER_HAS_AVX2_VARIANT
    case Variant::kAvx2: return avx2::decode_linear(x, weight, bias);
#endif
    default: return generic::decode_linear(x, weight, bias);
  }
}

// -- a training step's row kernels (training_rows.h) ----------------------------------------------------------

// Runs the call EXPR in the namespace of the kernel variant of this CPU (or the one FASTADAPTER_CPU_ISA names).
#ifdef FASTADAPTER_HAS_AVX512_VARIANT
#define FASTADAPTER_CASE_AVX512(EXPR) case Variant::kAvx512: avx512::EXPR; break;
#else
#define FASTADAPTER_CASE_AVX512(EXPR)
#endif
#ifdef FASTADAPTER_HAS_AVX2_VARIANT
#define FASTADAPTER_CASE_AVX2(EXPR) case Variant::kAvx2: avx2::EXPR; break;
#else
#define FASTADAPTER_CASE_AVX2(EXPR)
#endif
#define FASTADAPTER_ON_VARIANT(EXPR)                        \
  switch (choose_variant(nullptr)) {                        \
    FASTADAPTER_CASE_AVX512(EXPR)                           \
    FASTADAPTER_CASE_AVX2(EXPR)                             \
    default: generic::EXPR; break;                          \
  }

// x [N, D] fp32 contiguous and weight [D] fp32 contiguous on the CPU (each row kernel's contract).
void check_rows(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "fastadapter_cpu: ", op,
              " needs x [N, D] and weight [D], got x ", shape_of(x), " and weight ", shape_of(weight));
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "fastadapter_cpu: ", op,
              " takes float32 x and weight, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "fastadapter_cpu: ", op, " takes CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "fastadapter_cpu: ", op, " needs contiguous x and weight");
}

// `other` has `like`'s shape, dtype (fp32), device and is contiguous.
void check_same(const char* op, const char* name, const at::Tensor& other, const at::Tensor& like) {
  TORCH_CHECK(other.sizes() == like.sizes() && other.scalar_type() == at::kFloat && other.device().is_cpu() &&
                  other.is_contiguous(),
              "fastadapter_cpu: ", op, " needs ", name, " as a contiguous float32 CPU tensor of shape ",
              shape_of(like), ", got ", other.scalar_type(), " ", shape_of(other));
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "fastadapter_cpu: rms_norm needs a finite eps >= 0, got ", eps);
}

// (y, rstd): y [N, D] = x / rms(x) · weight, rstd [N] = 1 / rms(x).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows("rms_norm_forward", x, weight);
  check_eps(eps);
  at::Tensor y = at::empty_like(x), rstd = at::empty({x.size(0)}, x.options());
  if (x.numel() == 0) return {y, rstd.fill_(1.0 / std::sqrt(eps))};
  FASTADAPTER_ON_VARIANT(rms_norm_forward(x, std::nullopt, weight, eps, at::Tensor(), y, rstd))
  return {y, rstd};
}

// (sum, y, rstd): sum = x + residual, then y and rstd of sum as rms_norm_forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_forward_op(const at::Tensor& x, const at::Tensor& residual,
                                                                       const at::Tensor& weight, double eps) {
  check_rows("add_rms_norm_forward", x, weight);
  check_same("add_rms_norm_forward", "residual", residual, x);
  check_eps(eps);
  at::Tensor sum = at::empty_like(x), y = at::empty_like(x), rstd = at::empty({x.size(0)}, x.options());
  if (x.numel() == 0) return {sum, y, rstd.fill_(1.0 / std::sqrt(eps))};
  FASTADAPTER_ON_VARIANT(rms_norm_forward(x, residual, weight, eps, sum, y, rstd))
  return {sum, y, rstd};
}

// grad_x [N, D] of rms_norm_forward's y (+ grad_sum [N, D] when given).
at::Tensor rms_norm_backward_op(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum) {
  check_rows("rms_norm_backward", x, weight);
  check_same("rms_norm_backward", "grad_y", grad_y, x);
  if (grad_sum) check_same("rms_norm_backward", "grad_sum", *grad_sum, x);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == x.size(0) && rstd.scalar_type() == at::kFloat &&
                  rstd.is_contiguous() && rstd.device().is_cpu(),
              "fastadapter_cpu: rms_norm_backward needs rstd as float32 [", x.size(0), "], got ", rstd.scalar_type(),
              " ", shape_of(rstd));
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  FASTADAPTER_ON_VARIANT(rms_norm_backward(grad_y, x, weight, rstd, grad_sum, grad_x))
  return grad_x;
}

// act(gate) · up, gate and up fp32 contiguous of one shape (gelu_tanh: GeGLU's GELU, else SiLU).
at::Tensor gated_activation_forward_op(const at::Tensor& gate, const at::Tensor& up, bool gelu_tanh) {
  check_same("gated_activation_forward", "gate", gate, gate);
  check_same("gated_activation_forward", "up", up, gate);
  at::Tensor out = at::empty_like(gate);
  if (gate.numel() == 0) return out;
  FASTADAPTER_ON_VARIANT(gated_activation_forward(gate, up, gelu_tanh, out))
  return out;
}

// e^x as the attention kernels' softmax computes it, x fp32 contiguous (for the tests of vec_exp.h).
at::Tensor softmax_exp_op(const at::Tensor& x) {
  check_same("softmax_exp", "x", x, x);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  FASTADAPTER_ON_VARIANT(softmax_exp(x, out))
  return out;
}

// (grad_gate, grad_up) of gated_activation_forward.
std::tuple<at::Tensor, at::Tensor> gated_activation_backward_op(const at::Tensor& grad, const at::Tensor& gate,
                                                                const at::Tensor& up, bool gelu_tanh) {
  check_same("gated_activation_backward", "gate", gate, gate);
  check_same("gated_activation_backward", "up", up, gate);
  check_same("gated_activation_backward", "grad", grad, gate);
  at::Tensor grad_gate = at::empty_like(gate), grad_up = at::empty_like(gate);
  if (gate.numel() == 0) return {grad_gate, grad_up};
  FASTADAPTER_ON_VARIANT(gated_activation_backward(grad, gate, up, gelu_tanh, grad_gate, grad_up))
  return {grad_gate, grad_up};
}

// Per-row losses [N] of logits [N, V] (fp32, contiguous) against target int64 [N]; logits become the gradient.
at::Tensor cross_entropy_rows_op(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.device().is_cpu(),
              "fastadapter_cpu: cross_entropy_rows_ needs contiguous float32 CPU logits [N, V], got ",
              logits.scalar_type(), " ", shape_of(logits));
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong &&
                  target.device().is_cpu(),
              "fastadapter_cpu: cross_entropy_rows_ needs int64 targets [", logits.size(0), "], got ",
              target.scalar_type(), " ", shape_of(target));
  const at::Tensor t = target.contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    TORCH_CHECK(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < logits.size(1)), "fastadapter_cpu: "
                "cross_entropy_rows_: target ", tp[i], " of row ", i, " is outside [0, ", logits.size(1),
                ") and is not the ignore index ", ignore_index);
  at::Tensor loss = at::empty({logits.size(0)}, logits.options());
  if (logits.numel() == 0) return loss.zero_();
  FASTADAPTER_ON_VARIANT(cross_entropy_rows(logits, t, ignore_index, loss))
  return loss;
}

}  // namespace

TORCH_LIBRARY(fastadapter_cpu, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor gate, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, "
        "bool causal, float softmax_scale, bool gate_tanh) -> (Tensor, Tensor, Tensor)");
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor gate, "
        "Tensor out, Tensor lse_w, Tensor lse_p, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, "
        "int max_seqlen_q, int max_seqlen_k, bool causal, float softmax_scale, bool gate_tanh) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("add_rms_norm_forward(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, Tensor? grad_sum) -> Tensor");
  m.def("gated_activation_forward(Tensor gate, Tensor up, bool gelu_tanh) -> Tensor");
  m.def("gated_activation_backward(Tensor grad, Tensor gate, Tensor up, bool gelu_tanh) -> (Tensor, Tensor)");
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor target, int ignore_index) -> Tensor");
  m.def("softmax_exp(Tensor x) -> Tensor");
  m.def("cpu_path() -> (str, str)", &cpu_path_op);
  // The calling thread's kernel buffers (workspace.h).
  m.def("workspace_bytes() -> int", &workspace_bytes);
  m.def("release_workspace() -> ()", &release_workspace);
  m.def("fill_workspace(int value) -> ()", &fill_workspace);
}

TORCH_LIBRARY_IMPL(fastadapter_cpu, CPU, m) {
  m.impl("forward", &forward_op);
  m.impl("backward", &backward_op);
  m.impl("decode_linear", &decode_linear_op);
  m.impl("rms_norm_forward", &rms_norm_forward_op);
  m.impl("add_rms_norm_forward", &add_rms_norm_forward_op);
  m.impl("rms_norm_backward", &rms_norm_backward_op);
  m.impl("gated_activation_forward", &gated_activation_forward_op);
  m.impl("gated_activation_backward", &gated_activation_backward_op);
  m.impl("cross_entropy_rows_", &cross_entropy_rows_op);
  m.impl("softmax_exp", &softmax_exp_op);
}

}  // namespace fastadapter_cpu

// `import fastadapter._C` loads this library, which runs the registrations above; the module itself is empty.
static PyModuleDef fastadapter_c_module = {PyModuleDef_HEAD_INIT, "fastadapter._C",
                                           "Compiled CPU kernels of zero-init attention (torch.ops.fastadapter_cpu).",
                                           -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastadapter_c_module); }
