// The linear ops of cpu_llm_kernels (namespace torch.ops.cpu_llm): shape checks with clear
// errors, output channels split between threads, the kernels of the active table (dispatch.cpp).
//
//   qlinear(x, qweight, scales, offsets, bits, zero, act_per_row, bias)
//       int8/int4 weights x activations quantized to int8 on the fly (per block of 32, or per
//       row for SmoothQuant's W8A8): integer dot products, fp32 result.
//   qlinear_tiled(x, tiles, scales, bits, n, act_per_row, bias)
//       the same for symmetric weights tiled 16 rows at a time (formats/tiling.py, isa.h): the
//       decode and prefill path of every symmetric integer mode.
//   woq_linear_f32(x, qweight, scales, offsets, bits, zero, bias)
//       the same weights dequantized in registers, fp32 activations and accumulation.
//   dequantize_into(qweight, scales, offsets, bits, zero, out)
//       the fp32 weight, for the float GEMM of long prefills.
//   linear_f32(x, weight, bias), linear_f32_cat(x, weights, bias)
//       fp32 matrix-vector products, for hosts whose BLAS is slow at decode shapes; _cat writes
//       the products with several weights side by side (x @ cat(weights).T) in one call.
//
// This file is compiled for baseline x86-64; AVX2 and AVX-512 code lives in x86/avx2/ and
// x86/avx512/, compiled with their own target attributes, and is only reached through the table
// of a CPU that reports those features, so one build runs on every x86-64 host.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "isa.h"
#include "ops.h"
#include "parallel.h"

namespace cpu_llm {
namespace {

constexpr int64_t kGrain = 16;  // output channels per task: enough work per thread, balanced on 2-16 cores

void check_x(const torch::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous float32 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " columns but the weight has K = ", K);
}

QuantWeights weights(const torch::Tensor& qweight, const torch::Tensor& scales, const c10::optional<torch::Tensor>& offsets,
                     int64_t bits, double zero, const char* op) {
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  const auto want = bits == 8 ? torch::kChar : torch::kByte;
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == want && qweight.is_contiguous(), op, ": qweight must be a "
              "contiguous ", bits == 8 ? "int8 [N, K]" : "uint8 [N, K/2]", " tensor, got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t K = qweight.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(K % kBlock == 0, op, ": K must be a multiple of ", kBlock, ", got ", K);
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.size(0) == qweight.size(0) &&
                  (scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kHalf),
              op, ": scales must be a contiguous float32 or float16 [N, groups] tensor with N = ", qweight.size(0),
              ", got ", scales.scalar_type(), " ", scales.sizes());
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % kBlock == 0, op, ": ", groups, " groups do not split K = ", K,
              " into groups of a multiple of ", kBlock, " columns");
  const float* off = nullptr;
  if (offsets.has_value() && offsets->defined()) {
    TORCH_CHECK(offsets->scalar_type() == torch::kFloat && offsets->is_contiguous() && offsets->sizes() == scales.sizes(),
                op, ": offsets must be a contiguous float32 tensor shaped like scales ", scales.sizes(), ", got ",
                offsets->scalar_type(), " ", offsets->sizes());
    off = offsets->data_ptr<float>();
  }
  return QuantWeights{reinterpret_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr(),
                      scales.scalar_type() == torch::kHalf, off, static_cast<float>(zero), static_cast<int>(bits),
                      groups, K};
}

}  // namespace

torch::Tensor output(const torch::Tensor& out, int64_t rows, int64_t cols, const torch::Tensor& like, const char* op) {
  if (!out.defined()) return torch::empty({rows, cols}, like.options());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == cols && out.scalar_type() == torch::kFloat &&
                  out.is_contiguous(),
              op, ": out must be a contiguous float32 [", rows, ", ", cols, "] tensor, got ", out.scalar_type(), " ",
              out.sizes());
  return out;
}

