// Attention over one cache slot with AVX2 + FMA (every x86-64 server since 2013; the AVX-512
// hosts run it too: with head_dim 64 the dot products are too short for wider vectors to pay).
// Compiled for that target only here; see isa.h.
#include <immintrin.h>

#include <cmath>

#include "../../isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace cpu_llm {
namespace {

#include "vec.h"

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i < D) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

}  // namespace

void rope_avx2(const float* x, const float* cos, const float* sin, int64_t half, float scale, float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = (a * cos[i] - b * sin[i]) * scale;
    out[i + half] = (b * cos[i] + a * sin[i]) * scale;
  }
}

void attend_avx2(const float* q, const float* keys, const float* values, int64_t len, int64_t D, float scale,
                 float* scores, float* out) {
  float top = -HUGE_VALF;
  for (int64_t l = 0; l < len; ++l) {
    const float s = dot(q, keys + l * D, D) * scale;
    scores[l] = s;
    top = s > top ? s : top;
  }
  const __m256 vtop = _mm256_set1_ps(top);
  map8(scores, len, [&](__m256 s) { return exp8(_mm256_sub_ps(s, vtop)); });
  float total = 0.f;
  for (int64_t l = 0; l < len; ++l) total += scores[l];
  const __m256 inv = _mm256_set1_ps(1.f / total);
  // Values: 64 columns per pass, 8 independent accumulators (one chain per 8 columns would wait
  // on the FMA latency at every position).
  int64_t i = 0;
  for (; i + 64 <= D; i += 64) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t l = 0; l < len; ++l) {
      const __m256 s = _mm256_set1_ps(scores[l]);
      const float* v = values + l * D + i;
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(s, _mm256_loadu_ps(v + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + i + 8 * j, _mm256_mul_ps(acc[j], inv));
  }
  for (; i < D; i += 8) {  // head_dim not a multiple of 64: the rest 8 columns at a time
    __m256 acc = _mm256_setzero_ps();
    for (int64_t l = 0; l < len; ++l) {
      acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[l]), _mm256_loadu_ps(values + l * D + i), acc);
    }
    _mm256_storeu_ps(out + i, _mm256_mul_ps(acc, inv));
  }
}

}  // namespace cpu_llm

#pragma GCC pop_options
