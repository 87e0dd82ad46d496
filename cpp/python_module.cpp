// salr._C: the thin pybind11 module. Build and CPU facts only (no torch types, so it never has to
// agree with torch's own pybind11); the ops themselves live in libsalr_ops (TORCH_LIBRARY).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "bitmap_format.h"
#include "kernels/kernels.h"

namespace py = pybind11;

namespace salr::stream {
void register_stream_host_twins(py::module_& m);  // stream_host_twins.cpp
}
using salr::kernels::Isa;

namespace salr::sparse24 {
void register_sparse24_host_twins(py::module_& m);  // cpp/sparse24_host_twins.cpp
}

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

// The dtype ("float32", "bfloat16", "float16") the large-M CPU path computes its GEMM in for a
// weight of `dtype` (honours SALR_CPU_DENSE_GEMM and ONEDNN_MAX_CPU_ISA); raises on a bad value.
std::string cpu_dense_gemm_dtype(const std::string& dtype) {
  using salr::kernels::DType;
  const char* names[] = {"float32", "bfloat16", "float16"};
  for (DType d : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    if (dtype != names[static_cast<int>(d)]) continue;
    DType gemm_dtype;
    const char* error = nullptr;
    if (!salr::kernels::selected_dense_gemm_dtype(d, &gemm_dtype, &error)) throw py::value_error(error);
    return names[static_cast<int>(gemm_dtype)];
  }
  throw py::value_error("cpu_dense_gemm_dtype: dtype must be float32, bfloat16 or float16, got '" + dtype + "'");
}

// The CUDA forward kernel's register decode, run on the host: for one band pair and one 64-column
// group (two bands x up to 8 tiles), the four A registers of every lane at every k16 step, through
// the very helper the kernel calls (format::a_fragment_k16). Lets the CPU test suite check the
// lane -> fragment mapping and the popcount prefix without a GPU.
//   bitmap_words  16 tile words, band-major (top band's 8 tiles, then the bottom band's); int64 bits
//   values        the 16-bit value bit patterns of the weight
//   band_starts   index in `values` of each band's first value in the group
// Returns [4 steps][32 lanes][4 registers] of packed value pairs (first column in the low half).
std::vector<std::vector<std::vector<uint32_t>>> mma_a_fragments(const std::vector<int64_t>& bitmap_words,
                                                               const std::vector<uint16_t>& values,
                                                               std::pair<int64_t, int64_t> band_starts) {
  namespace fmt = salr::format;
  constexpr int kTiles = static_cast<int>(fmt::kTilesPerGroup);
  if (bitmap_words.size() != 2 * fmt::kTilesPerGroup) {
    throw py::value_error("mma_a_fragments: bitmap_words must hold 16 tile words (2 bands x 8 tiles)");
  }
  uint64_t words[2 * kTiles];
  int64_t needed[2] = {0, 0};
  for (int i = 0; i < 2 * kTiles; ++i) {
    words[i] = static_cast<uint64_t>(bitmap_words[i]);
    needed[i / kTiles] += fmt::popcount64(words[i]);
  }
  const int64_t starts[2] = {band_starts.first, band_starts.second};
  for (int band = 0; band < 2; ++band) {
    if (starts[band] < 0 || starts[band] + needed[band] > static_cast<int64_t>(values.size())) {
      throw py::value_error("mma_a_fragments: band_starts and the bitmap run past the end of values");
    }
  }
  // lane_value_pair may read 2 elements past a run of values (the kernel's slots have them).
  std::vector<uint16_t> padded(values);
  padded.resize(values.size() + 2, 0);
  std::vector<std::vector<std::vector<uint32_t>>> out(fmt::kTilesPerGroup / 2);
  for (int lane = 0; lane < fmt::kWarpLanes; ++lane) {
    const fmt::LaneDecode decode = fmt::lane_decode(lane);
    int top_cursor = 0, bottom_cursor = 0;
    for (int step = 0; step < kTiles / 2; ++step) {
      uint32_t fragment[fmt::kFragmentRegisters];
      fmt::a_fragment_k16(words, words + kTiles, padded.data() + starts[0], padded.data() + starts[1],
                          step, decode, top_cursor, bottom_cursor, fragment);
      out[step].emplace_back(fragment, fragment + fmt::kFragmentRegisters);
    }
  }
  return out;
}

// Whether this build contains the CUDA kernels (SALR_WITH_CUDA at configure time).
bool cuda_compiled() {
#if defined(SALR_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "salr native build facts (the ops are torch.ops.salr.*)";
  m.def("selected_cpu_isa", &selected_cpu_isa,
        "The CPU kernel path the next op call will take (cpuid, or SALR_CPU_ISA).");
  m.def("available_cpu_isas", &available_cpu_isas,
        "CPU kernel paths this build contains and this CPU can run.");
  m.def("cpu_dense_gemm_dtype", &cpu_dense_gemm_dtype, py::arg("dtype"),
        "The dtype the large-M CPU path computes its GEMM in for a weight of this dtype.");
  m.def("compiled_cpu_isas", &compiled_cpu_isas, "CPU kernel paths this build contains.");
  m.def("mma_a_fragments", &mma_a_fragments, py::arg("bitmap_words"), py::arg("values"),
        py::arg("band_starts"),
        "Host run of the CUDA kernel's lane -> mma A-fragment decode for one band pair and group.");
  salr::stream::register_stream_host_twins(m);
  m.def("cuda_compiled", &cuda_compiled, "Whether this build contains the CUDA kernels.");
  salr::sparse24::register_sparse24_host_twins(m);
}