namespace {

torch::Tensor finish(torch::Tensor y, const c10::optional<torch::Tensor>& bias, const char* op) {
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == y.size(1), op, ": bias must have ", y.size(1), " values, got ",
                bias->sizes());
    y.add_(*bias);
  }
  return y;
}

// x quantized to int8 per block of kBlock (or per row), in this thread's buffers (valid until
// its next call). Plain buffers, not tensors: a decode step makes ~200 of these calls and a
// tensor allocation plus an op dispatch each cost microseconds.
QuantActs quantize_acts(const KernelTable& k, const torch::Tensor& x, int64_t K, int64_t groups, bool act_per_row) {
  const int64_t M = x.size(0), nb = K / kBlock, per_group = nb / groups;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs, xsum, gsum;
  xq.resize(M * K), xs.resize(M * nb), xsum.resize(M * nb), gsum.assign(M * groups, 0.f);
  k.quantize_acts(x.data_ptr<float>(), M, K, act_per_row, xq.data(), xs.data(), xsum.data());
  for (int64_t i = 0; i < M * nb; ++i) gsum[i / per_group] += xsum[i];  // per weight group, for the offsets
  return QuantActs{xq.data(), xs.data(), xsum.data(), gsum.data(), M, K};
}

}  // namespace

// The ops below are also called directly by the decoder stack (decoder.cpp, ops.h).
torch::Tensor qlinear_out(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                          c10::optional<torch::Tensor> offsets, int64_t bits, double zero, bool act_per_row,
                          c10::optional<torch::Tensor> bias, torch::Tensor out) {
  const QuantWeights w = weights(qweight, scales, offsets, bits, zero, "qlinear");
  check_x(x, w.K, "qlinear");
  const KernelTable& k = require_kernels("qlinear");
  const int64_t M = x.size(0), N = qweight.size(0), nb = w.K / kBlock;
  const QuantActs acts = quantize_acts(k, x, w.K, w.groups, act_per_row);
  auto y = output(out, M, N, x, "qlinear");
  float* yp = y.data_ptr<float>();
  // Symmetric weights, where the table has it: the zero point is taken out in integers (PairActs).
  const float zero_f = w.zero + (bits == 8 ? 128.f : 0.f);  // int8 weights are read as w + 128
  const int zero_u = static_cast<int>(zero_f);
  if (k.qlinear_sym != nullptr && w.offsets == nullptr && zero_f == static_cast<float>(zero_u) && zero_u >= 0 && zero_u <= 255) {
    const int64_t pairs = (nb + 1) / 2;
    thread_local std::vector<int32_t> neg_corr;
    thread_local std::vector<float> pair_scale;
    neg_corr.resize(M * pairs * 16), pair_scale.resize(M * pairs * 16);
    k.prepare_pairs(acts, zero_u, neg_corr.data(), pair_scale.data());
    const PairActs prepared{neg_corr.data(), pair_scale.data(), pairs};
    parallel_chunks(N, kGrain, [&](int64_t n0, int64_t n1) { k.qlinear_sym(acts, prepared, w, n0, n1, yp, N); });
    return finish(y, bias, "qlinear");
  }
  parallel_chunks(N, kGrain, [&](int64_t n0, int64_t n1) {
    thread_local std::vector<float> scratch;  // this thread's block scales
    scratch.resize((1 + kMaxTile) * nb);
    k.qlinear(acts, w, n0, n1, yp, N, scratch.data());
  });
  return finish(y, bias, "qlinear");
}

