// Small fused ops of the model runner's decode step, where per-op overhead rather than arithmetic
// is the cost (a decode step has one row of a few hundred to a few thousand values):
//
//   rms_norm(x, weight, eps) -> Tensor                  x / sqrt(mean(x^2) + eps) * weight, per row
//   add_rms_norm_(x, delta, weight, eps) -> Tensor      x += delta (in place: the residual stream),
//                                                       then rms_norm(x): one op instead of two
//   silu_mul(gate_up) -> Tensor                         silu(gate) * up for gate_up = [gate | up]
//
// x, delta: contiguous float32 [N, H]; rows run in parallel. This file is compiled for baseline
// x86-64: the per-row bodies come from the active kernel table (vectorized in x86/avx2/rows.cpp,
// scalar in generic/rows.cpp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "isa.h"
#include "ops.h"

namespace cpu_llm {
namespace {

constexpr int64_t kRowsPerTask = 8;

void check_rows(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.dim() == 2, op, ": ", name,
              " must be a contiguous float32 [N, H] tensor, got ", t.scalar_type(), " ", t.sizes());
}

void check_weight(const torch::Tensor& x, const torch::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == x.size(1),
              op, ": weight must be a contiguous float32 tensor of ", x.size(1), " values, got ",
              weight.scalar_type(), " ", weight.sizes());
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "rms_norm", "x");
  check_weight(x, weight, "rms_norm");
  const int64_t H = x.size(1);
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto normalize_row = active_kernels().rms_norm_row;
  at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) normalize_row(xp + r * H, wp, H, eps, op + r * H);
  });
  return out;
}

torch::Tensor add_rms_norm_out(torch::Tensor x, torch::Tensor delta, torch::Tensor weight, double eps,
                               torch::Tensor out_buffer) {
  check_rows(x, "add_rms_norm_", "x");
  check_rows(delta, "add_rms_norm_", "delta");
  TORCH_CHECK(delta.sizes() == x.sizes(), "add_rms_norm_: delta ", delta.sizes(), " must match x ", x.sizes());
  check_weight(x, weight, "add_rms_norm_");
  const int64_t H = x.size(1);
  auto out = output(out_buffer, x.size(0), H, x, "add_rms_norm_");
  float *xp = x.data_ptr<float>(), *op = out.data_ptr<float>();
  const float *dp = delta.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const auto normalize_row = active_kernels().rms_norm_row;
  at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = xp + r * H;
      for (int64_t i = 0; i < H; ++i) row[i] += dp[r * H + i];
      normalize_row(row, wp, H, eps, op + r * H);
    }
  });
  return out;
}

torch::Tensor silu_mul_out(torch::Tensor gate_up, torch::Tensor out_buffer) {
  check_rows(gate_up, "silu_mul", "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up must have an even number of columns, got ",
              gate_up.size(1));
  const int64_t I = gate_up.size(1) / 2;
  auto out = output(out_buffer, gate_up.size(0), I, gate_up, "silu_mul");
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto silu_mul_row = active_kernels().silu_mul;
  at::parallel_for(0, gate_up.size(0), kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul_row(gp + r * 2 * I, gp + r * 2 * I + I, op + r * I, I);
  });
  return out;
}

torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor delta, torch::Tensor weight, double eps) {
  return add_rms_norm_out(x, delta, weight, eps, torch::Tensor());
}

torch::Tensor silu_mul(torch::Tensor gate_up) { return silu_mul_out(gate_up, torch::Tensor()); }

}  // namespace cpu_llm

TORCH_LIBRARY_FRAGMENT(cpu_llm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpu_llm, CPU, m) {
  m.impl("rms_norm", &cpu_llm::rms_norm);
  m.impl("add_rms_norm_", &cpu_llm::add_rms_norm_);
  m.impl("silu_mul", &cpu_llm::silu_mul);
}
