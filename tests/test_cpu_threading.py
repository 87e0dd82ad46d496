"""sparse_lowrank_gemm on both sides of the CPU glue's threading switch (kMinWeightsPerTask = 128K
weights per task, x rows counted): small layers run on the calling thread, larger ones in a parallel
region split across bands. Shapes with ragged row and column tails, with and without adapters."""

from __future__ import annotations

import pytest
import torch

from test_gemm import check_forward, make_case

SERIAL_SHAPES = [(192, 576), (101, 523)]  # < 128K weights at M = 1: no parallel region
PARALLEL_SHAPES = [(1544, 1100), (577, 1531)]  # several tasks of whole bands


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SERIAL_SHAPES + PARALLEL_SHAPES)
def test_forward_both_sides_of_the_threading_switch(isa, dtype, shape):
    for m in (1, 3):
        for rank, with_bias in [(0, False), (80, True)]:
            case = make_case(*shape, 0.5, dtype, m, rank, with_bias, ("threads", shape, dtype, m, rank))
            check_forward(*case, dtype)