// qlinear for a symmetric weight tiled by formats/tiling.py: tiles uint8 [ceil(N / 16), K x 16 or
// K x 8 (4 bits)], scales float32/float16 [ceil(N / 16), groups, 16].
torch::Tensor qlinear_tiled_out(torch::Tensor x, torch::Tensor tiles, torch::Tensor scales, int64_t bits, int64_t N,
                                bool act_per_row, c10::optional<torch::Tensor> bias, torch::Tensor out) {
  TORCH_CHECK(bits == 8 || bits == 4, "qlinear_tiled: bits must be 8 or 4, got ", bits);
  const int64_t T = (N + 15) / 16;
  TORCH_CHECK(N > 0 && tiles.dim() == 2 && tiles.scalar_type() == torch::kByte && tiles.is_contiguous() &&
                  tiles.size(0) == T && tiles.size(1) % (bits == 8 ? 16 * kBlock : 8 * kBlock) == 0,
              "qlinear_tiled: tiles must be a contiguous uint8 [", T, ", K x ", bits == 8 ? 16 : 8, "] tensor for N = ",
              N, " (K a multiple of ", kBlock, "), got ", tiles.scalar_type(), " ", tiles.sizes());
  const int64_t K = tiles.size(1) / (bits == 8 ? 16 : 8), nb = K / kBlock;
  TORCH_CHECK(scales.dim() == 3 && scales.is_contiguous() && scales.size(0) == T && scales.size(2) == 16 &&
                  scales.size(1) > 0 && nb % scales.size(1) == 0 &&
                  (scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kHalf),
              "qlinear_tiled: scales must be a contiguous float32 or float16 [", T, ", groups, 16] tensor whose groups "
              "split the ", nb, " blocks of K = ", K, ", got ", scales.scalar_type(), " ", scales.sizes());
  check_x(x, K, "qlinear_tiled");
  const KernelTable& k = require_kernels("qlinear_tiled");
  const TiledWeights w{tiles.data_ptr<uint8_t>(), scales.data_ptr(), scales.scalar_type() == torch::kHalf,
                       static_cast<int>(bits), bits == 8 ? 128 : 8, scales.size(1), K, N};
  const int64_t M = x.size(0);
  const QuantActs acts = quantize_acts(k, x, K, w.groups, act_per_row);
  auto y = output(out, M, N, x, "qlinear_tiled");
  float* yp = y.data_ptr<float>();
  thread_local std::vector<int32_t> corr;
  corr.resize(M * nb);
  for (int64_t i = 0; i < M * nb; ++i) {
    int32_t sum = 0;
    for (int64_t j = 0; j < kBlock; ++j) sum += acts.q[i * kBlock + j];
    corr[i] = -w.zero_u * sum;
  }
  const int32_t* block_corr = corr.data();  // not `corr` inside the lambda: that names each thread's own
  parallel_chunks(T, 1, [&](int64_t t0, int64_t t1) { k.qlinear_tiled(acts, block_corr, w, t0, t1, yp, N); });
  return finish(y, bias, "qlinear_tiled");
}

torch::Tensor woq_linear_f32_out(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                 c10::optional<torch::Tensor> offsets, int64_t bits, double zero,
                                 c10::optional<torch::Tensor> bias, torch::Tensor out) {
  const QuantWeights w = weights(qweight, scales, offsets, bits, zero, "woq_linear_f32");
  check_x(x, w.K, "woq_linear_f32");
  const KernelTable& k = require_kernels("woq_linear_f32");
  const int64_t M = x.size(0), N = qweight.size(0);
  auto y = output(out, M, N, x, "woq_linear_f32");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_chunks(N, kGrain, [&](int64_t n0, int64_t n1) { k.woq_f32(xp, M, w, n0, n1, yp, N); });
  return finish(y, bias, "woq_linear_f32");
}

void dequantize_into(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> offsets, int64_t bits,
                     double zero, torch::Tensor out) {
  const QuantWeights w = weights(qweight, scales, offsets, bits, zero, "dequantize_into");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.numel() == N * w.K,
              "dequantize_into: out must be a contiguous float32 tensor of ", N * w.K, " values, got ",
              out.scalar_type(), " ", out.sizes());
  const KernelTable& k = require_kernels("dequantize_into");
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { k.dequantize(w, n0, n1, dst); });
}

