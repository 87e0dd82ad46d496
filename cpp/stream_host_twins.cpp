// Host twins of the CUDA "stream" kernel (cpp/stream_layout.h), exposed on salr._C so the CPU test
// suite checks them without a GPU (tests/test_cuda_stream_layout.py):
//   stream_relayout   the load-time re-layout, lane by lane through the helpers the GPU pass uses;
//   stream_fragments  the kernel's per-stage warp scan and per-lane decode, all 32 lanes simulated
//                     (shfl.up emulated), returning every lane's B registers;
//   stream_warp_scan  the scan alone;
//   stream_x_block_indices  where the activations' staging puts each (token, column) of a block.
// Byte strings in and out (no torch types in this module).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "stream_layout.h"

namespace py = pybind11;

namespace salr::stream {
namespace {

template <typename T>
std::vector<T> from_bytes(const py::bytes& data, const char* fn, const char* arg) {
  const std::string s = data;
  if (s.size() % sizeof(T) != 0) {
    throw py::value_error(std::string(fn) + ": " + arg + " must hold a whole number of " +
                          std::to_string(sizeof(T)) + "-byte elements, got " + std::to_string(s.size()) + " bytes");
  }
  std::vector<T> out(s.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), s.data(), s.size());
  return out;
}

// The warp's inclusive scan as the kernel runs it: 5 rounds, every lane reading lane - delta's
// value of the previous round (shfl.up).
std::vector<uint32_t> simulate_warp_scan(std::vector<uint32_t> value) {
  for (int delta = 1; delta < kLanes; delta *= 2) {
    const std::vector<uint32_t> before = value;
    for (int lane = 0; lane < kLanes; ++lane) {
      value[lane] = scan_step(before[lane], before[lane >= delta ? lane - delta : lane], lane, delta);
    }
  }
  return value;
}

std::vector<uint32_t> stream_warp_scan(const std::vector<uint32_t>& values) {
  if (values.size() != kLanes) throw py::value_error("stream_warp_scan: values must hold 32 lane values");
  return simulate_warp_scan(values);
}

// BM8x8 (bitmap int64 words, values 16-bit patterns, offsets int32) -> (record offsets in bytes,
// one per (pair, group) plus the end, records).
std::pair<std::vector<int64_t>, py::bytes> stream_relayout(const py::bytes& bitmap_bytes,
                                                           const py::bytes& values_bytes,
                                                           const py::bytes& offsets_bytes, int64_t rows,
                                                           int64_t cols) {
  constexpr const char* fn = "stream_relayout";
  const auto bitmap = from_bytes<uint64_t>(bitmap_bytes, fn, "bitmap");
  const auto values = from_bytes<uint16_t>(values_bytes, fn, "values");
  const auto offsets = from_bytes<int32_t>(offsets_bytes, fn, "offsets");
  const int64_t bands = format::num_bands(rows), tiles = format::tiles_per_band(cols);
  const int64_t groups = format::groups_per_band(cols), pairs = num_pairs(bands);
  if (static_cast<int64_t>(bitmap.size()) != bands * tiles ||
      static_cast<int64_t>(offsets.size()) != format::num_offsets(rows, cols)) {
    throw py::value_error("stream_relayout: bitmap / offsets do not match rows and cols");
  }
  std::vector<int64_t> record_offsets(pairs * groups + 1, 0);
  std::vector<unsigned char> records;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    for (int64_t group = 0; group < groups; ++group) {
      uint64_t words[kBandsPerPair][kGroupTiles] = {};
      const uint16_t* group_values[kBandsPerPair] = {nullptr, nullptr};
      int64_t band_values = 0;
      for (int b = 0; b < kBandsPerPair; ++b) {
        const int64_t band = 2 * pair + b;
        if (band >= bands) continue;
        for (int t = 0; t < kGroupTiles; ++t) {
          const int64_t tile = group * kGroupTiles + t;
          if (tile < tiles) words[b][t] = bitmap[band * tiles + tile];
          band_values += format::popcount64(words[b][t]);
        }
        const int64_t start = offsets[band * groups + group];
        if (start < 0 || start + band_values > static_cast<int64_t>(values.size())) {
          throw py::value_error("stream_relayout: offsets and bitmap run past the end of values");
        }
        group_values[b] = values.data() + start;
        band_values = 0;
      }
      std::vector<uint16_t> runs;
      std::vector<uint32_t> header(kLanes, 0);
      for (int b = 0; b < kBandsPerPair; ++b) {
        for (int lane = 0; lane < kLanes; ++lane) {
          header[lane] |= lane_bits(words[b], lane) << (16 * b);
          uint16_t run[16];
          const int n = group_values[b] == nullptr ? 0 : write_lane_run(words[b], group_values[b], lane, run);
          runs.insert(runs.end(), run, run + n);
        }
      }
      const int64_t begin = static_cast<int64_t>(records.size());
      records.resize(begin + record_bytes(static_cast<int64_t>(runs.size())), 0);
      std::memcpy(records.data() + begin, header.data(), kHeaderBytes);
      if (!runs.empty()) std::memcpy(records.data() + begin + kHeaderBytes, runs.data(), 2 * runs.size());
      record_offsets[pair * groups + group] = begin;
    }
  }
  record_offsets.back() = static_cast<int64_t>(records.size());
  return {record_offsets, py::bytes(reinterpret_cast<const char*>(records.data()), records.size())};
}

