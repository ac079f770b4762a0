// Row kernels of a training step's elementwise work: RMSNorm (optionally fused with the residual addition before
// it), the gated activation of a gated MLP (SwiGLU, GeGLU), forward and backward, and the token cross-entropy of a
// chunk of logits with its gradient, fp32.
//
// Why: in a LLaMA-Adapter step on a small model (SmolLM2-135M, CPU) the frozen products run near the machine's
// GEMM peak, and about a third of the step is the elementwise work around them, each op of eager PyTorch one pass
// over a [tokens, dim] tensor (RMSNorm forward is pow, mean, rsqrt, two products; its autograd backward about
// seven passes more). Here each of them is one pass over its rows in forward and one in backward, on the vectors
// of the variant's instruction set, and saves only what its backward reads.
//
// The references are the eager compositions in fastadapter/model/norms.py (rms_normalize, RMSNorm),
// fastadapter/model/gated_activation.py (gated_activation_reference) and
// fastadapter/training/linear_cross_entropy.py (linear_cross_entropy_reference); tests/model/test_row_kernels.py
// checks values and gradients against them. Rows are split over threads (at::parallel_for).
//
// Compiled into every kernel variant (dispatch.h); registration.cpp checks the inputs (fp32, contiguous,
// matching shapes) before any of these runs.
#pragma once

#include "attention_cpu.h"  // Vec

namespace fastadapter_cpu::FASTADAPTER_ISA {
namespace training_rows {

// Rows per task: enough work per thread wake-up for rows of a few hundred values.
inline int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(width, 1));
}

inline float sum_all(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Σ_j a[j]·b[j] over one row.
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  float sum = sum_all(acc);
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// Σ_j a[j]·b[j]·c[j] over one row.
inline float dot3(const float* a, const float* b, const float* c, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(a + j) * Vec::loadu(b + j), Vec::loadu(c + j), acc);
  float sum = sum_all(acc);
  for (; j < n; ++j) sum += a[j] * b[j] * c[j];
  return sum;
}

// -- the activations: value and derivative, on vectors and scalars ----------------------------------------------

// sigmoid(x) = 1 / (1 + e^-x); silu(x) = x · sigmoid(x); silu'(x) = s · (1 + x · (1 − s)).
inline Vec sigmoid(Vec x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp_u20()); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

constexpr float kGeluK0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluK1 = 0.044715f;

enum class Activation { kSilu, kGeluTanh };

// act(g) and act'(g), for V = Vec or float.
template <Activation A, typename V>
inline void activate(V g, V& value, V& slope) {
  if constexpr (A == Activation::kSilu) {
    const V s = sigmoid(g);
    value = g * s;
    slope = s * (V(1.f) + g * (V(1.f) - s));
  } else {
    // gelu_tanh(g) = g/2 · (1 + tanh(z)), z = k0 (g + k1 g³); with s = sigmoid(2z), 1 + tanh(z) = 2s and
    // 1 − tanh(z)² = 4s(1 − s), so gelu = g · s and gelu' = s + 2 g s (1 − s) · k0 (1 + 3 k1 g²), free of the
    // cancellation 1 + tanh(z) suffers for negative z.
    const V g2 = g * g;
    const V z = V(kGeluK0) * g * (V(1.f) + V(kGeluK1) * g2);
    const V s = sigmoid(z + z);
    value = g * s;
    slope = s + V(2.f) * g * s * (V(1.f) - s) * V(kGeluK0) * (V(1.f) + V(3.f * kGeluK1) * g2);
  }
}

// out = act(gate) · up over n values.
template <Activation A>
void gated_forward(const float* gate, const float* up, float* out, int64_t n) {
  at::parallel_for(0, n, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    for (; j + Vec::size() <= end; j += Vec::size()) {
      Vec value, slope;
      activate<A>(Vec::loadu(gate + j), value, slope);
      (value * Vec::loadu(up + j)).store(out + j);
    }
    for (; j < end; ++j) {
      float value, slope;
      activate<A>(gate[j], value, slope);
      out[j] = value * up[j];
    }
  });
}

// grad_gate = grad · up · act'(gate), grad_up = grad · act(gate) over n values.
template <Activation A>
void gated_backward(const float* grad, const float* gate, const float* up, float* grad_gate, float* grad_up,
                    int64_t n) {
  at::parallel_for(0, n, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    for (; j + Vec::size() <= end; j += Vec::size()) {
      Vec value, slope;
      activate<A>(Vec::loadu(gate + j), value, slope);
      const Vec g = Vec::loadu(grad + j);
      (g * Vec::loadu(up + j) * slope).store(grad_gate + j);
      (g * value).store(grad_up + j);
    }
    for (; j < end; ++j) {
      float value, slope;
      activate<A>(gate[j], value, slope);
      grad_gate[j] = grad[j] * up[j] * slope;
      grad_up[j] = grad[j] * value;
    }
  });
}

}  // namespace training_rows

// -- RMSNorm -------------------------------------------------------------------------------------------------------