// y = x @ cat(weights).T (+ bias) without concatenating the weights: each output column range
// reads its own weight, all in one parallel region (fused q/k/v or gate/up kept in place).
torch::Tensor linear_f32_cat_out(torch::Tensor x, std::vector<torch::Tensor> weights, c10::optional<torch::Tensor> bias,
                                 torch::Tensor out) {
  TORCH_CHECK(!weights.empty(), "linear_f32: at least one weight is needed");
  const int64_t K = weights[0].size(-1);
  std::vector<int64_t> start{0};  // first output column of each weight
  for (const auto& weight : weights) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat && weight.is_contiguous() &&
                    weight.size(1) == K,
                "linear_f32: every weight must be a contiguous float32 [N, K = ", K, "] tensor, got ",
                weight.scalar_type(), " ", weight.sizes());
    start.push_back(start.back() + weight.size(0));
  }
  check_x(x, K, "linear_f32");
  const KernelTable& k = require_kernels("linear_f32");
  const int64_t M = x.size(0), N = start.back();
  auto y = output(out, M, N, x, "linear_f32");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_chunks(N, kGrain, [&](int64_t n0, int64_t n1) {
    for (size_t part = 0; part < weights.size(); ++part) {
      const int64_t lo = std::max(n0, start[part]) - start[part], hi = std::min(n1, start[part + 1]) - start[part];
      if (lo >= hi) continue;
      const float* wp = weights[part].data_ptr<float>();
      float* yo = yp + start[part];  // the kernels write y[m * ldy + n] for n in [lo, hi)
      k.linear_f32(xp, M, K, wp, lo, hi, yo, N);
    }
  });
  return finish(y, bias, "linear_f32");
}

torch::Tensor qlinear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> offsets,
                      int64_t bits, double zero, bool act_per_row, c10::optional<torch::Tensor> bias) {
  return qlinear_out(x, qweight, scales, offsets, bits, zero, act_per_row, bias, torch::Tensor());
}

torch::Tensor qlinear_tiled(torch::Tensor x, torch::Tensor tiles, torch::Tensor scales, int64_t bits, int64_t N,
                            bool act_per_row, c10::optional<torch::Tensor> bias) {
  return qlinear_tiled_out(x, tiles, scales, bits, N, act_per_row, bias, torch::Tensor());
}

torch::Tensor woq_linear_f32(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                             c10::optional<torch::Tensor> offsets, int64_t bits, double zero,
                             c10::optional<torch::Tensor> bias) {
  return woq_linear_f32_out(x, qweight, scales, offsets, bits, zero, bias, torch::Tensor());
}

torch::Tensor linear_f32_cat(torch::Tensor x, std::vector<torch::Tensor> weights, c10::optional<torch::Tensor> bias) {
  return linear_f32_cat_out(x, std::move(weights), bias, torch::Tensor());
}

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  return linear_f32_cat(x, {weight}, bias);
}

}  // namespace cpu_llm

TORCH_LIBRARY(cpu_llm, m) {
  m.def("qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int bits, float zero, bool act_per_row, "
        "Tensor? bias) -> Tensor");
  m.def("qlinear_tiled(Tensor x, Tensor tiles, Tensor scales, int bits, int n, bool act_per_row, Tensor? bias) -> Tensor");
  m.def("woq_linear_f32(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int bits, float zero, "
        "Tensor? bias) -> Tensor");
  m.def("dequantize_into(Tensor qweight, Tensor scales, Tensor? offsets, int bits, float zero, Tensor(a!) out) -> ()");
  m.def("linear_f32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_f32_cat(Tensor x, Tensor[] weights, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpu_llm, CPU, m) {
  m.impl("qlinear", &cpu_llm::qlinear);
  m.impl("qlinear_tiled", &cpu_llm::qlinear_tiled);
  m.impl("woq_linear_f32", &cpu_llm::woq_linear_f32);
  m.impl("dequantize_into", &cpu_llm::dequantize_into);
  m.impl("linear_f32", &cpu_llm::linear_f32);
  m.impl("linear_f32_cat", &cpu_llm::linear_f32_cat);
}
