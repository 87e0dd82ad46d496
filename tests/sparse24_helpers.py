"""Helpers of the 2:4 tests (tests/test_cuda_24*.py): random 2:4 weights, and the mma.sp.m16n8k32
tile layout of cpp/sparse24_layout.h written independently from the PTX ISA's description
(sparse matrix storage, the sparse m16n8k32 f16/bf16 A fragment = the dense m16n8k16 one over the 16
compressed columns, metadata figure for m16n8k32 f16/bf16 with sparsity selector 0)."""

from __future__ import annotations

import torch

TILE_ROWS, TILE_COLS, TILE_HALVES = 16, 32, 288


def random_2to4(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator, max_kept: int = 2) -> torch.Tensor:
    """A [rows, cols] weight with 0..max_kept nonzeros at random positions of every aligned 4-column
    chunk of every row (the last, partial chunk included)."""
    cols4 = -(-cols // 4) * 4
    scores = torch.rand(rows, cols4 // 4, 4, generator=gen)
    kept = torch.randint(0, max_kept + 1, (rows, cols4 // 4, 1), generator=gen)
    rank = scores.argsort(-1).argsort(-1)  # a random permutation of 0..3 per chunk
    mask = (rank < kept).reshape(rows, cols4)[:, :cols]
    dense = torch.randn(rows, cols, generator=gen) + 0.5  # no value near zero
    return torch.where(mask, dense, torch.zeros_like(dense)).to(dtype)


def bits_of(dense: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of a bf16 / fp16 tensor as int64 (an int64 tensor passes through)."""
    if dense.dtype == torch.int64:
        return dense
    return dense.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _kept_columns(chunk: list[int]) -> list[int]:
    """The two positions mma.sp reads from a 4-wide chunk: its nonzeros, topped up with the lowest
    zero positions, ascending (so the two indices differ)."""
    nonzero = [i for i in range(4) if chunk[i] != 0]
    assert len(nonzero) <= 2, "not a 2:4 chunk"
    free = [i for i in range(4) if chunk[i] == 0]
    return sorted(nonzero + free[: 2 - len(nonzero)])


def isa_tiles(dense_bits: torch.Tensor) -> list[int]:
    """The tile stream of a [rows, cols] matrix of 16-bit patterns, from the ISA's description."""
    rows, cols = dense_bits.shape
    blocks_m, blocks_k = -(-rows // TILE_ROWS), -(-cols // TILE_COLS)
    padded = torch.zeros(blocks_m * TILE_ROWS, blocks_k * TILE_COLS, dtype=torch.int64)
    padded[:rows, :cols] = dense_bits
    out: list[int] = []
    for p in range(blocks_m):
        for q in range(blocks_k):
            tile = padded[p * 16:(p + 1) * 16, q * 32:(q + 1) * 32].tolist()
            compressed = [[0] * 16 for _ in range(16)]  # the 16x16 A operand of the ISA
            meta = [[0] * 8 for _ in range(16)]  # 4 bits per (row, chunk)
            for r in range(16):
                for c in range(8):
                    chunk = tile[r][4 * c:4 * c + 4]
                    lo, hi = _kept_columns(chunk)
                    compressed[r][2 * c], compressed[r][2 * c + 1] = chunk[lo], chunk[hi]
                    meta[r][c] = lo | (hi << 2)
            operand = []
            for lane in range(32):
                group, tig = lane // 4, lane % 4
                for reg in range(4):  # m16n8k16 A: a0 (g, 2t), a1 (g+8, 2t), a2 (g, 2t+8), a3 (g+8, 2t+8)
                    row = group + (8 if reg in (1, 3) else 0)
                    col = 2 * tig + (8 if reg in (2, 3) else 0)
                    operand += [compressed[row][col], compressed[row][col + 1]]
            words = []
            for lane in range(32):
                group, tig = lane // 4, lane % 4
                if tig >= 2:  # sparsity selector 0: threads 0 and 1 of each group give metadata
                    continue
                # thread 0: columns 0-15 (chunks 0-3), thread 1: columns 16-31; row g in bits
                # 15..0, row g+8 in bits 31..16
                word = 0
                for j in range(4):
                    word |= meta[group][4 * tig + j] << (4 * j)
                    word |= meta[group + 8][4 * tig + j] << (16 + 4 * j)
                words += [word & 0xFFFF, word >> 16]
            out += operand + words
    return out


def tile_registers(tiles: list[int], index: int):
    """(a[lane][reg] as (low, high) 16-bit pairs, metadata word of each lane with selector 0)."""
    tile = tiles[index * TILE_HALVES:(index + 1) * TILE_HALVES]
    regs = [[(tile[8 * lane + 2 * r], tile[8 * lane + 2 * r + 1]) for r in range(4)] for lane in range(32)]
    words = [tile[256 + 2 * i] | (tile[256 + 2 * i + 1] << 16) for i in range(16)]
    meta = {4 * (i // 2) + i % 2: words[i] for i in range(16)}
    return regs, meta


def lane_a_matrix(regs, meta) -> dict[tuple[int, int], int]:
    """What the warp's registers put where in the dense 16x32 A: (row, column) -> 16-bit pattern,
    read the way the hardware does (each lane's compressed pair placed by its metadata bits)."""
    out = {}
    for lane in range(32):
        group, tig = lane // 4, lane % 4
        for reg in range(4):
            row = group + (8 if reg in (1, 3) else 0)
            chunk = tig + (4 if reg in (2, 3) else 0)
            owner = 4 * group + chunk // 4  # the lane whose metadata covers this chunk
            bits = (meta[owner] >> (16 * (row >= 8) + 4 * (chunk % 4))) & 0xF
            for slot in range(2):
                out[(row, 4 * chunk + ((bits >> (2 * slot)) & 3))] = regs[lane][reg][slot]
    return out


def dense_from_tiles(tiles: list[int], rows: int, cols: int) -> torch.Tensor:
    """The [rows, cols] matrix of 16-bit patterns the tile stream encodes."""
    blocks_m, blocks_k = -(-rows // TILE_ROWS), -(-cols // TILE_COLS)
    out = torch.zeros(blocks_m * 16, blocks_k * 32, dtype=torch.int64)
    for p in range(blocks_m):
        for q in range(blocks_k):
            for (r, c), v in lane_a_matrix(*tile_registers(tiles, p * blocks_k + q)).items():
                out[p * 16 + r, q * 32 + c] = v
    return out[:rows, :cols]
