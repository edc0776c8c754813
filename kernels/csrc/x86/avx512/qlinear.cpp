// AVX-512 kernels: VNNI integer dot products (Ice Lake / Zen 4 and later) and the fp32
// matrix-vector product. Compiled for that target only here (see isa.h).
//
// _mm512_dpbusd_epi32 multiplies unsigned by signed bytes and adds groups of four into int32
// without saturation. int4 nibbles are unsigned already; int8 weights w are made unsigned as
// w + 128 (a XOR with 0x80), which adds 128 * sum(x) to each block's dot product: that term is
// taken back through the block sums of the activations, as part of the weight offset
// (offset - 128 * scale). Two blocks of 32 are processed per 512-bit instruction; the scales
// of both come from one 8-byte load of the combined scales (c) and a lane permute.
#include <immintrin.h>

#include "../../isa.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

namespace cpu_llm {
namespace {

#include "../tiles.h"

// Blocks b and b + 1 as 64 unsigned bytes.
template <int BITS>
inline __m512i load_pair(const uint8_t* row, int64_t b) {
  if constexpr (BITS == 8) {
    const __m512i v = _mm512_loadu_si512(row + b * kBlock);
    return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock / 2));
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    both = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));      // [lo b, lo b+1, hi b, hi b+1]
    return _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));  // [lo b, hi b, lo b+1, hi b+1]
  }
}

// Block b alone (the last one when the row has an odd number of blocks) as 32 unsigned bytes.
template <int BITS>
inline __m256i load_one(const uint8_t* row, int64_t b) {
  if constexpr (BITS == 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
    return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
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
  combined_scales_avx2(a, m0, R, wsb, c);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R];
  float ofs[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), ofs[r] = 0.f;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    // Weights are read once: ask for them kPrefetch bytes ahead (the next rows are contiguous).
    _mm_prefetch(reinterpret_cast<const char*>(row) + b * kBlock * BITS / 8 + kPrefetch, _MM_HINT_T0);
    const __m512i u = load_pair<BITS>(row, b);
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_loadu_si512(a.q + ((m0 + r) * nb + b) * kBlock);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
      // [c_b x 8, c_b+1 x 8] from the two combined scales
      const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(c + r * nb + b)));
      const __m512 scale = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(pair));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
    }
  }
  if (b < nb) {
    const __m256i u = load_one<BITS>(row, b);
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + ((m0 + r) * nb + b) * kBlock));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xv));
      acc[r] = _mm512_fmadd_ps(_mm512_zextps256_ps512(dot), _mm512_set1_ps(c[r * nb + b]), acc[r]);
    }
  }
  // int8 weights were read as w + 128: take 128 x scale x the activation sums back with the offsets.
  add_offsets_avx2(a, m0, R, w, n, wsb, BITS == 8 ? 128.f : 0.f, ofs);
  for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + n] = _mm512_reduce_add_ps(acc[r]) + ofs[r];
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

constexpr int64_t kNearGroup = 4096;  // bytes of a group of rows counted as "short rows"

// The last block of a row with an odd number of blocks, as a pair whose second block is zero.
template <int BITS>
inline __m512i load_tail(const uint8_t* row, int64_t b) {
  if constexpr (BITS == 8) {
    const __m512i v = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, row + b * kBlock);
    return _mm512_mask_xor_epi32(v, 0x00FF, v, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m256i v = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock / 2)));
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    both = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
    return _mm512_shuffle_i64x2(both, both, _MM_SHUFFLE(3, 1, 2, 0));
  }
}

inline float scale_of(const QuantWeights& w, int64_t i) {
  if (w.scales_fp16) return _cvtsh_ss(static_cast<const uint16_t*>(w.scales)[i]);
  return static_cast<const float*>(w.scales)[i];
}

// [scale of block b x 8, of block b + 1 x 8] of row n (grouped weights).
inline __m512 pair_scales(const QuantWeights& w, int64_t n, int64_t b) {
  const int64_t per_group = w.group() / kBlock, at = n * w.groups + b / per_group;
  if (per_group > 1) return _mm512_set1_ps(scale_of(w, at));  // b and b + 1 share a group
  if (b + 1 == w.groups) return _mm512_insertf32x8(_mm512_set1_ps(scale_of(w, at)), _mm256_setzero_ps(), 1);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m128 two = w.scales_fp16
      ? _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(static_cast<const uint16_t*>(w.scales) + at)))
      : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(static_cast<const float*>(w.scales) + at)));
  return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two));
}

