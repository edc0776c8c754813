// What attention.cpp hands to the AVX2 attention code (attention_avx2.cpp): raw pointers only,
// for the same reason as isa.h (that file has its own target attributes and no torch header).
#pragma once
#include <cstdint>

namespace cpu_llm {

// out[0, 2 * half) = x rotated by the angle table of one position (Hugging Face's rotate_half
// convention: element i pairs with element i + half), times `scale`.
void rope_avx2(const float* x, const float* cos, const float* sin, int64_t half, float scale, float* out);

// out[D] = softmax(scale * q . keys[l] for l < len) . values, keys/values [len, D] contiguous;
// scores: `len` floats of scratch. D is a multiple of 8.
void attend_avx2(const float* q, const float* keys, const float* values, int64_t len, int64_t D, float scale,
                 float* scores, float* out);

}  // namespace cpu_llm
