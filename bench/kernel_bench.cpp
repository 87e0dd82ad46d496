// Torch-free single-thread timing of the BM8x8 GEMV kernels against a bulk read of the same machine,
// in thread CPU time (so a machine shared with other jobs still gives per-core numbers). A tool for
// kernel work: the torch-level comparison with dense lives in bench/cpu_roofline.py.
// The contenders (scalar once, then each SIMD path and, when linked, another revision's AVX2
// kernels: scripts/kernel_bench.sh with KERNEL_BENCH_BASE=<git ref>) alternate call by call;
// medians. KERNEL_BENCH_MB (default 512) sizes the rotated copies of the weight: 1 keeps a
// 256-row weight cache-resident, which measures the kernels' instruction cost alone.
//
//   g++ -O3 -std=c++17 -Icpp -DSALR_WITH_X86_SIMD bench/kernel_bench.cpp cpp/kernels/*.cpp \
//       -o /tmp/kernel_bench   (with the per-file ISA flags of CMakeLists.txt: see scripts/kernel_bench.sh)
//   /tmp/kernel_bench 11008 4096 0.5 bf16|fp16|fp32|int8 [m]
// int8: the int8 kernels (issue 21) on the same bitmap, values rounded from the bf16 ones with one
// scale per row, x and y in bf16; its bytes count int8 values, bitmap, offsets and scales.
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../cpp/bitmap_format.h"
#include "../cpp/kernels/int8_kernels.h"
#include "../cpp/kernels/kernels.h"
#include "../cpp/kernels/numeric.h"

// Another revision's AVX2 tables, compiled into this namespace by scripts/kernel_bench.sh (weak:
// null when not linked). Its KernelTable / Int8KernelTable have the same layout as this revision's.
namespace salr::kernels_base {
struct KernelTable;
struct Int8KernelTable;
const KernelTable* avx2_kernel_table() __attribute__((weak));
const Int8KernelTable* avx2_int8_table() __attribute__((weak));
}  // namespace salr::kernels_base

using namespace salr;
using namespace salr::kernels;

static double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct Weight {
  std::vector<uint64_t> bitmap;
  std::vector<uint16_t> values16;
  std::vector<float> values32;
  std::vector<int32_t> offsets;
  SparseWeightView view;
  int64_t bytes;
  // int8 only: the values rounded onto a grid of 1/16 (|q| <= 127) and one scale per row.
  std::vector<int8_t> values8;
  std::vector<float> scales;
  Int8WeightView view8;
};

// The same index with int8 values: timing does not depend on the grid, so one fixed scale serves.
static void add_int8(Weight& w) {
  w.values8.resize(w.values16.size());
  for (size_t i = 0; i < w.values16.size(); ++i) {
    const float q = std::nearbyint(load_as_float(w.values16.data(), static_cast<int64_t>(i), DType::kBFloat16) * 16.f);
    w.values8[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, q)));
  }
  w.values16 = {};
  w.scales.assign(w.view.rows, 1.f / 16);
  w.view8 = Int8WeightView{w.view, w.scales.data(), 1};
  w.view8.index.values = w.values8.data();
  w.bytes = static_cast<int64_t>(w.values8.size() + w.bitmap.size() * 8 + w.offsets.size() * 4 + w.scales.size() * 4);
}

