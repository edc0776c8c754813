// What the ops hand to the per-ISA kernels (x86/avx2/, x86/avx512/): raw pointers only, and the
// kernel table through which they reach them.
//
// The ISA files are compiled with their own target attributes (#pragma GCC target) and include
// no torch header and use no std:: template, so no inline function compiled for AVX-512 can be
// picked by the linker for code that runs on an AVX2-only host; their helpers have internal
// linkage (anonymous namespace). The ops check shapes, split the output channels between threads
// and call the kernels of the active table (dispatch.cpp), which is chosen once at load from
// what the CPU reports: no op body tests the ISA.
#pragma once
#include <cstdint>

namespace cpu_llm {

constexpr int64_t kBlock = 32;  // activations are quantized in blocks of 32 values (as Q8_0)
constexpr int kMaxTile = 4;     // activation rows sharing one pass over a weight row
// Software prefetch distance for weights, in bytes. Measured on a 2-core Xeon VM (1 GB of int8
// weights, batch 1): hardware prefetching alone streamed 6.9 GB/s per thread; see bench_kernels.
#ifndef CPU_LLM_PREFETCH
#define CPU_LLM_PREFETCH 1024
#endif
constexpr int64_t kPrefetch = CPU_LLM_PREFETCH;

// Activations quantized to int8, one scale per block of kBlock values: x ~= q * scale.
struct QuantActs {
  const int8_t* q;     // [M, K]
  const float* scale;  // [M, K / kBlock]
  const float* sum;    // [M, K / kBlock]: scale * sum(q) over the block (the block's sum as quantized)
  const float* group_sum;  // [M, groups of the weight]: `sum` added up over each weight group
  int64_t M, K;
};

// Integer weights, one scale per group of columns: weight = stored * scale + offset, where
// offset = offsets[g] when given, else -zero * scale (symmetric formats).
//   bits 8: int8 [N, K];  bits 4: uint8 [N, K / 2], in each block of 32 values byte j holds
//   value j in its low nibble and value j + 16 in its high nibble (unsigned 0..15).
struct QuantWeights {
  const uint8_t* data;
  const void* scales;  // [N, groups], float32, or float16 when scales_fp16
  bool scales_fp16;
  const float* offsets;  // [N, groups] or nullptr
  float zero;
  int bits;
  int64_t groups, K;

  int64_t row_bytes() const { return bits == 8 ? K : K / 2; }
  int64_t group() const { return K / groups; }
};

// Fills a QuantActs for x [M, K]: per block of kBlock, or one scale per row (per_row). AVX2 code
// serves both ISAs: it is a small share of the time and rounds exactly as std::nearbyint.
void quantize_acts_avx2(const float* x, int64_t M, int64_t K, bool per_row, int8_t* q, float* scale, float* sum);

// y[m, n] for m < acts.M, n in [n0, n1): integer dot products on quantized activations.
// scratch: (1 + kMaxTile) * K / kBlock floats of the calling thread (block scales).
void qlinear_avx2(const QuantActs& acts, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                  float* scratch);
void qlinear_avx512(const QuantActs& acts, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                    float* scratch);

// Helpers of the integer kernels (AVX2 code, also called from the AVX-512 kernel):
// wsb[b] = the weight scale of block b of row n; c[r][b] = activation scale x wsb[b] for `rows`
// rows from m0; ofs[r] += sum over groups of (offset - shift * scale) x the group's activation sum.
void block_scales_avx2(const QuantWeights& w, int64_t n, float* wsb);
void combined_scales_avx2(const QuantActs& a, int64_t m0, int rows, const float* wsb, float* c);
void add_offsets_avx2(const QuantActs& a, int64_t m0, int rows, const QuantWeights& w, int64_t n, const float* wsb,
                      float shift, float* ofs);

// Activations prepared for symmetric weights on AVX-512 (no stored offsets; the stored value u
// stands for (u - zero_u) x scale, zero_u an integer 0..255): per row and per pair of blocks,
//   neg_corr: 16 int32 lanes, -zero_u x (the lane's 4 activation bytes summed), the start value of
//             the VNNI accumulation, so that it yields sum((u - zero_u) x q) exactly in integers;
//   scale:    16 floats, [block scale of b x 8, of b + 1 x 8] (0 past the last block).
struct PairActs {
  const int32_t* neg_corr;  // [M, pairs, 16]
  const float* scale;       // [M, pairs, 16]
  int64_t pairs;            // ceil(K / kBlock / 2)
};

void prepare_pairs_avx512(const QuantActs& acts, int zero_u, int32_t* neg_corr, float* scale);
// y[m, n] for symmetric weights: four weight rows per pass (four independent memory streams
// sharing each activation load), no per-row prologue; the row scale applied once at the end.
void qlinear_sym_avx512(const QuantActs& acts, const PairActs& pairs, const QuantWeights& w, int64_t n0, int64_t n1,
                        float* y, int64_t ldy);

// Symmetric weights tiled (the row layout of QuantWeights repacked once at load,
// formats/tiling.py): 16 output rows per tile, so one 512-bit dpbusd computes 16 rows x 4 columns
// with one activation broadcast (AVX2: one 256-bit maddubs, 8 rows x 4 columns), and the
// per-block scale work is done once per 16 (8) rows instead of per row (no horizontal sums
// either). Per tile and block of 32 columns:
//   bits 8: [8 groups of 4 columns][16 rows][4 bytes] = 512 bytes, stored unsigned (w + 128);
//   bits 4: [4 groups][16 rows][4 bytes] = 256 bytes, byte i of group j holding column 4j + i in
//           its low nibble and 16 + 4j + i in its high one (unsigned, w + zero).
// scales: [tiles, groups, 16] float32 or float16 (rows past N are zero).
struct TiledWeights {
  const uint8_t* data;
  const void* scales;
  bool scales_fp16;
  int bits;
  int zero_u;  // the stored value of a zero weight: 128 (8 bits) or 8 (4 bits)
  int64_t groups, K, N;

