// AVX2 + FMA kernels (every x86-64 server CPU since 2013). Compiled for that target only here
// (see isa.h for why no torch header is included).
//
// Integer path (qlinear_avx2): per block of 32, the weights (int8, or int4 nibbles widened to
// bytes) meet int8 activations in _mm256_maddubs_epi16, which multiplies unsigned by signed
// bytes. int8 weights are signed, so the sign moves to the activations: |w| * sign(x, w).
// |w| <= 128 and |x| <= 127, so a pair of products never saturates int16.
// Each row's sums are accumulated in the same order whatever the tile or batch size, so a row's
// result never depends on its batch companions.
#include <immintrin.h>

#include "../../isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace cpu_llm {
namespace {

#include "../tiles.h"

#include "vec.h"

inline float scale_at(const QuantWeights& w, int64_t i) {
  if (w.scales_fp16) return _cvtsh_ss(static_cast<const uint16_t*>(w.scales)[i]);
  return static_cast<const float*>(w.scales)[i];
}

inline float offset_at(const QuantWeights& w, int64_t i, float scale) {
  return w.offsets ? w.offsets[i] : -w.zero * scale;
}

// 32 stored weights of block b as bytes: signed int8, or unsigned 0..15 for int4.
template <int BITS>
inline __m256i load_block(const uint8_t* row, int64_t b) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock / 2));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
  }
}

template <int BITS, int R>
void qlinear_tile(const QuantActs& a, int64_t m0, const QuantWeights& w, int64_t n, const float* wsb, float* c,
                  float* y, int64_t ldy) {
  const uint8_t* row = w.data + n * w.row_bytes();
  const int64_t nb = a.K / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  combined_scales_avx2(a, m0, R, wsb, c);
  __m256 acc[R];
  float ofs[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), ofs[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    // Weights are read once: ask for them kPrefetch bytes ahead (the next rows are contiguous).
    if (BITS == 8 || b % 2 == 0) {  // one prefetch per 64-byte line
      _mm_prefetch(reinterpret_cast<const char*>(row) + b * kBlock * BITS / 8 + kPrefetch, _MM_HINT_T0);
    }
    const __m256i wv = load_block<BITS>(row, b);
    const __m256i wu = BITS == 8 ? _mm256_abs_epi8(wv) : wv;
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * nb + b;
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + i * kBlock));
      if constexpr (BITS == 8) xv = _mm256_sign_epi8(xv, wv);
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(c + r * nb + b), acc[r]);
    }
  }
  add_offsets_avx2(a, m0, R, w, n, wsb, 0.f, ofs);
  for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + n] = hsum(acc[r]) + ofs[r];
}

template <int BITS>
void qlinear_bits(const QuantActs& a, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                  float* scratch) {
  const int64_t nb = a.K / kBlock;
  float *wsb = scratch, *c = wsb + nb;
  for (int64_t n = n0; n < n1; ++n) {
    block_scales_avx2(w, n, wsb);
    for_each_tile(a.M, [&]<int R>(int64_t m) { qlinear_tile<BITS, R>(a, m, w, n, wsb, c, y, ldy); });
  }
}

// Dequantize 32 weights of block b into v[0..3] (8 floats each).
template <int BITS>
inline void dequant_block(const uint8_t* row, int64_t b, __m256 scale, __m256 offset, __m256 v[4]) {
  const __m256i bytes = load_block<BITS>(row, b);
  const __m128i halves[2] = {_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1)};
  for (int i = 0; i < 4; ++i) {
    const __m128i part = i % 2 ? _mm_srli_si128(halves[i / 2], 8) : halves[i / 2];
    const __m256i wide = BITS == 8 ? _mm256_cvtepi8_epi32(part) : _mm256_cvtepu8_epi32(part);
    v[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), scale, offset);
  }
}

template <int BITS, int R>
void woq_f32_tile(const float* x, int64_t m0, const QuantWeights& w, int64_t n, float* y, int64_t ldy) {
  const uint8_t* row = w.data + n * w.row_bytes();
  const int64_t K = w.K, per_group = w.group() / kBlock;
  __m256 acc[R], v[4];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const float s = scale_at(w, n * w.groups + g);
    const __m256 scale = _mm256_set1_ps(s), offset = _mm256_set1_ps(offset_at(w, n * w.groups + g, s));
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      dequant_block<BITS>(row, b, scale, offset, v);
      for (int i = 0; i < 4; ++i) {
        for (int r = 0; r < R; ++r) {
          acc[r] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + (m0 + r) * K + b * kBlock + 8 * i), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + n] = hsum(acc[r]);
}

template <int BITS>
void woq_f32_bits(const float* x, int64_t M, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    for_each_tile(M, [&]<int R>(int64_t m) { woq_f32_tile<BITS, R>(x, m, w, n, y, ldy); });
  }
}

template <int R>
void linear_f32_tile(const float* x, int64_t m0, int64_t K, const float* wrow, int64_t n, float* y, int64_t ldy) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(wrow + k), w1 = _mm256_loadu_ps(wrow + k + 8);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + (m0 + r) * K + k;
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float sum = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t t = k; t < K; ++t) sum += wrow[t] * x[(m0 + r) * K + t];
    y[(m0 + r) * ldy + n] = sum;
  }
}

