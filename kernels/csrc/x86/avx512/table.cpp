// The AVX-512 VNNI kernel table (Ice Lake, Sapphire Rapids, Zen 4 and later): its own integer
// and fp32 products; the AVX2 kernels where wider vectors do not pay (activation quantization,
// rows, attention over head_dim 64, fp32-activation WoQ).
#include "../../isa.h"

namespace cpu_llm {

const KernelTable kAvx512Kernels{
    "avx512-vnni",
    silu_mul_avx2,
    rms_norm_row_avx2,
    quantize_acts_avx2,
    qlinear_avx512,
    prepare_pairs_avx512,
    qlinear_sym_avx512,
    qlinear_tiled_avx512,
    woq_f32_avx2,
    dequantize_avx2,
    linear_f32_avx512,
    rope_avx2,
    attend_avx2,
};

}  // namespace cpu_llm
