"""Build the cpu_llm kernels against the torch of the active environment.

Installed by scripts/install.sh with `pip install --no-build-isolation ./kernels`, so the
extension is compiled for exactly the torch it will run with. Everything is compiled for
baseline x86-64; csrc/avx2.cpp and csrc/avx512.cpp raise their own target with
`#pragma GCC target`, and csrc/ops.cpp calls them only on CPUs that have those features, so one
build runs on AVX2-only and AVX-512 hosts alike. -ffp-contract=off keeps every row's arithmetic
the same whatever its batch, so a request's output does not depend on its companions.
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="cpu-llm-kernels",
    version="0.2.0",
    ext_modules=[CppExtension("cpu_llm_kernels", ["csrc/ops.cpp", "csrc/avx2.cpp", "csrc/avx512.cpp", "csrc/tiled_avx512.cpp",
                                                  "csrc/attention.cpp", "csrc/attention_avx2.cpp",
                                                  "csrc/elementwise.cpp", "csrc/rows_avx2.cpp", "csrc/decoder.cpp"],
                              extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"])],
    cmdclass={"build_ext": BuildExtension},
)
