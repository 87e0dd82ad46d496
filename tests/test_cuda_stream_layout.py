"""The CUDA "stream" kernel's load-time re-layout and per-lane decode, checked on the host (no GPU):
salr._C.stream_relayout (the host twin of the GPU re-layout) against the layout written out here
from its description, and salr._C.stream_fragments (the kernel's warp scan + decode_step for all 32
lanes) assembled at the positions the PTX ISA gives mma.m16n8k16's B operand, under the K
permutation, back into the dense weight; the product with activations read through the same
permutation must match the float64 reference."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import _native, reference
from conftest import make_generator

pytestmark = pytest.mark.skipif(_native._C is None or not hasattr(_native._C, "stream_relayout"),
                                reason=salr.native_error() or "native module without stream_relayout")

DENSITIES = [0.0, 0.03, 0.3, 0.5, 0.7, 0.97, 1.0]
SHAPES = [(8, 8), (16, 64), (24, 72), (13, 130), (40, 200), (5, 3)]
HEADER_BYTES = 128


def physical_column(lane: int, reg: int, half: int) -> int:
    """The K permutation as specified: logical k rows {2t, 2t+1} (reg 0) and {2t+8, 2t+9} (reg 1)
    of lane (g, t) are the physical columns 4t + 2 reg + half of the k16 step."""
    return 4 * (lane % 4) + 2 * reg + half


def ptx_b_positions(lane: int):
    """(reg, half) -> (logical k row, n column) of mma.m16n8k16's B fragment (16-bit types)."""
    group, thread_in_group = lane // 4, lane % 4
    return {(reg, half): (2 * thread_in_group + half + 8 * reg, group) for reg in range(2) for half in range(2)}