inline float fmax_(float a, float b) { return a > b ? a : b; }  // no std:: template in an ISA file (isa.h)

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float block_absmax(const float* x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
  for (int i = 1; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * i)));
  return hmax(m);
}

}  // namespace

// The weight scale of every block of row n (groups expanded), in wsb[0 .. nb).
void block_scales_avx2(const QuantWeights& w, int64_t n, float* wsb) {
  const int64_t per_group = w.group() / kBlock, base = n * w.groups;
  if (per_group == 1 && w.scales_fp16) {  // groups of 32 (the int4 default): convert 8 at a time
    const uint16_t* src = static_cast<const uint16_t*>(w.scales) + base;
    int64_t g = 0;
    for (; g + 8 <= w.groups; g += 8) {
      _mm256_storeu_ps(wsb + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g))));
    }
    for (; g < w.groups; ++g) wsb[g] = _cvtsh_ss(src[g]);
    return;
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    const float s = scale_at(w, base + g);
    for (int64_t j = 0; j < per_group; ++j) wsb[g * per_group + j] = s;
  }
}

void combined_scales_avx2(const QuantActs& a, int64_t m0, int rows, const float* wsb, float* c) {
  const int64_t nb = a.K / kBlock;
  for (int r = 0; r < rows; ++r) {
    const float* sx = a.scale + (m0 + r) * nb;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
      _mm256_storeu_ps(c + r * nb + b, _mm256_mul_ps(_mm256_loadu_ps(sx + b), _mm256_loadu_ps(wsb + b)));
    }
    for (; b < nb; ++b) c[r * nb + b] = sx[b] * wsb[b];
  }
}

void add_offsets_avx2(const QuantActs& a, int64_t m0, int rows, const QuantWeights& w, int64_t n, const float* wsb,
                      float shift, float* ofs) {
  if (w.offsets == nullptr) {  // offset = -zero * scale: a dot product of block scales and block sums
    const int64_t nb = a.K / kBlock;
    for (int r = 0; r < rows; ++r) {
      const float* sum = a.sum + (m0 + r) * nb;
      __m256 acc = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(wsb + b), _mm256_loadu_ps(sum + b), acc);
      float dot = hsum(acc);
      for (; b < nb; ++b) dot += wsb[b] * sum[b];
      ofs[r] -= (w.zero + shift) * dot;
    }
    return;
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    const float s = scale_at(w, n * w.groups + g), o = w.offsets[n * w.groups + g] - shift * s;
    for (int r = 0; r < rows; ++r) ofs[r] += o * a.group_sum[(m0 + r) * w.groups + g];
  }
}

void quantize_acts_avx2(const float* x, int64_t M, int64_t K, bool per_row, int8_t* q, float* scale, float* sum) {
  const int64_t nb = K / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float row_max = 0.f;
    if (per_row) {
      for (int64_t b = 0; b < nb; ++b) row_max = fmax_(row_max, block_absmax(row + b * kBlock));
    }
    for (int64_t b = 0; b < nb; ++b) {
      const float* blk = row + b * kBlock;
      const float amax = per_row ? row_max : block_absmax(blk);
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      const __m256 inv = _mm256_set1_ps(1.f / s);
      __m256i v[4];  // round to nearest even, as the MXCSR default and std::nearbyint do
      for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(blk + 8 * i), inv));
      const __m256i total = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      // int32 -> int8 (values are within [-127, 127]); packs interleave 128-bit lanes, the permute restores order.
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * K + b * kBlock), ordered);
      scale[m * nb + b] = s;
      sum[m * nb + b] = s * static_cast<float>(_mm_cvtsi128_si32(t));
    }
  }
}

void qlinear_avx2(const QuantActs& acts, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                  float* scratch) {
  if (w.bits == 8) qlinear_bits<8>(acts, w, n0, n1, y, ldy, scratch);
  else qlinear_bits<4>(acts, w, n0, n1, y, ldy, scratch);
}

void woq_f32_avx2(const float* x, int64_t M, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (w.bits == 8) woq_f32_bits<8>(x, M, w, n0, n1, y, ldy);
  else woq_f32_bits<4>(x, M, w, n0, n1, y, ldy);
}

void dequantize_avx2(const QuantWeights& w, int64_t n0, int64_t n1, float* out) {
  const int64_t per_group = w.group() / kBlock;
  __m256 v[4];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + n * w.row_bytes();
    for (int64_t g = 0; g < w.groups; ++g) {
      const float s = scale_at(w, n * w.groups + g);
      const __m256 scale = _mm256_set1_ps(s), offset = _mm256_set1_ps(offset_at(w, n * w.groups + g, s));
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        if (w.bits == 8) dequant_block<8>(row, b, scale, offset, v);
        else dequant_block<4>(row, b, scale, offset, v);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + n * w.K + b * kBlock + 8 * i, v[i]);
      }
    }
  }
}

void linear_f32_avx2(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    for_each_tile(M, [&]<int R>(int64_t m) { linear_f32_tile<R>(x, m, K, w + n * K, n, y, ldy); });
  }
}

}  // namespace cpu_llm

#pragma GCC pop_options
