"""sparse_lowrank_gemm on both sides of the CPU glue's threading switches: the bands
(kMinWeightsPerTask = 128K weights per task, x rows counted: small layers run on the calling thread,
larger ones in a parallel region split across bands) and the adapter projection T = x·Aᵀ
(kMinProjectPerTask = 32K multiply-adds per task: A's rows split across the threads, each task
writing its own columns of T). Shapes with ragged row and column tails, with and without adapters,
ranks that split unevenly, and thread counts of 1, 2 and 3 (more threads than this CI machine has
cores still has to be right)."""

from __future__ import annotations

import pytest
import torch

from ops.test_gemm import check_forward, make_case

SERIAL_SHAPES = [(192, 576), (101, 523)]  # < 128K weights at M = 1: no parallel region over bands
PARALLEL_SHAPES = [(1544, 1100), (577, 1531)]  # several tasks of whole bands


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SERIAL_SHAPES + PARALLEL_SHAPES)
def test_forward_both_sides_of_the_threading_switch(isa, threads, dtype, shape):
    for m in (1, 3):
        # rank 80 at these widths: 41K-122K multiply-adds per x row, so T is split at 2 and 3 threads;
        # rank 19 splits into unequal row ranges.
        for rank, with_bias in [(0, False), (80, True), (19, False)]:
            case = make_case(*shape, 0.5, dtype, m, rank, with_bias, ("threads", shape, dtype, m, rank))
            check_forward(*case, dtype)
