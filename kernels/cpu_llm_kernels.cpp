// Quantized linear kernels for small-batch decode on x86 CPUs with AVX2 + FMA.
//
// Why this exists: on AVX2 hosts PyTorch's own weight-only int8 kernels
// (_weight_int8pack_mm, torchao, inductor dequant+matmul) read weights at ~1.3 GB/s, slower
// than fp32. Decode at batch <= 8 is a matrix-vector product bounded by how fast weights
// stream from memory, so these kernels read int8/int4 weights once per call, dequantize them
// in registers and feed up to 4 rows of activations per weight load.
//
// Layouts (the Python side, cpu_llm/quantlib.py, produces them):
//   int8 weights: int8  [N, K]
//   int4 weights: uint8 [N, K/2]; in each block of 32 values, byte j holds value j in its
//                 low nibble and value j+16 in its high nibble (unsigned 0..15).
//   scales, offsets: fp32 [N, K/group]; weight = q * scale + offset (offset = -zero*scale).
// Each output row is accumulated in the same order whatever the batch size, so a row's
// result does not depend on its batch companions.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kTile = 8;  // activation rows sharing one pass over the weights

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Dequantize 32 weights starting at column k into w[0..3] (8 floats each).
template <int BITS>
inline void load32(const uint8_t* row, int64_t k, __m256 scale, __m256 offset, __m256 w[4]) {
  if constexpr (BITS == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(row) + k;
    for (int i = 0; i < 4; ++i) {
      __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i)));
      w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), scale, offset);
    }
  } else {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i) {
      w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), scale, offset);
    }
  }
}

// out[r] = dot(x[r], dequantized weight row) for R activation rows.
template <int BITS, int R>
inline void woq_dot(const float* x, int64_t ldx, const uint8_t* row, const float* scales,
                    const float* offsets, int64_t K, int64_t group, float* out, int64_t ldo) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256 w[4];
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += group, ++gi) {
    const __m256 scale = _mm256_set1_ps(scales[gi]), offset = _mm256_set1_ps(offsets[gi]);
    for (int64_t k = g0; k < g0 + group; k += 32) {
      load32<BITS>(row, k, scale, offset, w);
      for (int i = 0; i < 4; ++i) {
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + r * ldx + k + 8 * i), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]);
}

template <int BITS>
void woq_rows(const float* x, int64_t ldx, int rows, const uint8_t* row, const float* scales,
              const float* offsets, int64_t K, int64_t group, float* out, int64_t ldo) {
  switch (rows) {
    case 8: woq_dot<BITS, 8>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
    case 7: woq_dot<BITS, 7>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
    case 6: woq_dot<BITS, 6>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
    case 5: woq_dot<BITS, 5>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
    case 4: woq_dot<BITS, 4>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
    case 3: woq_dot<BITS, 3>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
    case 2: woq_dot<BITS, 2>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
    default: woq_dot<BITS, 1>(x, ldx, row, scales, offsets, K, group, out, ldo); break;
  }
}

void check_weights(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                   const torch::Tensor& offsets, int64_t bits, int64_t K) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(qweight.is_contiguous() && qweight.size(1) * (bits == 4 ? 2 : 1) == K, "qweight shape");
  TORCH_CHECK(scales.is_contiguous() && offsets.is_contiguous() && scales.sizes() == offsets.sizes() &&
                  scales.size(0) == qweight.size(0) && K % scales.size(1) == 0 && (K / scales.size(1)) % 32 == 0,
              "scales/offsets must be float32 [N, groups] with groups of a multiple of 32 columns");
}

}  // namespace

// y = x @ dequant(W).T + bias, x fp32 [M, K].
torch::Tensor woq_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor offsets,
                         int64_t bits, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1);
  check_weights(x, qweight, scales, offsets, bits, K);
  auto y = torch::empty({M, N}, x.options());
  const int64_t groups = scales.size(1), group = K / groups, row_bytes = qweight.size(1);
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const float *sp = scales.data_ptr<float>(), *op = offsets.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; m += kTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kTile, M - m));
        auto fn = bits == 8 ? woq_rows<8> : woq_rows<4>;
        fn(xp + m * K, K, rows, wp + n * row_bytes, sp + n * groups, op + n * groups, K, group, yp + m * N + n, N);
      }
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

