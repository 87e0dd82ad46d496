// salr._C: the thin pybind11 module. Build and CPU facts only (no torch types, so it never has to
// agree with torch's own pybind11); the ops themselves live in libsalr_ops (TORCH_LIBRARY).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace py = pybind11;
using salr::kernels::Isa;

namespace {

// The ISA the CPU kernels would use for the next call (honours SALR_CPU_ISA); raises on a bad value.
std::string selected_cpu_isa() {
  Isa isa;
  const char* error = nullptr;
  if (!salr::kernels::selected_isa(&isa, &error)) throw py::value_error(error);
  return salr::kernels::isa_name(isa);
}

// ISAs both compiled into this build and supported by this CPU, best last.
std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (salr::kernels::isa_compiled(isa) && salr::kernels::cpu_supports(isa)) {
      names.emplace_back(salr::kernels::isa_name(isa));
    }
  }
  return names;
}

std::vector<std::string> compiled_cpu_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (salr::kernels::isa_compiled(isa)) names.emplace_back(salr::kernels::isa_name(isa));
  }
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "salr native build facts (the ops are torch.ops.salr.*)";
  m.def("selected_cpu_isa", &selected_cpu_isa,
        "The CPU kernel path the next op call will take (cpuid, or SALR_CPU_ISA).");
  m.def("available_cpu_isas", &available_cpu_isas,
        "CPU kernel paths this build contains and this CPU can run.");
  m.def("compiled_cpu_isas", &compiled_cpu_isas, "CPU kernel paths this build contains.");
}
