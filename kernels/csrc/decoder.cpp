// DecoderStack: every decoder layer of a Llama-family model run by one call from Python
// (torch.classes.cpu_llm.DecoderStack; models/llama.py builds it at load).
//
// Why: a decode step of SmolLM2's 30 layers is 240 op calls. From Python each pays the module
// call, the argument conversion and the dispatcher, a few microseconds apiece, which is most of
// what a small model's step costs beyond its weight reads. Here the same ops run as plain C++
// calls on the same tensors, so the result is bitwise the one the Python layers compute.
//
//   stack = DecoderStack(heads, kv_heads, scale, eps)
//   per layer: stack.add_layer(input_norm, post_attention_norm), then
//              stack.set_linear(which, kind, tensors, bias, bits, n, zero, act_per_row)
//              for which = 0 (fused q/k/v), 1 (o), 2 (fused gate/up), 3 (down), kind one of
//                0 qlinear_tiled  [tiles, scales]                bits, n, act_per_row
//                1 qlinear        [qweight, scales(, offsets)]   bits, zero, act_per_row
//                2 woq_linear_f32 [qweight, scales(, offsets)]   bits, zero
//                3 linear_f32_cat [weight, ...]
//                4 at::linear     [weight, ...]                  (the BLAS, one product per weight)
//   delta = stack.forward(x, positions, slots, cos, sin, k_cache, v_cache)
//     x [N, hidden] the residual stream (updated in place up to the last layer's input),
//     k_cache/v_cache [layers, slots, kv_heads, length, head_dim]; returns what the last layer
//     adds to x (the caller fuses that add with the final norm).
//   stack.run_linears(inputs): the projections alone (benchmarks).
#include <torch/custom_class.h>
#include <torch/extension.h>

#include <array>
#include <vector>

#include "ops.h"

namespace cpu_llm {
namespace {

enum Kind : int64_t { kTiled = 0, kRows = 1, kWoqF32 = 2, kF32 = 3, kBlas = 4 };
constexpr const char* kProjections[] = {"qkv", "o", "gate_up", "down"};

struct Linear {
  int64_t kind = -1;  // unset
  std::vector<torch::Tensor> tensors;
  c10::optional<torch::Tensor> bias;
  int64_t bits = 0, n = 0;
  double zero = 0.0;
  bool act_per_row = false;

  c10::optional<torch::Tensor> offsets() const {
    return tensors.size() > 2 ? c10::optional<torch::Tensor>(tensors[2]) : c10::nullopt;
  }

  // x @ W.T (+ bias), into `out` where it is defined (see ops.h), except on the BLAS.
  torch::Tensor operator()(const torch::Tensor& x, const torch::Tensor& out = torch::Tensor()) const {
    switch (kind) {
      case kTiled: return qlinear_tiled_out(x, tensors[0], tensors[1], bits, n, act_per_row, bias, out);
      case kRows: return qlinear_out(x, tensors[0], tensors[1], offsets(), bits, zero, act_per_row, bias, out);
      case kWoqF32: return woq_linear_f32_out(x, tensors[0], tensors[1], offsets(), bits, zero, bias, out);
      case kF32: return linear_f32_cat_out(x, tensors, bias, out);
      default: return blas(x);
    }
  }