// The fp32 weight the quantized one stands for (large-batch prefill uses it with a float GEMM).
// `out`, when given, is reused storage: a fresh 1-100 MB buffer per call costs more in page
// faults than the dequantization itself.
torch::Tensor dequantize_weight(torch::Tensor qweight, torch::Tensor scales, torch::Tensor offsets, int64_t bits,
                                c10::optional<torch::Tensor> out) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * (bits == 4 ? 2 : 1);
  check_weights(torch::empty({0, K}), qweight, scales, offsets, bits, K);
  torch::Tensor w;
  if (out.has_value() && out->defined()) {
    TORCH_CHECK(out->scalar_type() == torch::kFloat && out->is_contiguous() && out->numel() == N * K,
                "out must be a contiguous float32 tensor of N * K elements");
    w = out->view({N, K});
  } else {
    w = torch::empty({N, K}, scales.options());
  }
  const int64_t groups = scales.size(1), group = K / groups, row_bytes = qweight.size(1);
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const float *sp = scales.data_ptr<float>(), *op = offsets.data_ptr<float>();
  float* dst = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    __m256 v[4];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < K; k += 32) {
        const int64_t gi = n * groups + k / group;
        const __m256 scale = _mm256_set1_ps(sp[gi]), offset = _mm256_set1_ps(op[gi]);
        if (bits == 8) load32<8>(wp + n * row_bytes, k, scale, offset, v);
        else load32<4>(wp + n * row_bytes, k, scale, offset, v);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + n * K + k + 8 * i, v[i]);
      }
    }
  });
  return w;
}

// Per-row symmetric int8 quantization of activations: returns (int8 [M, K], scale [M]).
std::tuple<torch::Tensor, torch::Tensor> quantize_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto s = torch::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float scale = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / scale;
      sp[m] = scale;
      for (int64_t k = 0; k < K; ++k) qp[m * K + k] = static_cast<int8_t>(std::nearbyint(row[k] * inv));
    }
  });
  return {q, s};
}

namespace {

template <int R>
inline void w8a8_dot(const int8_t* xq, int64_t K, const int8_t* w, int32_t* out, int64_t ldo) {
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < K; k += 32) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    for (int r = 0; r < R; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + k));
      // |x| (unsigned) times sign-adjusted w: both |values| <= 127, so pairs never saturate.
      const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(prod, ones));
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum_epi32(acc[r]);
}

}  // namespace

// SmoothQuant's W8A8 linear: activations quantized per row (so rows stay independent),
// weights per output channel, both symmetric int8 in [-127, 127]; int32 accumulation.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor wscale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(qweight.scalar_type() == torch::kChar && qweight.is_contiguous() && qweight.size(1) == x.size(1),
              "qweight must be int8 [N, K]");
  TORCH_CHECK(x.size(1) % 32 == 0, "K must be a multiple of 32");
  auto [xq, xs] = quantize_rows(x);
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1);
  auto acc = torch::empty({M, N}, x.options().dtype(torch::kInt));
  const int8_t *xp = xq.data_ptr<int8_t>(), *wp = qweight.data_ptr<int8_t>();
  int32_t* ap = acc.data_ptr<int32_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; m += kTile) {
        const int64_t rows = std::min<int64_t>(kTile, M - m);
        const int8_t* xr = xp + m * K;
        int32_t* o = ap + m * N + n;
        switch (rows) {
          case 8: w8a8_dot<8>(xr, K, wp + n * K, o, N); break;
          case 7: w8a8_dot<7>(xr, K, wp + n * K, o, N); break;
          case 6: w8a8_dot<6>(xr, K, wp + n * K, o, N); break;
          case 5: w8a8_dot<5>(xr, K, wp + n * K, o, N); break;
          case 4: w8a8_dot<4>(xr, K, wp + n * K, o, N); break;
          case 3: w8a8_dot<3>(xr, K, wp + n * K, o, N); break;
          case 2: w8a8_dot<2>(xr, K, wp + n * K, o, N); break;
          default: w8a8_dot<1>(xr, K, wp + n * K, o, N); break;
        }
      }
    }
  });
  auto y = acc.to(torch::kFloat).mul_(xs.unsqueeze(1)).mul_(wscale.unsqueeze(0));
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("woq_linear", &woq_linear, "x @ dequant(int8/int4 W).T + bias");
  m.def("dequantize_weight", &dequantize_weight, "int8/int4 weight to float32");
  m.def("quantize_rows", &quantize_rows, "per-row symmetric int8 quantization");
  m.def("w8a8_linear", &w8a8_linear, "int8 activations x int8 weights, per-row/per-channel scales");
}
