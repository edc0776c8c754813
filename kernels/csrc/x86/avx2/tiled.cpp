// AVX2 kernel for symmetric weights in the tiled layout (TiledWeights in isa.h): the same tiles
// the AVX-512 VNNI kernel reads, so a model is tiled at load whatever the ISA.
//
// Why tiles on AVX2 too: in the row layout each output row pays a conversion, a scale multiply
// and a horizontal sum per block, and int4 pays a shift, two masks and a lane insert per row and
// block (measured on AVX2 hosts: int4 decoded no faster than int8, and 8 rows at once only ~2x one
// row). Here one 256-bit register holds 8 rows x 4 columns, so one 4-byte activation broadcast
// meets 8 rows; the unpacking and the scale work are done once per 8 rows, and once per tile of
// activation rows (up to kMaxTile) instead of once per activation row.
//
// A 16-row tile is two halves of 8 rows (bytes 0-31 and 32-63 of every 64-byte group); each half
// is one pass, the second reading the tile from cache, so that kMaxTile rows' accumulators fit
// in 16 registers.
//   int8: stored unsigned (w + 128). _mm256_maddubs_epi16 multiplies unsigned by signed bytes and
//         saturates pairs above 32767, so the sign moves to the activations: |w| x sign(x, w),
//         |w| <= 128, |x| <= 127, a pair <= 32512. No zero-point correction is needed.
//   int4: stored unsigned (w + 8, 0..15): a pair is <= 2 x 15 x 127, so the 8 products of a block
//         add up in int16 (<= 30480) before one widening; the zero point comes out through the
//         accumulator's start value, block_corr = -8 x sum(block activations).
// Each row's sums are formed in the same order whatever the number of activation rows, so a row's
// result never depends on its batch companions.
#include <immintrin.h>

#include <cstring>

#include "../../isa.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace cpu_llm {
namespace {

#include "../tiles.h"

// The 8 rows' scales of group g of tile t, half h.
inline __m256 half_scales(const TiledWeights& w, int64_t t, int64_t g, int h) {
  const int64_t at = (t * w.groups + g) * 16 + 8 * h;
  if (w.scales_fp16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w.scales) + at)));
  }
  return _mm256_loadu_ps(static_cast<const float*>(w.scales) + at);
}

// 4 activation bytes in every 32-bit lane.
inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The int32 dot products of block b for 8 weight rows (half h of the tile) and R activation rows.
template <int BITS, int R>
inline void block_dots(const uint8_t* wb, const int8_t* const* xb, bool prefetch, __m256i* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int j = 0; j < 8; ++j) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wb) + 64 * j + kPrefetch, _MM_HINT_T0);
      const __m256i s = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j)), flip);
      const __m256i u = _mm256_abs_epi8(s);
      for (int r = 0; r < R; ++r) {
        const __m256i p = _mm256_maddubs_epi16(u, _mm256_sign_epi8(broadcast4(xb[r] + 4 * j), s));
        dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(p, ones));
      }
    }
  } else {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i sums[R];
    for (int j = 0; j < 4; ++j) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wb) + 64 * j + kPrefetch, _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int r = 0; r < R; ++r) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(xb[r] + 4 * j)),
                                           _mm256_maddubs_epi16(hi, broadcast4(xb[r] + 16 + 4 * j)));
        sums[r] = j == 0 ? p : _mm256_add_epi16(sums[r], p);
      }
    }
    for (int r = 0; r < R; ++r) dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(sums[r], ones));
  }
}

// Half h (8 weight rows) of tile t x R activation rows from m0.
template <int BITS, int R, bool GROUPED>
void tiled_half(const QuantActs& a, const int32_t* corr, const TiledWeights& w, int64_t t, int h, int64_t m0,
                float* y, int64_t ldy) {
  const int64_t nb = a.K / kBlock, per_group = nb / w.groups, step = w.block_bytes();
  const uint8_t* half = w.data + t * w.tile_bytes() + 32 * h;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256 ws = _mm256_set1_ps(1.f);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i dots[R];
    const int8_t* xb[R];
    for (int r = 0; r < R; ++r) {
      dots[r] = BITS == 8 ? _mm256_setzero_si256() : _mm256_set1_epi32(corr[(m0 + r) * nb + b]);
      xb[r] = a.q + ((m0 + r) * nb + b) * kBlock;
    }
    block_dots<BITS, R>(half + b * step, xb, h == 0, dots);  // the second half reads cached lines
    if constexpr (GROUPED) {
      if (b % per_group == 0) ws = half_scales(w, t, b / per_group, h);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 xs = _mm256_set1_ps(a.scale[(m0 + r) * nb + b]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), GROUPED ? _mm256_mul_ps(xs, ws) : xs, acc[r]);
    }
  }
  const int64_t n0 = t * 16 + 8 * h, rows = w.N - n0 < 8 ? w.N - n0 : 8;
  const __m256 row_scales = GROUPED ? _mm256_set1_ps(1.f) : half_scales(w, t, 0, h);
  for (int r = 0; r < R; ++r) {
    const __m256 out = _mm256_mul_ps(acc[r], row_scales);
    float* dst = y + (m0 + r) * ldy + n0;
    if (rows == 8) {
      _mm256_storeu_ps(dst, out);
    } else {
      float part[8];
      _mm256_storeu_ps(part, out);
      for (int64_t i = 0; i < rows; ++i) dst[i] = part[i];
    }
  }
}

template <int BITS, bool GROUPED>
void tiled_range(const QuantActs& a, const int32_t* corr, const TiledWeights& w, int64_t t0, int64_t t1, float* y,
                 int64_t ldy) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2 && t * 16 + 8 * h < w.N; ++h) {
      for_each_tile(a.M, [&]<int R>(int64_t m) { tiled_half<BITS, R, GROUPED>(a, corr, w, t, h, m, y, ldy); });
    }
  }
}

}  // namespace

void qlinear_tiled_avx2(const QuantActs& acts, const int32_t* block_corr, const TiledWeights& w, int64_t t0, int64_t t1,
                        float* y, int64_t ldy) {
  const bool grouped = w.groups > 1;
  if (w.bits == 8) {
    if (grouped) tiled_range<8, true>(acts, block_corr, w, t0, t1, y, ldy);
    else tiled_range<8, false>(acts, block_corr, w, t0, t1, y, ldy);
  } else {
    if (grouped) tiled_range<4, true>(acts, block_corr, w, t0, t1, y, ldy);
    else tiled_range<4, false>(acts, block_corr, w, t0, t1, y, ldy);
  }
}

}  // namespace cpu_llm

#pragma GCC pop_options
