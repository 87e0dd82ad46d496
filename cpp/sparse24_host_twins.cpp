// Host runs of the 2:4 helpers of cpp/sparse24_layout.h, exposed on salr._C for the CPU test suite
// (tests/test_cuda_24_layout.py): detection, the chunk metadata, and the whole re-layout through the
// very functions the CUDA re-layout kernel calls per lane. Plain lists in and out (no torch types in
// _C); meant for test-sized weights.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "sparse24_layout.h"

namespace py = pybind11;

namespace salr::sparse24 {
namespace {

bool is_2to4(const std::vector<int64_t>& bitmap_words) {
  for (int64_t word : bitmap_words) {
    if (!word_is_2to4(static_cast<uint64_t>(word))) return false;
  }
  return true;
}

uint32_t metadata_of_chunk(uint32_t nibble) {
  if (nibble > 0xfu) throw py::value_error("sparse24_chunk_metadata: nibble must be in 0..15");
  return chunk_metadata(nibble);
}

// The sparse24 tiles of a BM8x8 weight [rows, cols] (bitmap flattened [bands * tiles]), as
// row_blocks * k_blocks * kTileHalves uint16.
std::vector<uint16_t> relayout(const std::vector<int64_t>& bitmap_words, const std::vector<uint16_t>& values,
                               const std::vector<int32_t>& offsets, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) throw py::value_error("sparse24_relayout: rows and cols must be >= 0");
  const int64_t tiles = format::tiles_per_band(cols);
  if (static_cast<int64_t>(bitmap_words.size()) != format::num_bands(rows) * tiles ||
      static_cast<int64_t>(offsets.size()) != format::num_offsets(rows, cols)) {
    throw py::value_error("sparse24_relayout: bitmap_words / offsets do not match a [" + std::to_string(rows) +
                          ", " + std::to_string(cols) + "] weight");
  }
  const std::vector<uint64_t> words(bitmap_words.begin(), bitmap_words.end());
  const WeightView w{words.data(), values.data(), offsets.data(), static_cast<int64_t>(values.size()),
                     rows, cols, tiles, format::groups_per_band(cols)};
  const int64_t blocks_k = k_blocks(cols);
  std::vector<uint16_t> out(static_cast<size_t>(row_blocks(rows) * blocks_k * kTileHalves), 0);
  for (int64_t p = 0; p < row_blocks(rows); ++p) {
    for (int64_t q = 0; q < blocks_k; ++q) {
      uint16_t* tile = &out[(p * blocks_k + q) * kTileHalves];
      for (int lane = 0; lane < kLanes; ++lane) relayout_tile_lane(w, p, q, lane, tile);
    }
  }
  return out;
}

}  // namespace

void register_sparse24_host_twins(py::module_& m) {
  m.def("sparse24_is_2to4", &is_2to4, py::arg("bitmap_words"),
        "Whether every row chunk (aligned 4 columns) of these BM8x8 tile words has <= 2 nonzeros.");
  m.def("sparse24_chunk_metadata", &metadata_of_chunk, py::arg("nibble"),
        "The 4-bit mma.sp metadata of one chunk's nonzero mask (two ascending kept indices).");
  m.def("sparse24_relayout", &relayout, py::arg("bitmap_words"), py::arg("values"), py::arg("offsets"),
        py::arg("rows"), py::arg("cols"),
        "Host run of the CUDA re-layout: the mma.sp.m16n8k32 tiles (uint16 list) of a BM8x8 weight.");
  m.attr("sparse24_tile_halves") = kTileHalves;
}

}  // namespace salr::sparse24