  int64_t block_bytes() const { return bits == 8 ? 16 * kBlock : 8 * kBlock; }
  int64_t tile_bytes() const { return K / kBlock * block_bytes(); }
};

// y[m, n] for n in tiles [t0, t1) of 16 rows (the last one may be partial): x86/avx512/tiled.cpp
// and x86/avx2/tiled.cpp.
// block_corr: [M, K / kBlock] int32, -zero_u x the sum of the block's int8 activations.
void qlinear_tiled_avx512(const QuantActs& acts, const int32_t* block_corr, const TiledWeights& w, int64_t t0,
                          int64_t t1, float* y, int64_t ldy);
void qlinear_tiled_avx2(const QuantActs& acts, const int32_t* block_corr, const TiledWeights& w, int64_t t0, int64_t t1,
                        float* y, int64_t ldy);

// The runner's row ops (x86/avx2/rows.cpp; generic/rows.cpp has their scalar twins):
// out[i] = silu(gate[i]) x up[i], and RMSNorm of one row of H values.
void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n);
void rms_norm_row_avx2(const float* x, const float* w, int64_t H, double eps, float* out);
void silu_mul_scalar(const float* gate, const float* up, float* out, int64_t n);
void rms_norm_row_scalar(const float* x, const float* w, int64_t H, double eps, float* out);

// Attention over one cache slot (x86/avx2/attention.cpp; the AVX-512 hosts run it too: with
// head_dim 64 the dot products are too short for wider vectors to pay).
// out[0, 2 * half) = x rotated by the angle table of one position (Hugging Face's rotate_half
// convention: element i pairs with element i + half), times `scale`.
void rope_avx2(const float* x, const float* cos, const float* sin, int64_t half, float scale, float* out);
// out[D] = softmax(scale * q . keys[l] for l < len) . values, keys/values [len, D] contiguous;
// scores: `len` floats of scratch. D is a multiple of 8.
void attend_avx2(const float* q, const float* keys, const float* values, int64_t len, int64_t D, float scale,
                 float* scores, float* out);

// y[m, n] with the weight dequantized in registers, fp32 activations and accumulation.
void woq_f32_avx2(const float* x, int64_t M, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy);

// Rows [n0, n1) of the fp32 weight (for the float GEMM of long prefills).
void dequantize_avx2(const QuantWeights& w, int64_t n0, int64_t n1, float* out);

// y[m, n] = dot(x[m], w[n]) for an fp32 weight [N, K] (matrix-vector products: decode).
void linear_f32_avx2(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                     int64_t ldy);
void linear_f32_avx512(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                       int64_t ldy);

// One table of kernels per instruction set, filled once (x86/avx2/table.cpp,
// x86/avx512/table.cpp, generic/rows.cpp), as ggml-cpu fills one function table per type. An
// entry an ISA does not have is nullptr: the op then takes its general path (qlinear_sym,
// qlinear_tiled), or the whole op needs a table with that entry (require_kernels).
struct KernelTable {
  const char* name;  // as CPU_LLM_ISA and kernels.isa() spell it
  // Row ops: every table has them (the scalar twins where no vector ISA runs).
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
  void (*rms_norm_row)(const float* x, const float* w, int64_t H, double eps, float* out);
  // Quantized and fp32 products, attention: nullptr in the table of a CPU without AVX2.
  void (*quantize_acts)(const float* x, int64_t M, int64_t K, bool per_row, int8_t* q, float* scale, float* sum);
  void (*qlinear)(const QuantActs& acts, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
                  float* scratch);
  // Symmetric weights with the zero point taken out in integers (nullptr: qlinear serves them).
  void (*prepare_pairs)(const QuantActs& acts, int zero_u, int32_t* neg_corr, float* scale);
  void (*qlinear_sym)(const QuantActs& acts, const PairActs& pairs, const QuantWeights& w, int64_t n0, int64_t n1,
                      float* y, int64_t ldy);
  // Tiled weights (every table with integer kernels has it: models are tiled at load).
  void (*qlinear_tiled)(const QuantActs& acts, const int32_t* block_corr, const TiledWeights& w, int64_t t0,
                        int64_t t1, float* y, int64_t ldy);
  void (*woq_f32)(const float* x, int64_t M, const QuantWeights& w, int64_t n0, int64_t n1, float* y, int64_t ldy);
  void (*dequantize)(const QuantWeights& w, int64_t n0, int64_t n1, float* out);
  void (*linear_f32)(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                     int64_t ldy);
  void (*rope)(const float* x, const float* cos, const float* sin, int64_t half, float scale, float* out);
  void (*attend)(const float* q, const float* keys, const float* values, int64_t len, int64_t D, float scale,
                 float* scores, float* out);
};

extern const KernelTable kScalarKernels;  // generic/rows.cpp
extern const KernelTable kAvx2Kernels;    // x86/avx2/table.cpp
extern const KernelTable kAvx512Kernels;  // x86/avx512/table.cpp

}  // namespace cpu_llm