static Weight encode(const std::vector<float>& dense32, const std::vector<uint16_t>& dense16, int64_t rows,
                     int64_t cols, DType dt) {
  Weight w;
  const int64_t bands = format::num_bands(rows), tiles = format::tiles_per_band(cols);
  const int64_t groups = format::groups_per_band(cols);
  w.bitmap.resize(bands * tiles);
  w.offsets.resize(bands * groups + 1);
  const void* dense = dt == DType::kFloat32 ? static_cast<const void*>(dense32.data()) : dense16.data();
  encode_count(dense, rows, cols, dt, w.bitmap.data(), w.offsets.data() + 1, 0, bands);
  w.offsets[0] = 0;
  for (size_t i = 1; i < w.offsets.size(); ++i) w.offsets[i] += w.offsets[i - 1];
  const int64_t nnz = w.offsets.back();
  void* values;
  if (dt == DType::kFloat32) {
    w.values32.resize(nnz);
    values = w.values32.data();
  } else {
    w.values16.resize(nnz);
    values = w.values16.data();
  }
  w.view = SparseWeightView{w.bitmap.data(), values, w.offsets.data(), nnz, rows, cols, dt};
  encode_fill(dense, w.view, values, 0, bands);
  w.bytes = nnz * element_size(dt) + w.bitmap.size() * 8 + w.offsets.size() * 4;
  return w;
}

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? atoll(argv[1]) : 11008, cols = argc > 2 ? atoll(argv[2]) : 4096;
  const double sparsity = argc > 3 ? atof(argv[3]) : 0.5;
  const std::string dname = argc > 4 ? argv[4] : "bf16";
  const int64_t m = argc > 5 ? atoll(argv[5]) : 1;
  if (dname != "bf16" && dname != "fp16" && dname != "fp32" && dname != "int8") {
    std::fprintf(stderr, "kernel_bench: dtype must be bf16, fp16, fp32 or int8, got '%s'\n", dname.c_str());
    return 2;
  }
  const bool int8 = dname == "int8";  // int8 values; the index, x and y as for bf16
  const DType dt = dname == "fp32" ? DType::kFloat32 : dname == "fp16" ? DType::kFloat16 : DType::kBFloat16;
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::normal_distribution<float> nd;
  std::vector<float> dense32(rows * cols);
  std::vector<uint16_t> dense16(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) {
    dense32[i] = u(gen) < sparsity ? 0.f : nd(gen);
    dense16[i] = dt == DType::kFloat16 ? float_to_fp16(dense32[i]) : float_to_bf16(dense32[i]);
    dense32[i] = load_as_float(dense16.data(), i, dt == DType::kFloat32 ? DType::kBFloat16 : dt);
  }
  const int64_t working_set_mb = getenv("KERNEL_BENCH_MB") ? atoll(getenv("KERNEL_BENCH_MB")) : 512;
  const int copies = std::max<int64_t>(1, (working_set_mb << 20) / std::max<int64_t>(1, rows * cols));
  const int calls = std::max<int64_t>(1, 64 / copies);  // per timing: enough work for the clock
  std::vector<Weight> ws;
  for (int c = 0; c < copies; ++c) {
    ws.push_back(encode(dense32, dense16, rows, cols, dt));
    if (int8) add_int8(ws.back());
  }
  dense32.clear();
  dense32.shrink_to_fit();
  std::vector<uint16_t> x16(m * cols);
  std::vector<float> x32(m * cols);
  for (int64_t i = 0; i < m * cols; ++i) {
    x32[i] = nd(gen);
    x16[i] = dt == DType::kFloat16 ? float_to_fp16(x32[i]) : float_to_bf16(x32[i]);
  }
  const void* x = dt == DType::kFloat32 ? static_cast<const void*>(x32.data()) : x16.data();
  const int es = element_size(dt);
  std::vector<char> y(m * rows * es), y_ref(m * rows * es);

  // Bulk read: an integer sum over 512 MB (4 independent chains of 64-bit adds: far from
  // compute-bound), the kind of loop the DRAM stream limit applies to.
  std::vector<uint64_t> bulk(int64_t{64} << 20, 1);
  double bulk_best = 1e9;
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = thread_seconds();
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < bulk.size(); i += 4) {
      s0 += bulk[i];
      s1 += bulk[i + 1];
      s2 += bulk[i + 2];
      s3 += bulk[i + 3];
    }
    sink = s0 + s1 + s2 + s3;
    bulk_best = std::min(bulk_best, thread_seconds() - t0);
  }
  (void)sink;
  const double bulk_gbps = bulk.size() * 8 / bulk_best / 1e9;
  bulk.clear();
  bulk.shrink_to_fit();

  const int64_t bands = format::num_bands(rows);
  using Run = std::function<void(std::vector<char>&)>;
  auto float_run = [&](const KernelTable& table) -> Run {
    return [&, table_p = &table](std::vector<char>& out) {
      for (int c = 0; c < copies; ++c) {
        const GemmArgs args{ws[c].view, x, m, cols, out.data(), rows, nullptr, nullptr, 0, nullptr};
        if (table_p->gemm(args, 0, bands) >= 0) std::exit(1);
      }
    };
  };
  auto int8_run = [&](const Int8KernelTable& table) -> Run {
    return [&, table_p = &table](std::vector<char>& out) {
      for (int c = 0; c < copies; ++c) {
        const Int8GemmArgs args{ws[c].view8, dt, x, m, cols, out.data(), rows, nullptr, nullptr, 0, nullptr};
        if (table_p->gemm(args, 0, bands) >= 0) std::exit(1);
      }
    };
  };
  auto run_of = [&](Isa isa) { return int8 ? int8_run(int8_kernel_table(isa)) : float_run(kernel_table(isa)); };
  run_of(Isa::kScalar)(y_ref);
  std::vector<std::pair<std::string, Run>> contenders;
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (isa_compiled(isa) && cpu_supports(isa)) contenders.emplace_back(isa_name(isa), run_of(isa));
  }
  if (cpu_supports(Isa::kAvx2) && !int8 && salr::kernels_base::avx2_kernel_table) {
    contenders.emplace_back(
        "avx2-base", float_run(*reinterpret_cast<const KernelTable*>(salr::kernels_base::avx2_kernel_table())));
  }
  if (cpu_supports(Isa::kAvx2) && int8 && salr::kernels_base::avx2_int8_table) {
    contenders.emplace_back(
        "avx2-base", int8_run(*reinterpret_cast<const Int8KernelTable*>(salr::kernels_base::avx2_int8_table())));
  }
  std::vector<std::vector<double>> times(contenders.size());
  for (int rep = 0; rep < 9; ++rep) {
    for (size_t k = 0; k < contenders.size(); ++k) {
      const double t0 = thread_seconds();
      for (int i = 0; i < calls; ++i) contenders[k].second(y);
      times[k].push_back((thread_seconds() - t0) / (copies * calls));
      if (rep > 0) continue;
      int64_t diff = 0;
      for (int64_t i = 0; i < m * rows; ++i) {
        const float a = load_as_float(y.data(), i, dt), b = load_as_float(y_ref.data(), i, dt);
        if (std::abs(a - b) > 1e-2f * (1.f + std::abs(b))) ++diff;
      }
      if (diff) std::printf("  %s: %lld outputs differ from scalar beyond rounding\n", contenders[k].first.c_str(), (long long)diff);
    }
  }
  for (size_t k = 0; k < contenders.size(); ++k) {
    std::sort(times[k].begin(), times[k].end());
    const double t = times[k][times[k].size() / 2];
    std::printf("%-9s %lldx%lld %.0f%% %s m=%lld: %.3f ms, %.2f ns per 8x8 tile, %.2f GB/s = %.0f%% of bulk read %.2f GB/s "
                "(1 thread, CPU time)\n",
                contenders[k].first.c_str(), (long long)rows, (long long)cols, sparsity * 100, dname.c_str(), (long long)m,
                t * 1e3, t * 1e9 / (bands * format::tiles_per_band(cols)), ws[0].bytes / t / 1e9,
                100 * ws[0].bytes / t / 1e9 / bulk_gbps, bulk_gbps);
  }
  return 0;
}
