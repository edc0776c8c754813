// AVX-512 VNNI kernel for symmetric weights in the tiled layout (TiledWeights in isa.h).
//
// Why tiles: with weights stored row after row, each output row needs its own int32 -> float
// conversion and scale multiply per block and a horizontal sum at the end, about four
// instructions per 64 weight bytes besides the dot product itself, which on a 2-core host keeps
// decode below the memory bandwidth. With 16 rows interleaved 4 bytes at a time, one dpbusd
// covers 16 rows x 4 columns against a 4-byte activation broadcast (folded into the
// instruction as a memory operand), and the scale work is one conversion and one FMA per block
// for all 16 rows. The stored weights are unsigned (w + zero_u), so the zero point comes out in
// integers through the accumulator's start value, block_corr = -zero_u x sum(block activations).
#include <immintrin.h>

#include <cstring>

#include "../../isa.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

namespace cpu_llm {
namespace {

#include "../tiles.h"

// The 16 rows' scales of group g of tile t.
inline __m512 tile_scales(const TiledWeights& w, int64_t t, int64_t g) {
  const int64_t at = (t * w.groups + g) * 16;
  if (w.scales_fp16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w.scales) + at)));
  }
  return _mm512_loadu_ps(static_cast<const float*>(w.scales) + at);
}

// 4 activation bytes in every lane.
inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Tile t (16 weight rows) x R activation rows from m0. Two accumulators per row halve the
// dependency chain of the dot products (8 per block).
template <int BITS, int R, bool GROUPED>
void tiled_tile(const QuantActs& a, const int32_t* corr, const TiledWeights& w, int64_t t, int64_t m0, float* y,
                int64_t ldy) {
  const int64_t nb = a.K / kBlock, per_group = nb / w.groups, step = w.block_bytes();
  const uint8_t* tile = w.data + t * w.tile_bytes();
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  __m512 ws = _mm512_set1_ps(1.f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = tile + b * step;
    __m512i i0[R], i1[R];
    const int8_t* xb[R];
    for (int r = 0; r < R; ++r) {
      i0[r] = _mm512_set1_epi32(corr[(m0 + r) * nb + b]);
      i1[r] = _mm512_setzero_si512();
      xb[r] = a.q + ((m0 + r) * nb + b) * kBlock;
    }
    if constexpr (BITS == 8) {
      for (int j = 0; j < 8; j += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(wb) + 64 * j + kPrefetch, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wb) + 64 * j + 64 + kPrefetch, _MM_HINT_T0);
        const __m512i u0 = _mm512_loadu_si512(wb + 64 * j), u1 = _mm512_loadu_si512(wb + 64 * j + 64);
        for (int r = 0; r < R; ++r) {
          i0[r] = _mm512_dpbusd_epi32(i0[r], u0, broadcast4(xb[r] + 4 * j));
          i1[r] = _mm512_dpbusd_epi32(i1[r], u1, broadcast4(xb[r] + 4 * j + 4));
        }
      }
    } else {
      const __m512i low = _mm512_set1_epi8(0x0F);
      for (int j = 0; j < 4; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(wb) + 64 * j + kPrefetch, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wb + 64 * j);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          i0[r] = _mm512_dpbusd_epi32(i0[r], lo, broadcast4(xb[r] + 4 * j));
          i1[r] = _mm512_dpbusd_epi32(i1[r], hi, broadcast4(xb[r] + 16 + 4 * j));
        }
      }
    }
    if constexpr (GROUPED) {
      if (b % per_group == 0) ws = tile_scales(w, t, b / per_group);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(a.scale[(m0 + r) * nb + b]);
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(i0[r], i1[r]));
      acc[r] = _mm512_fmadd_ps(dot, GROUPED ? _mm512_mul_ps(xs, ws) : xs, acc[r]);
    }
  }
  const int64_t n0 = t * 16, rows = w.N - n0 < 16 ? w.N - n0 : 16;
  const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
  const __m512 row_scales = GROUPED ? _mm512_set1_ps(1.f) : tile_scales(w, t, 0);
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + (m0 + r) * ldy + n0, mask, GROUPED ? acc[r] : _mm512_mul_ps(acc[r], row_scales));
  }
}

template <int BITS, bool GROUPED>
void tiled_range(const QuantActs& a, const int32_t* corr, const TiledWeights& w, int64_t t0, int64_t t1, float* y,
                 int64_t ldy) {
  for (int64_t t = t0; t < t1; ++t) {
    for_each_tile(a.M, [&]<int R>(int64_t m) { tiled_tile<BITS, R, GROUPED>(a, corr, w, t, m, y, ldy); });
  }
}

}  // namespace

void qlinear_tiled_avx512(const QuantActs& acts, const int32_t* block_corr, const TiledWeights& w, int64_t t0,
                          int64_t t1, float* y, int64_t ldy) {
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
