// The scalar twins of the row ops, and the table of a CPU without AVX2: it runs the row ops only
// (the products and attention need AVX2, and say so: require_kernels in dispatch.cpp).
#include <cmath>

#include "../isa.h"

namespace cpu_llm {

void silu_mul_scalar(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

void rms_norm_row_scalar(const float* x, const float* w, int64_t H, double eps, float* out) {
  double squares = 0.0;
  for (int64_t i = 0; i < H; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(squares / H + eps));
  for (int64_t i = 0; i < H; ++i) out[i] = w[i] * (x[i] * inv);
}

const KernelTable kScalarKernels{
    "none", silu_mul_scalar, rms_norm_row_scalar,
    nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace cpu_llm
