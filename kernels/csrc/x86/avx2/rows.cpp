// AVX2 bodies of the runner's row ops (elementwise.cpp): RMSNorm of one row and silu(gate) x up.
// Vectorized because at decode they run on one row of up to ~16k values per layer, where scalar
// std::exp took ~35 us per call on a 1B model's 8,192-wide MLP.
#include <immintrin.h>

#include <cmath>

#include "../../isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace cpu_llm {
namespace {

#include "vec.h"

inline __m256 silu_mul8(__m256 g, __m256 u) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))), u);
}

}  // namespace

void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  if (i < n) {  // the last 1..7 values through the same vector code
    float g[8] = {}, u[8] = {}, o[8];
    for (int64_t j = i; j < n; ++j) g[j - i] = gate[j], u[j - i] = up[j];
    _mm256_storeu_ps(o, silu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
    for (int64_t j = i; j < n; ++j) out[j] = o[j - i];
  }
}

void rms_norm_row_avx2(const float* x, const float* w, int64_t H, double eps, float* out) {
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();  // squares summed in double
  int64_t i = 0;
  for (; i + 8 <= H; i += 8) {
    const __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), hi = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
    acc0 = _mm256_fmadd_pd(lo, lo, acc0);
    acc1 = _mm256_fmadd_pd(hi, hi, acc1);
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
  double squares = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (int64_t j = i; j < H; ++j) squares += static_cast<double>(x[j]) * x[j];
  const float inv = static_cast<float>(1.0 / std::sqrt(squares / H + eps));
  const __m256 vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= H; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)));
  }
  for (; i < H; ++i) out[i] = w[i] * (x[i] * inv);
}

}  // namespace cpu_llm

#pragma GCC pop_options
