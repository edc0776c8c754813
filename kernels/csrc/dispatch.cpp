// Which kernel table the ops run on: the best one this CPU supports, chosen once at load, and
// lowered by set_isa (tests run every path the host has; CPU_LLM_ISA in kernels.py).
#include <torch/extension.h>

#include <atomic>
#include <string>
#include <vector>

#include "isa.h"
#include "ops.h"

namespace cpu_llm {
namespace {

// Best first; a CPU supports a table when it reports every feature its kernels are compiled for.
const KernelTable* const kTables[] = {&kAvx512Kernels, &kAvx2Kernels, &kScalarKernels};

bool supported(const KernelTable* table) {
  __builtin_cpu_init();
  if (table == &kAvx512Kernels) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  }
  if (table == &kAvx2Kernels) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  return true;
}

std::vector<const KernelTable*> supported_tables() {
  std::vector<const KernelTable*> out;
  for (const KernelTable* table : kTables) {
    if (supported(table)) out.push_back(table);
  }
  return out;
}

const std::vector<const KernelTable*> kSupported = supported_tables();
std::atomic<const KernelTable*> g_active{kSupported.front()};

}  // namespace

const KernelTable& active_kernels() { return *g_active.load(std::memory_order_relaxed); }

const KernelTable& require_kernels(const char* op) {
  const KernelTable& table = active_kernels();
  TORCH_CHECK(table.qlinear != nullptr, op, ": cpu_llm kernels need a CPU with AVX2, FMA and F16C; this one has "
              "none of those paths");
  return table;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const KernelTable* table : kSupported) {
    if (table->qlinear != nullptr) out.emplace_back(table->name);
  }
  return out;
}

void set_isa(const std::string& name) {
  for (const KernelTable* table : kSupported) {
    if (table->qlinear != nullptr && name == table->name) {
      g_active.store(table);
      return;
    }
  }
  TORCH_CHECK(false, "set_isa: '", name, "' is not supported on this CPU (best: ", kSupported.front()->name, ")");
}

}  // namespace cpu_llm

// The Python module only reports and selects the kernel table; the torch ops are what callers use.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(cpu_llm::active_kernels().name); }, "the instruction set the ops run on");
  m.def("supported_isas", &cpu_llm::supported_isas, "the instruction sets this CPU can run the ops on, best first");
  m.def("set_isa", &cpu_llm::set_isa, "run the ops on a lower instruction set than the best (tests)");
}
