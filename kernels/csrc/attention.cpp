// slot_attention: rotary embedding, KV-cache write and attention for a flat list of tokens, each
// in its own cache slot at its own position (the model runner's decode and chunked prefill).
//
//   slot_attention(qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads, scale)
//     qkv        [N, (heads + 2 * kv_heads) * D]  the fused projection of N tokens
//     cos, sin   [P, D / 2]                      the rotary angle table (position p -> row p)
//     positions  [N] int64, slots [N] int64      where token n sits: slot slots[n], position positions[n]
//     k_cache, v_cache [S, kv_heads, L, D]       written at (slot, :, position); read up to it
//   -> [N, heads * D]: token n attends to positions 0..positions[n] of its slot (causal within a
//      chunk, since every key of the call is written before any query reads).
//
// Each token's result depends only on its own slot, so a row's output is the same whatever the
// batch. Compiled for baseline x86-64; the vector code comes from the active kernel table
// (x86/avx2/attention.cpp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "isa.h"
#include "ops.h"

namespace cpu_llm {
namespace {

constexpr int64_t kWorkPerTask = 65536;  // multiply-adds of q . k per thread task (and as many for v)

void check_float(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.dim() == dim, "slot_attention: ", name,
              " must be a contiguous float32 ", dim, "-D tensor, got ", t.scalar_type(), " ", t.sizes());
}

void check_index(const torch::Tensor& t, int64_t N, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1 && t.size(0) == N,
              "slot_attention: ", name, " must be a contiguous int64 tensor of ", N, " values, got ", t.scalar_type(),
              " ", t.sizes());
}

}  // namespace

torch::Tensor slot_attention_out(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                                 torch::Tensor slots, torch::Tensor k_cache, torch::Tensor v_cache, int64_t heads,
                                 int64_t kv_heads, double scale, torch::Tensor out_buffer) {
  const KernelTable& k = require_kernels("slot_attention");
  check_float(qkv, 2, "qkv");
  check_float(cos, 2, "cos");
  check_float(sin, 2, "sin");
  check_float(k_cache, 4, "k_cache");
  check_float(v_cache, 4, "v_cache");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "slot_attention: heads (", heads,
              ") must be a positive multiple of kv_heads (", kv_heads, ")");
  const int64_t N = qkv.size(0), S = k_cache.size(0), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == kv_heads, "slot_attention: k_cache ",
              k_cache.sizes(), " and v_cache ", v_cache.sizes(), " must both be [slots, kv_heads=", kv_heads,
              ", length, head_dim]");
  TORCH_CHECK(D % 8 == 0, "slot_attention: head_dim must be a multiple of 8, got ", D);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * D, "slot_attention: qkv has ", qkv.size(1),
              " columns, expected (heads + 2 * kv_heads) * head_dim = ", (heads + 2 * kv_heads) * D);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(1) == D / 2, "slot_attention: cos ", cos.sizes(), " and sin ",
              sin.sizes(), " must both be [positions, head_dim / 2 = ", D / 2, "]");
  check_index(positions, N, "positions");
  check_index(slots, N, "slots");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(pos[n] >= 0 && pos[n] < L && pos[n] < cos.size(0), "slot_attention: token ", n, " has position ",
                pos[n], ", beyond the cache length ", L, " or the rotary table ", cos.size(0));
    TORCH_CHECK(slot[n] >= 0 && slot[n] < S, "slot_attention: token ", n, " has slot ", slot[n], " of ", S);
  }

  const float *x = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const int64_t width = qkv.size(1), half = D / 2, group = heads / kv_heads;
  auto at_cache = [&](float* cache, int64_t n, int64_t h) { return cache + ((slot[n] * kv_heads + h) * L + pos[n]) * D; };

  // Split between threads only when there is enough work to pay for it: a decode step over short
  // contexts is a few microseconds, about what waking the other threads costs.
  int64_t attended = 0;
  for (int64_t n = 0; n < N; ++n) attended += pos[n] + 1;
  const int64_t per_head = std::max<int64_t>(1, attended * D / N);
  const int64_t grain = std::max<int64_t>(1, kWorkPerTask / per_head);
  // Every key and value of the call first (a chunk's later tokens attend to its earlier ones).
  at::parallel_for(0, N * kv_heads, N * kv_heads < 64 ? N * kv_heads : 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / kv_heads, h = i % kv_heads;
      const float* row = x + n * width;
      k.rope(row + (heads + h) * D, cp + pos[n] * half, sp + pos[n] * half, half, 1.f, at_cache(kc, n, h));
      std::memcpy(at_cache(vc, n, h), row + (heads + kv_heads + h) * D, D * sizeof(float));
    }
  });
  auto out = output(out_buffer, N, heads * D, qkv, "slot_attention");
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * heads, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> q, scores;  // this thread's scratch, kept across calls
    q.resize(D), scores.resize(L);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / heads, h = i % heads, kvh = h / group;
      k.rope(x + n * width + h * D, cp + pos[n] * half, sp + pos[n] * half, half, 1.f, q.data());
      const int64_t base = (slot[n] * kv_heads + kvh) * L * D;
      k.attend(q.data(), kc + base, vc + base, pos[n] + 1, D, static_cast<float>(scale), scores.data(),
                  op + n * heads * D + h * D);
    }
  });
  return out;
}

torch::Tensor slot_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                             torch::Tensor slots, torch::Tensor k_cache, torch::Tensor v_cache, int64_t heads,
                             int64_t kv_heads, double scale) {
  return slot_attention_out(qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads, scale,
                            torch::Tensor());
}

}  // namespace cpu_llm

TORCH_LIBRARY_FRAGMENT(cpu_llm, m) {
  m.def("slot_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor slots, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int heads, int kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpu_llm, CPU, m) { m.impl("slot_attention", &cpu_llm::slot_attention); }