// NR weight rows from n x R activation rows from m0.
template <int BITS, int NR, int R, bool GROUPED>
void sym_tile(const QuantActs& a, const PairActs& p, const QuantWeights& w, int64_t n, int64_t m0, float* y,
              int64_t ldy) {
  const int64_t nb = a.K / kBlock, full = nb / 2, bytes = kBlock * BITS / 8;
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = w.data + (n + j) * w.row_bytes();
  // Short rows: prefetch the same place two groups of rows ahead (where the streams jump next, which
  // the hardware prefetcher does not foresee; measured best of 0-2 groups on SmolLM2's 576-wide
  // layers); long rows: kPrefetch bytes ahead in this row.
  const int64_t ahead = NR * w.row_bytes() <= kNearGroup ? 2 * NR * w.row_bytes() : kPrefetch;
  __m512 acc[R][NR];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  auto pair = [&](int64_t q, bool tail) {
    const int64_t b = 2 * q;
    __m512i u[NR];
    __m512 ws[NR];
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[j]) + b * bytes + ahead, _MM_HINT_T0);
      u[j] = tail ? load_tail<BITS>(rows[j], b) : load_pair<BITS>(rows[j], b);
      if constexpr (GROUPED) ws[j] = pair_scales(w, n + j, b);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.q + ((m0 + r) * nb + b) * kBlock;
      const __m512i xv = tail ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, xq) : _mm512_loadu_si512(xq);
      const int64_t at = ((m0 + r) * p.pairs + q) * 16;
      const __m512i nc = _mm512_loadu_si512(p.neg_corr + at);
      const __m512 sv = _mm512_loadu_ps(p.scale + at);
      for (int j = 0; j < NR; ++j) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc, u[j], xv));
        acc[r][j] = _mm512_fmadd_ps(dot, GROUPED ? _mm512_mul_ps(sv, ws[j]) : sv, acc[r][j]);
      }
    }
  };
  for (int64_t q = 0; q < full; ++q) pair(q, false);
  if (full < p.pairs) pair(full, true);
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NR; ++j) {
      const float sum = _mm512_reduce_add_ps(acc[r][j]);
      y[(m0 + r) * ldy + n + j] = GROUPED ? sum : sum * scale_of(w, n + j);
    }
  }
}

template <int BITS, bool GROUPED>
void qlinear_sym(const QuantActs& a, const PairActs& p, const QuantWeights& w, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    for_each_tile(a.M, [&]<int R>(int64_t m) { sym_tile<BITS, 4, R, GROUPED>(a, p, w, n, m, y, ldy); });
  }
  for (; n < n1; ++n) {
    for_each_tile(a.M, [&]<int R>(int64_t m) { sym_tile<BITS, 1, R, GROUPED>(a, p, w, n, m, y, ldy); });
  }
}

template <int R>
void linear_f32_tile(const float* x, int64_t m0, int64_t K, const float* wrow, int64_t n, float* y, int64_t ldy) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_loadu_ps(wrow + k), w1 = _mm512_loadu_ps(wrow + k + 16);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + (m0 + r) * K + k;
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][1]);
    }
  }
  for (; k < K; k += 16) {  // the last 1..31 columns, masked
    const __mmask16 mask = static_cast<__mmask16>(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1);
    const __m512 w0 = _mm512_maskz_loadu_ps(mask, wrow + k);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x + (m0 + r) * K + k), acc[r][0]);
    }
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

}  // namespace

void qlinear_avx512(const QuantActs& acts, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                    float* scratch) {
  if (w.bits == 8) qlinear_bits<8>(acts, w, n0, n1, y, ldy, scratch);
  else qlinear_bits<4>(acts, w, n0, n1, y, ldy, scratch);
}

void prepare_pairs_avx512(const QuantActs& a, int zero_u, int32_t* neg_corr, float* scale) {
  const int64_t nb = a.K / kBlock, pairs = (nb + 1) / 2;
  const __m512i zeros = _mm512_set1_epi8(static_cast<char>(zero_u));
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t q = 0; q < pairs; ++q) {
      const int64_t b = 2 * q;
      const bool tail = b + 1 == nb;
      const int8_t* xq = a.q + (m * nb + b) * kBlock;
      const __m512i xv = tail ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, xq) : _mm512_loadu_si512(xq);
      const __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), zeros, xv);
      _mm512_storeu_si512(neg_corr + (m * pairs + q) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), corr));
      const float* sx = a.scale + m * nb + b;
      const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(sx[0]), _mm256_set1_ps(tail ? 0.f : sx[1]), 1);
      _mm512_storeu_ps(scale + (m * pairs + q) * 16, sv);
    }
  }
}

void qlinear_sym_avx512(const QuantActs& acts, const PairActs& pairs, const QuantWeights& w, int64_t n0, int64_t n1,
                        float* y, int64_t ldy) {
  const bool grouped = w.groups > 1;
  if (w.bits == 8) {
    if (grouped) qlinear_sym<8, true>(acts, pairs, w, n0, n1, y, ldy);
    else qlinear_sym<8, false>(acts, pairs, w, n0, n1, y, ldy);
  } else {
    if (grouped) qlinear_sym<4, true>(acts, pairs, w, n0, n1, y, ldy);
    else qlinear_sym<4, false>(acts, pairs, w, n0, n1, y, ldy);
  }
}

void linear_f32_avx512(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                       int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    for_each_tile(M, [&]<int R>(int64_t m) { linear_f32_tile<R>(x, m, K, w + n * K, n, y, ldy); });
  }
}

}  // namespace cpu_llm

#pragma GCC pop_options
