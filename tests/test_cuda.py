"""Every salr op on CUDA against the float64 reference: random and awkward shapes (M = 0 and 1,
N / K off multiples of 8 and 64, split-K, leading dims), densities 0-100%, adapters, bias, both
GEMM paths (mma kernel and decode + cuBLAS), opcheck and autograd. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops, reference
from conftest import TOLERANCE, assert_matches_reference, make_generator, random_sparse


def _cuda_kernels_present() -> bool:
    return salr.native_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "salr::sparse_lowrank_gemm", "CUDA")


pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _cuda_kernels_present()),
                                reason="needs a CUDA GPU and salr built with its CUDA kernels")

DEV = "cuda"
HALF_DTYPES = [torch.bfloat16, torch.float16]
ALL_DTYPES = list(TOLERANCE)
# (out_features, in_features): tiny, off multiples of 8 / 64, one band pair, odd band counts,
# many groups (split-K with > 64 groups per band), LLaMA-like width.
SHAPES = [(1, 1), (7, 9), (8, 8), (13, 70), (16, 64), (24, 200), (100, 130), (72, 4104), (40, 8200), (576, 192)]
DENSITIES = [0.0, 0.5, 0.9, 1.0]
KERNEL_ROWS = [0, 1, 5, 8, 9, 16, 17, 40]  # n8 tile edges, 16-token block edges, several y-blocks


def encode_on(dense: torch.Tensor):
    return ops.bitmap_encode(dense.to(DEV))


def gemm_case(rows, cols, density, dtype, m, rank, with_bias, key, lead=()):
    gen = make_generator(*key)
    dense = random_sparse(rows, cols, density, dtype, gen)
    x = torch.randn(*lead, m, cols, generator=gen).to(dtype)
    a = torch.randn(rank, cols, generator=gen).to(dtype) if rank else None
    b = (torch.randn(rows, rank, generator=gen) / 4).to(dtype) if rank else None
    bias = torch.randn(rows, generator=gen).to(dtype) if with_bias else None
    return dense, x, a, b, bias


def check_gemm(dense, x, a, b, bias, dtype):
    rows, cols = dense.shape
    bitmap, values, offsets = encode_on(dense)
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    out = ops.sparse_lowrank_gemm(x.to(DEV), bitmap, values, offsets, rows, cols, to(a), to(b), to(bias))
    assert out.device.type == "cuda" and out.shape == (*x.shape[:-1], rows)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    bm, vals, offs = bitmap.cpu(), values.cpu(), offsets.cpu()
    ref = reference.sparse_lowrank_gemm(x.double(), bm, vals.double(), offs, rows, cols, d(a), d(b), d(bias))
    magnitude = x.double().abs() @ dense.double().abs().T
    if a is not None:
        magnitude = magnitude + (x.double().abs() @ a.double().abs().T) @ b.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    assert_matches_reference(out.cpu(), ref, magnitude, dtype)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gemm_mma_path(dtype, shape, density):
    for m in KERNEL_ROWS:
        for rank, with_bias in [(0, False), (5, True), (32, False)]:
            check_gemm(*gemm_case(*shape, density, dtype, m, rank, with_bias, ("mma", shape, density, dtype, m, rank)),
                       dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(13, 70), (100, 130), (576, 192)])
def test_gemm_dense_path(dtype, shape, monkeypatch):
    monkeypatch.setenv("SALR_CUDA_DENSE_CROSSOVER", "2")  # every M >= 2 decodes + cuBLAS
    for m in [2, 64, 100]:
        for rank, with_bias in [(0, False), (0, True), (7, True)]:
            check_gemm(*gemm_case(*shape, 0.5, dtype, m, rank, with_bias, ("dense", shape, dtype, m, rank)), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_gemm_default_dispatch_and_fp32(dtype):
    # fp32 always decodes + cuBLAS; bf16/fp16 switch paths at the crossover (M = 100 is above it).
    for m in [1, 3, 100]:
        check_gemm(*gemm_case(100, 130, 0.5, dtype, m, 7, True, ("default", dtype, m)), dtype)


def test_leading_dims_non_contiguous_and_unaligned():
    dtype = torch.bfloat16
    dense, x, a, b, bias = gemm_case(40, 72, 0.5, dtype, 3, 4, True, ("lead",), lead=(2,))
    check_gemm(dense, x, a, b, bias, dtype)
    bitmap, values, offsets = encode_on(dense)
    xs = torch.randn(3, 144, generator=make_generator("xs")).to(dtype)[:, ::2]  # inner stride 2
    out = ops.sparse_lowrank_gemm(xs.to(DEV), bitmap, values, offsets, 40, 72)
    torch.testing.assert_close(out.float().cpu(), (xs.float() @ dense.float().T), rtol=2e-2, atol=2e-2)
    x_odd = torch.randn(1, 73, generator=make_generator("xo")).to(dtype).to(DEV)[:, 1:]  # 2-byte offset
    out = ops.sparse_lowrank_gemm(x_odd, bitmap, values, offsets, 40, 72)
    torch.testing.assert_close(out.float().cpu(), x_odd.float().cpu() @ dense.float().T, rtol=2e-2, atol=2e-2)
    shifted = torch.cat([values[:1], values]).narrow(0, 1, values.numel())  # values view at a 2-byte offset
    out = ops.sparse_lowrank_gemm(x_odd, bitmap, shifted, offsets, 40, 72)
    torch.testing.assert_close(out.float().cpu(), x_odd.float().cpu() @ dense.float().T, rtol=2e-2, atol=2e-2)
    empty = ops.sparse_lowrank_gemm(torch.empty(0, 5, 72, dtype=dtype, device=DEV), bitmap, values, offsets, 40, 72)
    assert empty.shape == (0, 5, 40)


def test_zero_sized_weights():
    for rows, cols in [(0, 5), (5, 0), (0, 0)]:
        bitmap, values, offsets = encode_on(torch.zeros(rows, cols, dtype=torch.bfloat16))
        bias = torch.randn(rows, dtype=torch.bfloat16, device=DEV)
        out = ops.sparse_lowrank_gemm(torch.randn(3, cols, dtype=torch.bfloat16, device=DEV), bitmap, values,
                                      offsets, rows, cols, bias=bias)
        torch.testing.assert_close(out, bias.expand(3, rows))
        dx = ops.sparse_gemm_transposed(torch.randn(3, rows, dtype=torch.bfloat16, device=DEV), bitmap, values,
                                        offsets, rows, cols)
        assert dx.shape == (3, cols) and (dx == 0).all()


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_encode_matches_cpu_and_decode_round_trips(dtype, shape, density):
    dense = random_sparse(*shape, density, dtype, make_generator("enc", shape, density, dtype))
    dense[0, 0] = -0.0 if density < 1 else dense[0, 0]  # -0 is a zero
    cpu = reference.bitmap_encode(dense)
    gpu = encode_on(dense)
    for want, got in zip(cpu, gpu):
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), want)
    decoded = ops.bitmap_decode(*gpu, *shape)
    assert torch.equal(decoded.cpu(), dense)


def test_decode_rejects_inconsistent_weight_and_gemm_stays_in_bounds():
    dense = random_sparse(20, 70, 0.5, torch.bfloat16, make_generator("bad"))
    bitmap, values, offsets = encode_on(dense)
    bad = bitmap.clone()
    bad[1, 2] ^= 1  # one bit more or less than offsets says
    with pytest.raises(RuntimeError, match=r"bitmap_decode: bitmap, values and offsets are inconsistent at band 1"):
        ops.bitmap_decode(bad, values, offsets, 20, 70)
    with pytest.raises(RuntimeError, match=r"offsets\[-1\] must equal the number of values"):
        ops.bitmap_decode(bitmap, values[:-1], offsets, 20, 70)
    # The GEMM does not sync to check; garbage in, garbage out, but no fault.
    full = torch.full_like(bitmap, -1)
    x = torch.randn(4, 70, dtype=torch.bfloat16, device=DEV)
    ops.sparse_lowrank_gemm(x, full, values, offsets, 20, 70)
    torch.cuda.synchronize()


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_transposed_and_sampled_products(dtype, shape, density):
    rows, cols = shape
    dense = random_sparse(rows, cols, density, dtype, make_generator("tp", shape, density, dtype))
    bitmap, values, offsets = encode_on(dense)
    bm, offs = bitmap.cpu(), offsets.cpu()
    for m in [1, 17, 64]:
        dy = torch.randn(m, rows, generator=make_generator("dy", m)).to(dtype)
        out = ops.sparse_gemm_transposed(dy.to(DEV), bitmap, values, offsets, rows, cols)
        ref = reference.sparse_gemm_transposed(dy.double(), bm, values.cpu().double(), offs, rows, cols)
        assert_matches_reference(out.cpu(), ref, dy.double().abs() @ dense.double().abs(), dtype)
    for inner in [1, 33]:
        left = torch.randn(inner, rows, generator=make_generator("l", inner)).to(dtype)
        right = torch.randn(inner, cols, generator=make_generator("r", inner)).to(dtype)
        out = ops.sampled_gemm(left.to(DEV), right.to(DEV), bitmap, values, offsets, rows, cols)
        vals64 = values.cpu().double()
        ref = reference.sampled_gemm(left.double(), right.double(), bm, vals64, offs, rows, cols)
        magnitude = reference.sampled_gemm(left.double().abs(), right.double().abs(), bm, vals64, offs, rows, cols)
        assert out.shape == values.shape and out.dtype == dtype
        assert_matches_reference(out.cpu(), ref, magnitude, dtype)


def test_bad_devices_are_named():
    dense = random_sparse(16, 16, 0.5, torch.bfloat16, make_generator("dev"))
    bitmap, values, offsets = encode_on(dense)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: x must be a CUDA tensor"):
        torch.ops.salr.sparse_lowrank_gemm(torch.randn(2, 16, dtype=torch.bfloat16), bitmap, values, offsets,
                                           16, 16, None, None, None)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bias must be"):
        torch.ops.salr.sparse_lowrank_gemm(torch.randn(2, 16, dtype=torch.bfloat16, device=DEV), bitmap, values,
                                           offsets, 16, 16, None, None, torch.zeros(16, dtype=torch.bfloat16))


def test_shape_errors_name_the_argument():
    # Messages with integers in them, raised from the CUDA glue (nvcc-compiled host code).
    dense = random_sparse(20, 70, 0.5, torch.bfloat16, make_generator("shape-err"))
    bitmap, values, offsets = encode_on(dense)
    x = torch.randn(2, 70, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: x must have shape \[\.\.\., 71\]"):
        torch.ops.salr.sparse_lowrank_gemm(torch.randn(2, 71, dtype=torch.bfloat16, device=DEV), bitmap, values,
                                           offsets, 20, 71, None, None, None)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bitmap must have shape \[3, 10\] for a \[20, 78\]"):
        torch.ops.salr.sparse_lowrank_gemm(torch.randn(2, 78, dtype=torch.bfloat16, device=DEV), bitmap, values,
                                           offsets, 20, 78, None, None, None)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: adapter_b must have shape \[20, 4\]"):
        torch.ops.salr.sparse_lowrank_gemm(x, bitmap, values, offsets, 20, 70, x.new_zeros(4, 70),
                                           x.new_zeros(20, 5), None)
    with pytest.raises(RuntimeError, match=r"sampled_gemm: right must have shape \[3, 70\]"):
        torch.ops.salr.sampled_gemm(x.new_zeros(3, 20), x.new_zeros(4, 70), bitmap, values, offsets, 20, 70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op_on_cuda(dtype):
    rows, cols = 19, 70
    dense = random_sparse(rows, cols, 0.5, dtype, make_generator("opc", dtype)).to(DEV)
    bitmap, values, offsets = ops.bitmap_encode(dense)
    gen = make_generator("opcheck-cuda", dtype)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEV)  # noqa: E731
    x, a, b, bias, grad = rnd(2, 3, cols), rnd(4, cols), rnd(rows, 4), rnd(rows), rnd(5, rows)
    salr_ops = torch.ops.salr
    cases = [
        (salr_ops.bitmap_decode.default, (bitmap, values, offsets, rows, cols)),
        (salr_ops.sparse_lowrank_gemm.default, (x, bitmap, values, offsets, rows, cols, a, b, bias)),
        (salr_ops.sparse_lowrank_gemm.default,
         (x.clone().requires_grad_(), bitmap, values.clone().requires_grad_(), offsets, rows, cols,
          a.clone().requires_grad_(), b.clone().requires_grad_(), bias.clone().requires_grad_())),
        (salr_ops.sparse_gemm_transposed.default, (grad, bitmap, values, offsets, rows, cols)),
        (salr_ops.sampled_gemm.default, (grad, rnd(5, cols), bitmap, values, offsets, rows, cols)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    torch.library.opcheck(salr_ops.bitmap_encode.default, (dense,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
def test_backward_matches_reference(dtype):
    rows, cols, m = 40, 136, 6
    gen = make_generator("bwd", dtype)
    dense = random_sparse(rows, cols, 0.5, dtype, gen)
    bitmap, values, offsets = encode_on(dense)
    x = torch.randn(2, m, cols, generator=gen).to(dtype)
    a = torch.randn(8, cols, generator=gen).to(dtype)
    b = (torch.randn(rows, 8, generator=gen) / 4).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype)
    grad = torch.randn(2, m, rows, generator=gen).to(dtype)
    leaves = [t.detach().to(DEV).clone().requires_grad_() for t in (x, values, a, b, bias)]
    out = ops.sparse_lowrank_gemm(leaves[0], bitmap, leaves[1], offsets, rows, cols, *leaves[2:])
    out.backward(grad.to(DEV))
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (x, values, a, b, bias)]
    ref = reference.sparse_lowrank_gemm(ref_leaves[0], bitmap.cpu(), ref_leaves[1], offsets.cpu(), rows, cols,
                                        *ref_leaves[2:])
    ref.backward(grad.double())
    scale = TOLERANCE[dtype] * 8
    for name, got, want in zip(["x", "values", "adapter_a", "adapter_b", "bias"], leaves, ref_leaves):
        g, w = got.grad.double().cpu(), want.grad
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-6)).item()
        assert err <= scale, f"grad of {name}: relative error {err:.3g} > {scale:.3g}"