// Every lane's B registers, through the kernel's scan and decode_step, as a flat list indexed
// [record][step][band][lane][register]; records in record_offsets order.
std::vector<uint32_t> stream_fragments(const std::vector<int64_t>& record_offsets, const py::bytes& records_bytes) {
  std::vector<unsigned char> records = from_bytes<unsigned char>(records_bytes, "stream_fragments", "records");
  const int64_t size = static_cast<int64_t>(records.size());
  records.resize(records.size() + kRecordReadSlack, 0);
  Expansion table[16];
  for (uint32_t n = 0; n < 16; ++n) table[n] = expansion_of(n);
  std::vector<uint32_t> out;
  for (size_t r = 0; r + 1 < record_offsets.size(); ++r) {
    const int64_t begin = record_offsets[r], end = record_offsets[r + 1];
    if (begin < 0 || begin % kRecordAlign != 0 || end < begin + kHeaderBytes || end > size ||
        end - begin > record_bytes(kBandsPerPair * kMaxBandValues)) {
      throw py::value_error("stream_fragments: record " + std::to_string(r) + " has bad bounds");
    }
    const unsigned char* record = records.data() + begin;
    std::vector<uint32_t> header(kLanes), counts(kLanes);
    for (int lane = 0; lane < kLanes; ++lane) {
      std::memcpy(&header[lane], record + 4 * lane, 4);
      counts[lane] = packed_counts(header[lane]);
    }
    const std::vector<uint32_t> inclusive = simulate_warp_scan(counts);
    const uint32_t total = inclusive[kLanes - 1];
    if (kHeaderBytes + 2 * ((total & 0xffffu) + (total >> 16)) > end - begin) {
      throw py::value_error("stream_fragments: record " + std::to_string(r) + " is shorter than its header says");
    }
    uint32_t cursor[kBandsPerPair][kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      const uint32_t exclusive = inclusive[lane] - counts[lane];
      cursor[0][lane] = run_cursor_band0(exclusive);
      cursor[1][lane] = run_cursor_band1(exclusive, total);
    }
    for (int step = 0; step < kStepsPerGroup; ++step) {
      for (int b = 0; b < kBandsPerPair; ++b) {
        for (int lane = 0; lane < kLanes; ++lane) {
          uint32_t regs[2];
          decode_step(record, header[lane] >> (16 * b), step, table, cursor[b][lane], regs);
          out.push_back(regs[0]);
          out.push_back(regs[1]);
        }
      }
    }
  }
  return out;
}

// layout::x_block_index for every (token, col) of one block: [16 * 64] half indices, row-major.
std::vector<int> stream_x_block_indices() {
  std::vector<int> out;
  for (int token = 0; token < 16; ++token) {
    for (int col = 0; col < 64; ++col) out.push_back(x_block_index(token, col));
  }
  return out;
}

}  // namespace

void register_stream_host_twins(py::module_& m) {
  m.def("stream_relayout", &stream_relayout, py::arg("bitmap"), py::arg("values"), py::arg("offsets"),
        py::arg("rows"), py::arg("cols"),
        "Host twin of the CUDA stream kernel's load-time re-layout: (record byte offsets, records).");
  m.def("stream_fragments", &stream_fragments, py::arg("record_offsets"), py::arg("records"),
        "Host run of the stream kernel's warp scan + per-lane decode: flat [record][step][band][lane][reg].");
  m.def("stream_x_block_indices", &stream_x_block_indices,
        "The stream kernel's activation block layout: half index of (token, col), 16 x 64 row-major.");
  m.def("stream_warp_scan", &stream_warp_scan, py::arg("values"),
        "Host run of the stream kernel's warp inclusive scan (32 lane values).");
}

}  // namespace salr::stream
