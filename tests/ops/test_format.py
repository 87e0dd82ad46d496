"""BM8x8 encode/decode: exact against the reference, the index overhead bound, BitmapSparseWeight
and its safetensors files."""

from __future__ import annotations

import json

import pytest
import torch

from salr import BitmapSparseWeight, ops, reference
from conftest import DENSITIES, DTYPES, SHAPES, make_generator, random_sparse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_encode_matches_reference_and_round_trips(isa, shape, density, dtype):
    dense = random_sparse(*shape, density, dtype, make_generator(shape, density, dtype))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    ref_bitmap, ref_values, ref_offsets = reference.bitmap_encode(dense)
    assert torch.equal(bitmap, ref_bitmap)
    assert torch.equal(values, ref_values)
    assert torch.equal(offsets, ref_offsets)
    assert values.numel() == int((dense != 0).sum())
    assert torch.equal(ops.bitmap_decode(bitmap, values, offsets, *shape), dense)


def test_bitmap_layout_is_the_documented_one():
    dense = torch.zeros(10, 70)
    dense[0, 0] = 1.0    # band 0, tile 0, bit 0
    dense[7, 7] = 2.0    # band 0, tile 0, bit 63 (the sign bit of the int64 word)
    dense[9, 66] = 3.0   # band 1, tile 8 (second 64-column group), bit 1*8 + 2
    bitmap, values, offsets = ops.bitmap_encode(dense)
    assert bitmap.shape == (2, 9)
    assert bitmap[0, 0].item() == 1 - 2**63
    assert bitmap[1, 8].item() == 1 << 10
    assert values.tolist() == [1.0, 2.0, 3.0]
    # (band, group) starts: (0,0)=0 (0,1)=2 (1,0)=2 (1,1)=2, then the count 3
    assert offsets.tolist() == [0, 2, 2, 2, 3]


def test_negative_zero_is_zero_and_nan_is_a_value():
    dense = torch.tensor([[-0.0, float("nan"), 1.0, 0.0]])
    _, values, _ = ops.bitmap_encode(dense)
    assert values.numel() == 2 and torch.isnan(values[0]) and values[1] == 1.0


def test_encode_accepts_non_contiguous_input():
    dense = random_sparse(40, 24, 0.5, torch.float32, make_generator("nc"))
    encoded = ops.bitmap_encode(dense.T)
    assert torch.equal(ops.bitmap_decode(*encoded, 24, 40), dense.T)


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (1536, 576),
                                   (576, 1536), (49152, 576)])
def test_index_overhead_is_at_most_0_135_bytes_per_weight(shape):
    rows, cols = shape
    index_bytes = reference.num_bands(rows) * reference.tiles_per_band(cols) * 8 + reference.num_offsets(rows, cols) * 4
    assert index_bytes / (rows * cols) <= 0.135
    if rows * cols <= 1536 * 576:  # and the real encoder agrees with the formula
        weight = BitmapSparseWeight.from_dense(random_sparse(rows, cols, 0.5, torch.bfloat16, make_generator(shape)))
        assert weight.index_bytes == index_bytes
        assert weight.bytes_per_weight() == pytest.approx(2 * weight.density + index_bytes / (rows * cols))


def test_sparse_weight_value_type():
    dense = random_sparse(30, 50, 0.3, torch.float32, make_generator("vt"))
    weight = BitmapSparseWeight.from_dense(dense)
    assert weight.shape == (30, 50) and weight.dtype == torch.float32 and weight.device.type == "cpu"
    assert weight.nnz == int((dense != 0).sum())
    assert weight.density == pytest.approx(weight.nnz / 1500)
    assert torch.equal(weight.to_dense(), dense)
    bf16 = weight.to(dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.to_dense(), dense.to(torch.bfloat16))
    tiny = BitmapSparseWeight.from_dense(torch.tensor([[1e-30, 1.0]])).to(dtype=torch.float16)
    assert tiny.nnz == 1, "a value that underflows in the cast must leave the bitmap"
    x = torch.randn(3, 50)
    torch.testing.assert_close(weight.linear(x), x @ dense.T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip(tmp_path, dtype):
    weight = BitmapSparseWeight.from_dense(random_sparse(37, 90, 0.4, dtype, make_generator("io", dtype)))
    path = tmp_path / "w.safetensors"
    weight.save(path)
    loaded = BitmapSparseWeight.load(path)
    assert loaded.shape == weight.shape and loaded.dtype == dtype
    for name in ("bitmap", "values", "offsets"):
        assert torch.equal(getattr(loaded, name), getattr(weight, name))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"], "no temp file left behind"


def test_load_refuses_truncated_and_tampered_files(tmp_path):
    weight = BitmapSparseWeight.from_dense(random_sparse(16, 64, 0.5, torch.float32, make_generator("bad")))
    path = tmp_path / "w.safetensors"
    weight.save(path)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        BitmapSparseWeight.load(tmp_path / "cut.safetensors")
    # Flip a bit in the bitmap (the first tensor's data follows the JSON header).
    header_len = int.from_bytes(raw[:8], "little")
    bitmap_offsets = json.loads(raw[8:8 + header_len])["bitmap"]["data_offsets"]
    bitmap_start = 8 + header_len + bitmap_offsets[0]
    tampered = bytearray(raw)
    tampered[bitmap_start] ^= 0x01
    (tmp_path / "flip.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="flip.safetensors: the contents do not match the file's 'sha256'"):
        BitmapSparseWeight.load(tmp_path / "flip.safetensors")
    with pytest.raises(ValueError, match="not a salr BM8x8 file"):
        from safetensors.torch import save_file
        save_file({"bitmap": weight.bitmap}, str(tmp_path / "other.safetensors"))
        BitmapSparseWeight.load(tmp_path / "other.safetensors")


def test_value_type_rejects_bad_construction():
    with pytest.raises(ValueError, match="values must be"):
        BitmapSparseWeight(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32),
                           torch.zeros(2, dtype=torch.int32), 8, 8)
    with pytest.raises(ValueError, match="bitmap shape"):
        BitmapSparseWeight(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(0), torch.zeros(2, dtype=torch.int32), 8, 8)
    with pytest.raises(ValueError, match="2-D"):
        BitmapSparseWeight.from_dense(torch.zeros(3))