  // One BLAS product per weight, side by side (Concat of nn.Linear parts), each with its slice of
  // the concatenated bias: the products Python's F.linear computes, bit for bit.
  torch::Tensor blas(const torch::Tensor& x) const {
    if (tensors.size() == 1) return at::linear(x, tensors[0], bias);
    std::vector<torch::Tensor> parts;
    int64_t start = 0;
    for (const auto& weight : tensors) {
      const int64_t rows = weight.size(0);
      parts.push_back(at::linear(x, weight, bias ? c10::optional<torch::Tensor>(bias->narrow(0, start, rows))
                                                 : c10::nullopt));
      start += rows;
    }
    return at::cat(parts, 1);
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  std::array<Linear, 4> linears;  // qkv, o, gate_up, down
};

class DecoderStack : public torch::CustomClassHolder {
 public:
  DecoderStack(int64_t heads, int64_t kv_heads, double scale, double eps)
      : heads_(heads), kv_heads_(kv_heads), scale_(scale), eps_(eps) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "DecoderStack: heads (", heads,
                ") must be a positive multiple of kv_heads (", kv_heads, ")");
  }

  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm) {
    layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), {}});
  }

  // Projection `which` of the last layer added.
  void set_linear(int64_t which, int64_t kind, std::vector<torch::Tensor> tensors, c10::optional<torch::Tensor> bias,
                  int64_t bits, int64_t n, double zero, bool act_per_row) {
    TORCH_CHECK(!layers_.empty(), "DecoderStack.set_linear: add_layer first");
    TORCH_CHECK(which >= 0 && which < 4, "DecoderStack.set_linear: which must be 0-3 (qkv, o, gate_up, down), got ",
                which);
    TORCH_CHECK(kind >= kTiled && kind <= kBlas, "DecoderStack.set_linear: kind must be 0-4, got ", kind);
    const size_t want_min = kind == kTiled || kind == kRows || kind == kWoqF32 ? 2 : 1;
    const size_t want_max = kind == kTiled ? 2 : kind == kRows || kind == kWoqF32 ? 3 : 64;
    TORCH_CHECK(tensors.size() >= want_min && tensors.size() <= want_max, "DecoderStack.set_linear: kind ", kind,
                " takes ", want_min, "-", want_max, " tensors, got ", tensors.size());
    layers_.back().linears[which] = Linear{kind, std::move(tensors), std::move(bias), bits, n, zero, act_per_row};
  }

  int64_t layers() const { return static_cast<int64_t>(layers_.size()); }

  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor slots, torch::Tensor cos,
                        torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache) const {
    TORCH_CHECK(!layers_.empty(), "DecoderStack.forward: no layer added");
    TORCH_CHECK(k_cache.dim() == 5 && v_cache.dim() == 5 && k_cache.size(0) == layers() &&
                    v_cache.size(0) == layers(),
                "DecoderStack.forward: k_cache and v_cache must be [layers = ", layers(),
                ", slots, kv_heads, length, head_dim], got ", k_cache.sizes(), " and ", v_cache.sizes());
    for (size_t i = 0; i < layers_.size(); ++i) {
      for (size_t j = 0; j < 4; ++j) {
        TORCH_CHECK(layers_[i].linears[j].kind >= 0, "DecoderStack.forward: layer ", i, " has no ", kProjections[j],
                    " projection (set_linear)");
      }
    }
    // Each op's result buffer: allocated by layer 0's ops, written again by every later layer's
    // (the shapes are the same), so a step allocates ~7 tensors rather than ~10 per layer.
    torch::Tensor h, qkv, a, o, gate_up, act, delta;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      h = delta.defined() ? add_rms_norm_out(x, delta, layer.input_norm, eps_, h)
                          : rms_norm(x, layer.input_norm, eps_);                         // (N, hidden)
      qkv = layer.linears[0](h, qkv);                                                    // (N, (heads + 2 kv) D)
      a = slot_attention_out(qkv, cos, sin, positions, slots, k_cache[i], v_cache[i], heads_, kv_heads_, scale_,
                             a);                                                         // (N, heads D)
      o = layer.linears[1](a, o);                                                        // (N, hidden)
      h = add_rms_norm_out(x, o, layer.post_norm, eps_, h);                              // (N, hidden)
      gate_up = layer.linears[2](h, gate_up);                                            // (N, 2 I)
      act = silu_mul_out(gate_up, act);                                                  // (N, I)
      delta = layer.linears[3](act, delta);                                              // (N, hidden)
    }
    return delta;
  }

  // Only the projections, layer by layer, on inputs captured from a forward (4 per layer: what
  // qkv, o, gate_up and down read): how long a step's matrix products take without the rest, for
  // the benchmark's per-step overhead.
  void run_linears(std::vector<torch::Tensor> inputs) const {
    TORCH_CHECK(inputs.size() == 4 * layers_.size(), "DecoderStack.run_linears: ", 4 * layers_.size(),
                " inputs expected (4 per layer), got ", inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) layers_[i / 4].linears[i % 4](inputs[i]);
  }

 private:
  int64_t heads_, kv_heads_;
  double scale_, eps_;
  std::vector<Layer> layers_;
};

}  // namespace
}  // namespace cpu_llm

TORCH_LIBRARY_FRAGMENT(cpu_llm, m) {
  m.class_<cpu_llm::DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, int64_t, double, double>())
      .def("add_layer", &cpu_llm::DecoderStack::add_layer)
      .def("set_linear", &cpu_llm::DecoderStack::set_linear)
      .def("layers", &cpu_llm::DecoderStack::layers)
      .def("forward", &cpu_llm::DecoderStack::forward)
      .def("run_linears", &cpu_llm::DecoderStack::run_linears);
}