def ptx_a_positions(lane: int):
    """(reg, half) -> (row, logical k column) of mma.m16n8k16's A fragment (16-bit types)."""
    group, thread_in_group = lane // 4, lane % 4
    return {(reg, half): (group + 8 * (reg % 2), 2 * thread_in_group + half + 8 * (reg // 2))
            for reg in range(4) for half in range(2)}


def random_weight(rows, cols, density, gen, dtype=torch.bfloat16):
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    w[w == 0] = 1.0
    return torch.where(torch.rand(rows, cols, generator=gen) < density, w, torch.zeros_like(w))


def relayout(dense):
    rows, cols = dense.shape
    bitmap, values, offsets = reference.bitmap_encode(dense)
    return _native._C.stream_relayout(bitmap.numpy().tobytes(), values.view(torch.int16).numpy().tobytes(),
                                      offsets.numpy().tobytes(), rows, cols)


def python_relayout(dense):
    """The layout of cpp/stream_layout.h written out from its comment, position by position."""
    rows, cols = dense.shape
    pairs, groups = (rows + 15) // 16, (cols + 63) // 64
    padded = torch.zeros(pairs * 16, groups * 64, dtype=torch.int64)
    padded[:rows, :cols] = dense.view(torch.int16).to(torch.int64) & 0xFFFF
    record_offsets, records = [], bytearray()
    for pair in range(pairs):
        for group in range(groups):
            header, runs = [0] * 32, []
            for band in range(2):
                for lane in range(32):
                    row, t = 16 * pair + 8 * band + lane // 4, lane % 4
                    for step in range(4):
                        for c in range(4):
                            v = int(padded[row, 64 * group + 16 * step + 4 * t + c])
                            if v:
                                header[lane] |= 1 << (16 * band + 4 * step + c)
                                runs.append(v)
            record_offsets.append(len(records))
            chunk = b"".join(h.to_bytes(4, "little") for h in header) + b"".join(v.to_bytes(2, "little") for v in runs)
            records += chunk + bytes(-len(chunk) % 16)
    record_offsets.append(len(records))
    return record_offsets, bytes(records)


def fragments(record_offsets, records):
    flat = _native._C.stream_fragments(record_offsets, records)
    return torch.tensor(flat, dtype=torch.int64).reshape(len(record_offsets) - 1, 4, 2, 32, 2)


def assemble_weight(frags, rows, cols):
    """The dense weight put together from every lane's B registers at their PTX positions."""
    pairs, groups = (rows + 15) // 16, (cols + 63) // 64
    out = torch.full((pairs * 16, groups * 64), -1, dtype=torch.int64)
    for r in range(frags.shape[0]):
        pair, group = divmod(r, groups)
        for step in range(4):
            for band in range(2):
                for lane in range(32):
                    for (reg, half), (k, n) in ptx_b_positions(lane).items():
                        col = 64 * group + 16 * step + physical_column(lane, reg, half)
                        row = 16 * pair + 8 * band + n
                        assert out[row, col] == -1, "two lanes claim one element"
                        out[row, col] = (int(frags[r, step, band, lane, reg]) >> (16 * half)) & 0xFFFF
    assert (out >= 0).all()
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_relayout_twin_is_bit_exact(shape, density):
    dense = random_weight(*shape, density, make_generator("stream-relayout", shape, density))
    offsets, records = relayout(dense)
    want_offsets, want_records = python_relayout(dense)
    assert offsets == want_offsets
    assert records == want_records
    assert all(o % 16 == 0 for o in offsets)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_decoded_records_reproduce_the_weight(shape, density):
    rows, cols = shape
    dense = random_weight(rows, cols, density, make_generator("stream-decode", shape, density))
    out = assemble_weight(fragments(*relayout(dense)), rows, cols)
    want = dense.view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(out[:rows, :cols], want)
    assert (out[rows:] == 0).all() and (out[:, cols:] == 0).all()


def emulated_product(frags, x, rows, cols):
    """y = x Wᵀ the way the kernel forms it: per (pair, group, step, band) one m16n8k16 product per
    16 tokens, A read from x through the K permutation, B from the decoded registers; float64."""
    m = x.shape[0]
    pairs, groups = (rows + 15) // 16, (cols + 63) // 64
    xp = torch.zeros((m + 15) // 16 * 16, groups * 64, dtype=torch.float64)
    xp[:m, :cols] = x.double()
    y = torch.zeros(xp.shape[0], pairs * 16, dtype=torch.float64)
    halves = torch.stack([frags & 0xFFFF, (frags >> 16) & 0xFFFF], dim=-1).to(torch.int16)
    b_values = halves.view(torch.bfloat16).double()  # [record, step, band, lane, reg, half]
    for r in range(frags.shape[0]):
        pair, group = divmod(r, groups)
        for step in range(4):
            a_logical = torch.zeros(xp.shape[0], 16, dtype=torch.float64)
            for lane in range(32):
                for (reg, half), (row, k) in ptx_a_positions(lane).items():
                    # a0/a1 hold logical k < 8 (reg 0 of the permutation), a2/a3 logical k >= 8 (reg 1).
                    col = 64 * group + 16 * step + physical_column(lane, reg // 2, half)
                    a_logical[row::16, k] = xp[row::16, col]
            for band in range(2):
                b_logical = torch.zeros(16, 8, dtype=torch.float64)
                for lane in range(32):
                    for (reg, half), (k, n) in ptx_b_positions(lane).items():
                        b_logical[k, n] = b_values[r, step, band, lane, reg, half]
                cols_out = slice(16 * pair + 8 * band, 16 * pair + 8 * band + 8)
                y[:, cols_out] += a_logical @ b_logical
    return y[:m, :rows]


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 128])
@pytest.mark.parametrize("shape,density", [((24, 72), 0.5), ((13, 130), 0.3), ((40, 200), 0.9), ((16, 64), 1.0)])
def test_lane_product_matches_float64_reference(m, shape, density):
    rows, cols = shape
    gen = make_generator("stream-product", m, shape, density)
    dense = random_weight(rows, cols, density, gen)
    x = torch.randn(m, cols, generator=gen).to(torch.bfloat16)
    got = emulated_product(fragments(*relayout(dense)), x, rows, cols)
    want = x.double() @ dense.double().t()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_warp_scan_is_an_inclusive_prefix_sum():
    gen = make_generator("stream-scan")
    for _ in range(20):
        values = torch.randint(0, 1 << 10, (32,), generator=gen)
        assert _native._C.stream_warp_scan(values.tolist()) == torch.cumsum(values, 0).tolist()


def test_single_element_walks_every_position():
    # One nonzero at a time in a full group of a band pair: exactly one lane/register/half holds it.
    for row in range(16):
        for col in range(0, 64, 5):
            dense = torch.zeros(16, 64, dtype=torch.bfloat16)
            dense[row, col] = 3.0
            out = assemble_weight(fragments(*relayout(dense)), 16, 64)
            assert torch.equal(out, dense.view(torch.int16).to(torch.int64) & 0xFFFF)


def test_bad_arguments_are_refused():
    dense = random_weight(16, 64, 0.5, make_generator("stream-bad"))
    bitmap, values, offsets = reference.bitmap_encode(dense)
    with pytest.raises(ValueError, match="stream_relayout: offsets and bitmap run past the end of values"):
        _native._C.stream_relayout(bitmap.numpy().tobytes(), values[:-1].view(torch.int16).numpy().tobytes(),
                                   offsets.numpy().tobytes(), 16, 64)
    with pytest.raises(ValueError, match="stream_relayout: bitmap / offsets do not match"):
        _native._C.stream_relayout(bitmap.numpy().tobytes(), b"", offsets.numpy().tobytes(), 24, 64)
    record_offsets, records = relayout(dense)
    with pytest.raises(ValueError, match="stream_fragments: record 0 is shorter"):
        _native._C.stream_fragments([0, HEADER_BYTES], records[:HEADER_BYTES])


def test_activation_blocks_give_each_lane_its_a_registers():
    # Lane (g, t) loads 16 bytes at quad 32 s + 8 t + g of the block: halves 2 reg + half must be
    # A register `reg` of mma.m16n8k16 at the permuted column of step s.
    index = torch.tensor(_native._C.stream_x_block_indices()).reshape(16, 64)
    assert sorted(index.flatten().tolist()) == list(range(16 * 64))
    for step in range(4):
        for lane in range(32):
            quad = 32 * step + 8 * (lane % 4) + lane // 4
            for (reg, half), (row, k) in ptx_a_positions(lane).items():
                col = 16 * step + physical_column(lane, reg // 2, half)
                assert index[row, col] == 8 * quad + 2 * reg + half


def test_activation_staging_permutation_matches_the_block_layout():
    # cuda/stream_gemm.cu stages x with view [tiles, 2, 8, groups, 4, 4, 2, 2] and this permute.
    tiles, groups = 2, 3
    x = torch.arange(tiles * 16 * groups * 64).reshape(tiles * 16, groups * 64)
    staged = x.view(tiles, 2, 8, groups, 4, 4, 2, 2).permute(0, 3, 4, 5, 2, 6, 1, 7).reshape(tiles, groups, 1024)
    index = torch.tensor(_native._C.stream_x_block_indices()).reshape(16, 64)
    for tile in range(tiles):
        for group in range(groups):
            block = x[16 * tile:16 * tile + 16, 64 * group:64 * group + 64]
            assert torch.equal(staged[tile, group][index], block)
