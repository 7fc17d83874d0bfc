// Elementwise parts of a decoder layer fused into one pass each, float32 on the CPU: RMSNorm (with
// the residual add before it), rotary embedding of q and k in place, SiLU-and-multiply of the MLP.
// The torch compositions in engine/models/base.py and layers.py are the reference these are tested
// against (tests/unit/engine/test_fused_ops.py); engine/ops.py picks one or the other.
//
// Each op is a handful of torch ops fused: for a small model's decode step (tensors of a few
// hundred KiB) the cost of the unfused version is mostly the per-op dispatch and the extra passes
// over memory, which is why these exist.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

// Rows per parallel chunk: enough work (~64 KiB) per thread that a small step stays on one thread.
int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [rows, hidden] with contiguous rows");
}

inline void norm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == at::kFloat,
              "weight must be float32 [hidden]");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t n = x.size(1), ld = x.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), row_grain(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norm_row(xp + r * ld, wp, op + r * n, n, static_cast<float>(eps));
  });
  return out;
}

torch::Tensor add_rms_norm_(torch::Tensor residual, torch::Tensor delta, torch::Tensor weight, double eps) {
  check_rows(residual, "residual");
  check_rows(delta, "delta");
  TORCH_CHECK(residual.sizes() == delta.sizes(), "residual and delta must have one shape");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == residual.size(1) && weight.scalar_type() == at::kFloat,
              "weight must be float32 [hidden]");
  auto out = torch::empty({residual.size(0), residual.size(1)}, residual.options());
  const int64_t n = residual.size(1), ldr = residual.stride(0), ldd = delta.stride(0);
  float* rp = residual.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, residual.size(0), row_grain(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* h = rp + r * ldr;
      const float* d = dp + r * ldd;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] += d[i];
      norm_row(h, wp, op + r * n, n, static_cast<float>(eps));
    }
  });
  return out;
}

void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  // q [T, Hq, D], k [T, Hk, D]: heads and D contiguous inside a row (rows may be strided, e.g.
  // views into one fused qkv projection); cos, sin [T, D] float32 contiguous, halves equal.
  for (const auto* t : {&q, &k}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->stride(2) == 1 &&
                    t->stride(1) == t->size(2), "q and k must be float32 [T, heads, head_dim], rows contiguous");
  }
  const int64_t T = q.size(0), D = q.size(2), half = D / 2;
  TORCH_CHECK(k.size(0) == T && k.size(2) == D && D % 2 == 0, "q and k shapes do not match");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos/sin must be float32 [T, D]");
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t hq = q.size(1), hk = k.size(1), ldq = q.stride(0), ldk = k.stride(0);
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  at::parallel_for(0, T, row_grain((hq + hk) * D), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      auto rotate = [&](float* x, int64_t heads) {
        for (int64_t h = 0; h < heads; ++h, x += D) {
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = x[i], x2 = x[i + half];
            x[i] = x1 * c[i] - x2 * s[i];
            x[i + half] = x2 * c[i + half] + x1 * s[i + half];
          }
        }
      };
      rotate(qp + t * ldq, hq);
      rotate(kp + t * ldk, hk);
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width [T, 2F]");
  const int64_t F = gate_up.size(1) / 2, ld = gate_up.stride(0);
  auto out = torch::empty({gate_up.size(0), F}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, gate_up.size(0), row_grain(2 * F), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gp + r * ld;
      const float* u = g + F;
      float* o = op + r * F;
#pragma omp simd
      for (int64_t i = 0; i < F; ++i) o[i] = g[i] / (1.f + std::exp(std::min(-g[i], 88.f))) * u[i];
    }
  });
  return out;
}
