// Run-time ISA choice (convention 7): cpuid picks the best path; SALR_CPU_ISA forces one so the
// tests can cover every path on one machine. Only this file knows which ISA files were built.
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <strings.h>

#include "int8_kernels.h"
#include "kernels.h"

namespace salr::kernels {

#if !defined(SALR_WITH_X86_SIMD)
// Non-x86 builds compile only the scalar kernels.
const KernelTable* avx2_kernel_table() { return nullptr; }
const KernelTable* avx512_kernel_table() { return nullptr; }
const Int8KernelTable* avx2_int8_table() { return nullptr; }
const Int8KernelTable* avx512_int8_table() { return nullptr; }
#endif

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
    case Isa::kAvx512:
      // vpexpandw needs VBMI2 (Ice Lake, Zen 4 and later); older AVX-512 parts take the AVX2 path.
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("fma");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

const KernelTable* compiled_table(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return scalar_kernel_table();
    case Isa::kAvx2: return avx2_kernel_table();
    case Isa::kAvx512: return avx512_kernel_table();
  }
  return nullptr;
}

bool isa_compiled(Isa isa) { return compiled_table(isa) != nullptr; }

Isa best_available_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (isa_compiled(isa) && cpu_supports(isa)) return isa;
  }
  return Isa::kScalar;
}

bool selected_isa(Isa* isa, const char** error) {
  const char* forced = std::getenv("SALR_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) {
    *isa = best_available_isa();
    return true;
  }
  for (Isa candidate : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(forced, isa_name(candidate)) != 0) continue;
    if (!isa_compiled(candidate)) {
      *error = "SALR_CPU_ISA names an ISA this build of salr does not contain";
      return false;
    }
    if (!cpu_supports(candidate)) {
      *error = "SALR_CPU_ISA names an ISA this CPU does not support";
      return false;
    }
    *isa = candidate;
    return true;
  }
  *error = "SALR_CPU_ISA must be one of auto, scalar, avx2, avx512";
  return false;
}

const KernelTable& kernel_table(Isa isa) {
  const KernelTable* table = compiled_table(isa);
  return table != nullptr ? *table : *scalar_kernel_table();
}

// A bf16 GEMM is fast only where oneDNN can use AVX512_BF16 (or AMX, which implies it): without
// it torch 2.13's bf16 GEMM ran at ~30 GFLOP/s per core against ~88 in fp32 (bench/RESULTS.md).
// ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 takes bf16 away from oneDNN, so it counts as absent
// (and lets an AVX-512 machine stand in for a Zen 3 / older Xeon in benchmarks and tests).
static bool fast_bf16_gemm() {
#if defined(__x86_64__) || defined(_M_X64)
  if (!__builtin_cpu_supports("avx512bf16")) return false;
#else
  return false;
#endif
  const char* max_isa = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (max_isa == nullptr) max_isa = std::getenv("DNNL_MAX_CPU_ISA");
  if (max_isa == nullptr) return true;
  for (const char* below : {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}) {
    if (strcasecmp(max_isa, below) == 0) return false;
  }
  return true;
}

bool selected_dense_gemm_dtype(DType dtype, DType* gemm_dtype, const char** error) {
  *gemm_dtype = dtype;
  if (dtype == DType::kFloat32) return true;
  const char* forced = std::getenv("SALR_CPU_DENSE_GEMM");
  if (forced != nullptr && forced[0] != '\0' && std::strcmp(forced, "auto") != 0) {
    if (std::strcmp(forced, "fp32") == 0) *gemm_dtype = DType::kFloat32;
    if (std::strcmp(forced, "native") == 0 || std::strcmp(forced, "fp32") == 0) return true;
    *error = "SALR_CPU_DENSE_GEMM must be one of auto, native, fp32";
    return false;
  }
  // fp16: torch 2.13 has no fast fp16 CPU GEMM on any machine measured (30 GFLOP/s per core on a
  // Zen 5 with AVX512_BF16), so it always widens.
  if (dtype == DType::kFloat16 || !fast_bf16_gemm()) *gemm_dtype = DType::kFloat32;
  return true;
}

const Int8KernelTable& int8_kernel_table(Isa isa) {
  const Int8KernelTable* table = isa == Isa::kAvx512 ? avx512_int8_table()
                                 : isa == Isa::kAvx2 ? avx2_int8_table()
                                                     : nullptr;
  return table != nullptr ? *table : *scalar_int8_table();
}

}  // namespace salr::kernels