// x [N, D] (or, with residual, the row sums x + residual, written to sum [N, D]) normalised:
// y = (x · rstd) · weight with rstd = 1 / sqrt(mean(x²) + eps) per row, written to rstd [N]. weight [D] is the
// effective scale (LLaMA's weight, Gemma's 1 + weight). All fp32 contiguous; sum undefined without residual.
void rms_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                      double eps, const at::Tensor& sum, const at::Tensor& y, const at::Tensor& rstd) {
  const int64_t rows = x.size(0), width = x.size(1);
  const float* xp = x.const_data_ptr<float>();
  const float* rp = residual ? residual->const_data_ptr<float>() : nullptr;
  const float* wp = weight.const_data_ptr<float>();
  float* sp = residual ? sum.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  float* rstdp = rstd.data_ptr<float>();
  const float inv_width = 1.f / static_cast<float>(width), epsf = static_cast<float>(eps);
  at::parallel_for(0, rows, training_rows::row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = xp + i * width;
      if (rp) {  // the residual addition, then the row's sum is what is normalised
        float* si = sp + i * width;
        at::vec::map2([](Vec a, Vec b) { return a + b; }, si, xi, rp + i * width, width);
        xi = si;
      }
      const float r = 1.f / std::sqrt(training_rows::dot(xi, xi, width) * inv_width + epsf);
      rstdp[i] = r;
      at::vec::map2([r](Vec a, Vec w) { return (a * Vec(r)) * w; }, yp + i * width, xi, wp, width);
    }
  });
}

// grad_x [N, D] of y = (x · rstd) · weight, plus grad_sum [N, D] when given (the gradient that reaches the residual
// sum from its other use, so that one pass yields the sum's whole gradient):
// grad_x = rstd · (grad_y · weight) − x · rstd³ · mean(grad_y · weight · x)  (+ grad_sum).
void rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum, const at::Tensor& grad_x) {
  const int64_t rows = x.size(0), width = x.size(1);
  const float* gp = grad_y.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const float* rstdp = rstd.const_data_ptr<float>();
  const float* extra = grad_sum ? grad_sum->const_data_ptr<float>() : nullptr;
  float* dxp = grad_x.data_ptr<float>();
  const float inv_width = 1.f / static_cast<float>(width);
  at::parallel_for(0, rows, training_rows::row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *gi = gp + i * width, *xi = xp + i * width;
      float* dxi = dxp + i * width;
      const float r = rstdp[i];
      const float c = training_rows::dot3(gi, wp, xi, width) * r * r * r * inv_width;
      const Vec vr(r), vc(c);
      int64_t j = 0;
      if (extra) {
        const float* ei = extra + i * width;
        for (; j + Vec::size() <= width; j += Vec::size()) {
          const Vec d = vr * Vec::loadu(gi + j) * Vec::loadu(wp + j) - vc * Vec::loadu(xi + j);
          (d + Vec::loadu(ei + j)).store(dxi + j);
        }
        for (; j < width; ++j) dxi[j] = r * gi[j] * wp[j] - c * xi[j] + ei[j];
      } else {
        for (; j + Vec::size() <= width; j += Vec::size())
          (vr * Vec::loadu(gi + j) * Vec::loadu(wp + j) - vc * Vec::loadu(xi + j)).store(dxi + j);
        for (; j < width; ++j) dxi[j] = r * gi[j] * wp[j] - c * xi[j];
      }
    }
  });
}

// -- gated activation ------------------------------------------------------------------------------------------

// out = act(gate) · up, all fp32 contiguous of one shape; gelu_tanh selects GeGLU's tanh-approximated GELU, else
// SiLU (SwiGLU).
void gated_activation_forward(const at::Tensor& gate, const at::Tensor& up, bool gelu_tanh, const at::Tensor& out) {
  using training_rows::Activation;
  const float *g = gate.const_data_ptr<float>(), *u = up.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (gelu_tanh) training_rows::gated_forward<Activation::kGeluTanh>(g, u, o, gate.numel());
  else training_rows::gated_forward<Activation::kSilu>(g, u, o, gate.numel());
}

// grad_gate = grad · up · act'(gate), grad_up = grad · act(gate); one pass, act recomputed from gate.
void gated_activation_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, bool gelu_tanh,
                               const at::Tensor& grad_gate, const at::Tensor& grad_up) {
  using training_rows::Activation;
  const float *d = grad.const_data_ptr<float>(), *g = gate.const_data_ptr<float>(), *u = up.const_data_ptr<float>();
  float *dg = grad_gate.data_ptr<float>(), *du = grad_up.data_ptr<float>();
  if (gelu_tanh) training_rows::gated_backward<Activation::kGeluTanh>(d, g, u, dg, du, gate.numel());
  else training_rows::gated_backward<Activation::kSilu>(d, g, u, dg, du, gate.numel());
}

// -- token cross-entropy ---------------------------------------------------------------------------------------

// For each row i of logits [N, V]: loss[i] = logsumexp(logits[i]) − logits[i, target[i]], and logits[i] is
// overwritten with the loss's gradient softmax(logits[i]) − onehot(target[i]). A row whose target is `ignore`
// gets loss 0 and a zero gradient. One row (V fp32 values: 192 KB for a 49152-way head) stays in the core's L2
// cache across its three passes (max; exp and sum; scale), so the chunk crosses memory about once, where the eager
// composition (logsumexp, a shifted exp, a one-hot scatter, a row mask) writes four [N, V] tensors.
void cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target, int64_t ignore, const at::Tensor& loss) {
  const int64_t rows = logits.size(0), width = logits.size(1);
  float* lp = logits.data_ptr<float>();
  const int64_t* tp = target.const_data_ptr<int64_t>();
  float* out = loss.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = lp + i * width;
      const int64_t t = tp[i];
      if (t == ignore) {
        std::memset(row, 0, sizeof(float) * width);
        out[i] = 0.f;
        continue;
      }
      const float shift = row_max(row, width);
      const float picked = row[t];
      const float total = exp_shift_sum(row, width, shift);  // row[j] = exp(row[j] − shift)
      scale_row(row, width, 1.f / total);
      row[t] -= 1.f;
      out[i] = std::log(total) + shift - picked;
    }
  });
}

}  // namespace fastadapter_cpu::FASTADAPTER_ISA
