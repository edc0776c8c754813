// The ops the decoder stack (decoder.cpp) calls as C++ functions, without the dispatcher: it runs
// ~240 of them per decode step, where a call through Python and the dispatcher costs more than the
// smaller ops' arithmetic. It calls their `_out` forms (plus rms_norm); the plain forms are what
// each file registers as torch.ops.cpu_llm.<name>. See the file that defines an op for what it computes.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace cpu_llm {

// Each op's `_out` form writes its result into `out` when `out` is defined (checked to be a
// contiguous float32 tensor of the result's shape) and returns it; undefined, it allocates, as
// the plain form does. The decoder stack passes the buffers layer 0 allocated to every later
// layer: a decode step then allocates ~7 tensors instead of ~300 (each allocation and free costs
// about a microsecond, on the thread the others wait for).
torch::Tensor output(const torch::Tensor& out, int64_t rows, int64_t cols, const torch::Tensor& like, const char* op);

// linear.cpp
torch::Tensor qlinear_out(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                          c10::optional<torch::Tensor> offsets, int64_t bits, double zero, bool act_per_row,
                          c10::optional<torch::Tensor> bias, torch::Tensor out);
torch::Tensor qlinear_tiled_out(torch::Tensor x, torch::Tensor tiles, torch::Tensor scales, int64_t bits, int64_t N,
                                bool act_per_row, c10::optional<torch::Tensor> bias, torch::Tensor out);
torch::Tensor woq_linear_f32_out(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                 c10::optional<torch::Tensor> offsets, int64_t bits, double zero,
                                 c10::optional<torch::Tensor> bias, torch::Tensor out);
torch::Tensor linear_f32_cat_out(torch::Tensor x, std::vector<torch::Tensor> weights, c10::optional<torch::Tensor> bias,
                                 torch::Tensor out);

// attention.cpp
torch::Tensor slot_attention_out(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                                 torch::Tensor slots, torch::Tensor k_cache, torch::Tensor v_cache, int64_t heads,
                                 int64_t kv_heads, double scale, torch::Tensor out);

// dispatch.cpp: the kernel table the ops run on (chosen at load, lowered by set_isa), and the
// same when the op needs the products and attention, which a CPU without AVX2 lacks (an error).
struct KernelTable;
const KernelTable& active_kernels();
const KernelTable& require_kernels(const char* op);
std::vector<std::string> supported_isas();
void set_isa(const std::string& name);

// elementwise.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm_out(torch::Tensor x, torch::Tensor delta, torch::Tensor weight, double eps, torch::Tensor out);
torch::Tensor silu_mul_out(torch::Tensor gate_up, torch::Tensor out);

}  // namespace cpu_llm
