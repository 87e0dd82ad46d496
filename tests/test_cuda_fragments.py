"""The CUDA forward kernel's register decode, checked on the host: every lane of a warp assembles
its mma.m16n8k16 A fragment through the same helper the kernel calls (salr._C.mma_a_fragments ->
format::a_fragment_k16), and the 16x16 matrices put together from the 32 lanes, at the positions
the PTX ISA gives each lane, must equal the reference's dense weight. Runs without a GPU."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import _native, reference
from conftest import make_generator

pytestmark = pytest.mark.skipif(_native._C is None or not hasattr(_native._C, "mma_a_fragments"),
                                reason=salr.native_error() or "native module without mma_a_fragments")

DENSITIES = [0.0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 1.0]


def ptx_a_fragment_positions(lane: int):
    """(register, half) -> (row, column) inside the 16x16 A tile, as the PTX ISA lays out
    mma.m16n8k16 for 16-bit types: written out independently of the C++ helpers."""
    group, thread_in_group = lane // 4, lane % 4
    positions = {}
    for reg in range(4):
        row = group + (8 if reg in (1, 3) else 0)
        col = thread_in_group * 2 + (8 if reg in (2, 3) else 0)
        for half in range(2):
            positions[(reg, half)] = (row, col + half)
    return positions


def random_band_pair(density: float, gen: torch.Generator, cols: int = 64) -> torch.Tensor:
    """A [16, 64] integer matrix: nonzero 16-bit patterns at a `density` fraction of positions."""
    vals = torch.randint(1, 1 << 16, (16, 64), generator=gen, dtype=torch.int64)
    keep = torch.rand(16, 64, generator=gen) < density
    dense = torch.where(keep, vals, torch.zeros_like(vals))
    dense[:, cols:] = 0
    return dense


def assemble(dense: torch.Tensor) -> torch.Tensor:
    """Runs the host decode on dense's encoding and rebuilds the [16, 64] matrix lane by lane."""
    bitmap, values, offsets = reference.bitmap_encode(dense)
    assert bitmap.shape == (2, 8) and offsets.tolist()[0] == 0
    words = bitmap.reshape(-1).tolist()
    fragments = _native._C.mma_a_fragments(words, values.tolist(), (offsets[0].item(), offsets[1].item()))
    out = torch.full((16, 64), -1, dtype=torch.int64)
    for step in range(4):
        for lane in range(32):
            regs = fragments[step][lane]
            for (reg, half), (row, col) in ptx_a_fragment_positions(lane).items():
                value = (regs[reg] >> (16 * half)) & 0xFFFF
                assert out[row, 16 * step + col] == -1, "two lanes claim one element"
                out[row, 16 * step + col] = value
    return out


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("trial", range(6))
def test_lanes_assemble_the_dense_tiles(density, trial):
    dense = random_band_pair(density, make_generator("frag", density, trial))
    out = assemble(dense)
    assert (out >= 0).all(), "some element of the 16x64 block has no lane"
    assert torch.equal(out, dense)


def test_uneven_bands_and_partial_group():
    # Top band full, bottom band empty, then the reverse; and a group only 5 tiles wide (K = 40):
    # the missing tiles' words are zero, as the kernel zero-fills them.
    gen = make_generator("frag-uneven")
    for top, bottom in [(1.0, 0.0), (0.0, 1.0), (0.97, 0.03)]:
        dense = torch.cat([random_band_pair(top, gen)[:8], random_band_pair(bottom, gen)[8:]])
        assert torch.equal(assemble(dense), dense)
    dense = random_band_pair(0.6, gen, cols=40)
    assert torch.equal(assemble(dense), dense)


def test_single_element_walks_every_position():
    # One nonzero at a time: its value must reach exactly one lane, register and half.
    for row in range(16):
        for col in range(0, 64, 7):
            dense = torch.zeros(16, 64, dtype=torch.int64)
            dense[row, col] = 0xBEEF
            assert torch.equal(assemble(dense), dense)


def test_rejects_values_too_short():
    words = [-1] * 16  # every bit set: 512 values per band needed
    with pytest.raises(ValueError, match="past the end of values"):
        _native._C.mma_a_fragments(words, [1] * 100, (0, 0))
