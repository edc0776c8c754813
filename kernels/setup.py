"""Build the cpu_llm kernels against the torch of the active environment.

Installed by scripts/install.sh with `pip install --no-build-isolation ./kernels`, so the
extension is compiled for exactly the torch it will run with. Everything is compiled for
baseline x86-64; the files under csrc/x86/<isa>/ raise their own target with
`#pragma GCC target`, and the ops reach them only through that ISA's kernel table, which
csrc/dispatch.cpp picks for CPUs that have those features, so one build runs on AVX2-only and
AVX-512 hosts alike. -ffp-contract=off keeps every row's arithmetic
the same whatever its batch, so a request's output does not depend on its companions.
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Every C++ source, the per-ISA folders included (sorted: the same build order everywhere).
SOURCES = sorted(str(path.relative_to(Path(__file__).parent)) for path in Path(__file__).parent.glob("csrc/**/*.cpp"))

setup(
    name="cpu-llm-kernels",
    version="0.2.0",
    ext_modules=[CppExtension("cpu_llm_kernels", SOURCES,
                              extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"])],
    cmdclass={"build_ext": BuildExtension},
)
