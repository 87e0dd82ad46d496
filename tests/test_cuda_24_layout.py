"""The 2:4 (mma.sp.m16n8k32) path's host twins, checked without a GPU: detection on BM8x8 words,
the chunk metadata encoding, the re-layout (salr._C.sparse24_relayout runs the very per-lane
functions of the CUDA re-layout kernel) bit-exact against an independent reading of the PTX ISA
(tests/sparse24_helpers.py), the dense weight rebuilt from the tiles = bitmap_decode, and a host
simulation of the warp's mma.sp over all 32 lanes = the float64 product."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import _native, reference
from conftest import make_generator, random_sparse
from sparse24_helpers import bits_of, dense_from_tiles, isa_tiles, lane_a_matrix, random_2to4, tile_registers

pytestmark = pytest.mark.skipif(_native._C is None or not hasattr(_native._C, "sparse24_relayout"),
                                reason=salr.native_error() or "native module without the sparse24 host twins")

SHAPES = [(1, 1), (7, 9), (16, 32), (13, 70), (24, 100), (40, 200), (33, 64), (64, 520)]
INVALID_METADATA = {0b0000, 0b0101, 0b1010, 0b1111}  # the ISA's undefined-behaviour values


def host_relayout(dense: torch.Tensor) -> list[int]:
    bitmap, values, offsets = reference.bitmap_encode(dense)
    return _native._C.sparse24_relayout(bitmap.reshape(-1).tolist(), bits_of(values).tolist(), offsets.tolist(),
                                        dense.shape[0], dense.shape[1])


def test_metadata_of_every_chunk():
    # The ISA's six two-nonzero patterns, written out: (lower index) | (higher index) << 2.
    assert [_native._C.sparse24_chunk_metadata(n) for n in (0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100)] == [
        0x4, 0x8, 0xC, 0x9, 0xD, 0xE]
    for nibble in range(16):
        if bin(nibble).count("1") > 2:
            continue
        meta = _native._C.sparse24_chunk_metadata(nibble)
        lo, hi = meta & 3, meta >> 2
        assert meta not in INVALID_METADATA and lo < hi
        assert nibble & ~((1 << lo) | (1 << hi)) == 0, "a nonzero column is not kept"
    with pytest.raises(ValueError, match="nibble"):
        _native._C.sparse24_chunk_metadata(16)


def nibble_counts_ok(word: int) -> bool:
    return all(bin((word >> (4 * i)) & 0xF).count("1") <= 2 for i in range(16))


def test_detection_matches_nibble_counts():
    gen = make_generator("s24-detect")
    words = torch.randint(-(2**63), 2**63 - 1, (4000,), generator=gen, dtype=torch.int64).tolist()
    # sparser words too, so both answers occur often
    words += (torch.randint(-(2**63), 2**63 - 1, (4000,), generator=gen, dtype=torch.int64)
              & torch.randint(-(2**63), 2**63 - 1, (4000,), generator=gen, dtype=torch.int64)
              & torch.randint(-(2**63), 2**63 - 1, (4000,), generator=gen, dtype=torch.int64)).tolist()
    expected = [nibble_counts_ok(w & (2**64 - 1)) for w in words]
    assert 100 < sum(expected) < len(words) - 100
    assert [_native._C.sparse24_is_2to4([w]) for w in words] == expected


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_detection_of_weights(rows, cols):
    gen = make_generator("s24-weights", rows, cols)
    dense = random_2to4(rows, cols, torch.bfloat16, gen)
    bitmap, _, _ = reference.bitmap_encode(dense)
    assert _native._C.sparse24_is_2to4(bitmap.reshape(-1).tolist())
    # One third nonzero in one chunk of one row makes it not 2:4 (where a chunk has 3 columns).
    if cols >= 3:
        row = int(torch.randint(rows, (1,), generator=gen))
        chunk = int(torch.randint(cols // 4 or 1, (1,), generator=gen))
        width = min(4, cols - 4 * chunk)
        if width >= 3:
            dense[row, 4 * chunk:4 * chunk + 3] = 1.0
            bitmap, _, _ = reference.bitmap_encode(dense)
            assert not _native._C.sparse24_is_2to4(bitmap.reshape(-1).tolist())
    # Unstructured 50% weights are not 2:4 (a 3- or 4-nonzero chunk is all but certain at this size).
    if rows * cols >= 512:
        bitmap, _, _ = reference.bitmap_encode(random_sparse(rows, cols, 0.5, torch.bfloat16, gen))
        assert not _native._C.sparse24_is_2to4(bitmap.reshape(-1).tolist())


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("max_kept", [0, 1, 2])
def test_relayout_matches_the_isa(rows, cols, max_kept):
    dense = random_2to4(rows, cols, torch.bfloat16, make_generator("s24-isa", rows, cols, max_kept), max_kept)
    tiles = host_relayout(dense)
    assert len(tiles) == -(-rows // 16) * -(-cols // 32) * _native._C.sparse24_tile_halves
    assert tiles == isa_tiles(bits_of(dense))
    # 1.125 bytes per (padded) weight: 16 bytes of values + 2 of metadata per 16 weights
    assert len(tiles) * 2 == 1.125 * (-(-rows // 16) * 16) * (-(-cols // 32) * 32)


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiles_rebuild_bitmap_decode(rows, cols, dtype):
    dense = random_2to4(rows, cols, dtype, make_generator("s24-decode", rows, cols, dtype))
    bitmap, values, offsets = reference.bitmap_encode(dense)
    decoded = reference.bitmap_decode(bitmap, values, offsets, rows, cols)
    assert torch.equal(dense_from_tiles(host_relayout(dense), rows, cols), bits_of(decoded))


def test_every_single_nonzero_reaches_its_place():
    # One nonzero at a time over a whole 16x32 tile: exactly that element comes back.
    for row in range(16):
        for col in range(32):
            dense = torch.zeros(16, 32, dtype=torch.int64)
            dense[row, col] = 0xBEEF
            assert torch.equal(dense_from_tiles(host_relayout(dense), 16, 32), dense)


def simulate_warp_mma(regs, meta, x_tile: torch.Tensor) -> torch.Tensor:
    """One mma.sp.m16n8k32 of the warp on the host in float64: A from the lanes' registers and
    metadata, B (32x8) handed out as the ISA's B fragments, D gathered from the C fragments."""
    a = torch.zeros(16, 32, dtype=torch.float64)
    for (r, c), bits in lane_a_matrix(regs, meta).items():
        a[r, c] = torch.tensor([bits], dtype=torch.int64).to(torch.int16).view(torch.bfloat16).double()
    b_lanes = {}
    for lane in range(32):  # b0..b3 of lane (g, t): k = 8i + 2t + {0, 1}, column g
        group, tig = lane // 4, lane % 4
        b_lanes[lane] = [(x_tile[8 * i + 2 * tig + h, group]) for i in range(4) for h in range(2)]
    b = torch.zeros(32, 8, dtype=torch.float64)
    for lane, vals in b_lanes.items():
        group, tig = lane // 4, lane % 4
        for i in range(4):
            for h in range(2):
                b[8 * i + 2 * tig + h, group] = vals[2 * i + h]
    d = a @ b
    out = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):  # c0, c1: row g, columns 2t, 2t+1; c2, c3: row g + 8
        group, tig = lane // 4, lane % 4
        for i in range(4):
            row, col = group + 8 * (i >= 2), 2 * tig + (i & 1)
            out[row, col] = d[row, col]
    return out


@pytest.mark.parametrize("rows,cols", [(16, 32), (24, 100), (33, 64)])
def test_warp_simulation_equals_float64_product(rows, cols):
    gen = make_generator("s24-warp", rows, cols)
    dense = random_2to4(rows, cols, torch.bfloat16, gen)
    x = torch.randn(cols, 8, generator=gen, dtype=torch.float64)
    tiles = host_relayout(dense)
    blocks_m, blocks_k = -(-rows // 16), -(-cols // 32)
    x_padded = torch.zeros(blocks_k * 32, 8, dtype=torch.float64)
    x_padded[:cols] = x
    y = torch.zeros(blocks_m * 16, 8, dtype=torch.float64)
    for p in range(blocks_m):
        for q in range(blocks_k):
            y[p * 16:(p + 1) * 16] += simulate_warp_mma(*tile_registers(tiles, p * blocks_k + q),
                                                        x_padded[q * 32:(q + 1) * 32])
    torch.testing.assert_close(y[:rows], dense.double() @ x, rtol=1e-12, atol=1e-12)


def test_relayout_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        _native._C.sparse24_relayout([0, 0], [], [0, 0], 8, 8)
