"""Build the AVX2 quantized-linear kernels against the torch of the active environment.

Installed by scripts/install.sh with `pip install --no-build-isolation ./kernels`, so the
extension is compiled for exactly the torch it will run with.
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="cpu-llm-kernels",
    version="0.1.0",
    ext_modules=[CppExtension("cpu_llm_kernels", ["cpu_llm_kernels.cpp"],
                              extra_compile_args=["-O3", "-mavx2", "-mfma", "-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
)
