// The AVX2 + FMA kernel table (every x86-64 server CPU since 2013). Only pointers: the kernels
// themselves are compiled for their target in this folder's other files.
#include "../../isa.h"

namespace cpu_llm {

const KernelTable kAvx2Kernels{
    "avx2",
    silu_mul_avx2,
    rms_norm_row_avx2,
    quantize_acts_avx2,
    qlinear_avx2,
    nullptr,  // prepare_pairs: symmetric weights go through qlinear
    nullptr,  // qlinear_sym
    qlinear_tiled_avx2,
    woq_f32_avx2,
    dequantize_avx2,
    linear_f32_avx2,
    rope_avx2,
    attend_avx2,
};

}  // namespace cpu_llm
