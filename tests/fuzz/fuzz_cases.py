"""Hypothesis strategies and the float64 oracle of the op fuzz suite (test_fuzz_ops.py says what is
checked and how to run the profiles).

Bulk tensor contents come from a torch generator seeded by a drawn integer (fast); everything a
failure depends on in an interesting way (shape, dtype, density, scale, where the specials go) is
drawn by hypothesis, so it shrinks.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings, strategies as st


# ---- profiles --------------------------------------------------------------------------------
# "ci": the default in the normal test run (bounded: ~100 cases per op and ISA path, small shapes).
# "long": 10,000 cases per op and ISA path; select with SALR_FUZZ_PROFILE=long.
# SALR_FUZZ_EXAMPLES=N overrides the count of either.
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, **_COMMON)
settings.register_profile("long", max_examples=10_000, **_COMMON)
PROFILE = os.environ.get("SALR_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"SALR_FUZZ_PROFILE: must be 'ci' or 'long', got {PROFILE!r}")
FUZZ_SETTINGS = settings(settings.get_profile(PROFILE),
                         max_examples=int(os.environ.get("SALR_FUZZ_EXAMPLES", "0")) or settings.get_profile(PROFILE).max_examples)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_MAX = torch.finfo(torch.float32).max
FP32_TINY = torch.finfo(torch.float32).smallest_normal
SPECIAL_KINDS = ("nan", "+inf", "-inf", "subnormal", "-subnormal", "max", "-max", "half_max")


@st.composite
def int8_adapters(draw, rows: int, cols: int):
    """An int8 adapter for sparse_lowrank_gemm: (q_a [R, cols], q_b [rows, R], adapter_scales [rows]), q in
    ±127 (R up to 40), the scales' magnitude 2^-50 to 2^30 (the specials come from x and bias)."""
    rank = draw(st.integers(0, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q_a = torch.randint(-127, 128, (rank, cols), generator=gen, dtype=torch.int8)
    q_b = torch.randint(-127, 128, (rows, rank), generator=gen, dtype=torch.int8)
    log2 = draw(st.sampled_from([-7, -7, -50, 30]))
    return q_a, q_b, ((torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5) * 2.0**log2).float()


def _put(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@contextmanager
def env(**values: str | None):
    """Set (or, with None, unset) environment variables for the block: the ISA and crossover switches
    the kernels read on every call (monkeypatch is function-scoped, which @given cannot share)."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            _put(k, v)
        yield
    finally:
        for k, v in saved.items():
            _put(k, v)


# ---- drawn tensor descriptions ---------------------------------------------------------------

@dataclass(frozen=True)
class Fill:
    """How to fill one tensor: normal values times 2**log2_scale, then specials at given places."""
    seed: int
    log2_scale: int
    specials: tuple[tuple[float, str], ...]  # (position in [0, 1) of the flat tensor, kind)


def special_value(kind: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf,
            "subnormal": info.smallest_normal / 4, "-subnormal": -info.smallest_normal / 4,
            "max": info.max, "-max": -info.max, "half_max": info.max / 2}[kind]


def scales(dtype: torch.dtype) -> st.SearchStrategy[int]:
    """Power-of-two scales that keep most cases finite but reach tiny and very large magnitudes."""
    extreme = 5 if dtype == torch.float16 else 50
    return st.sampled_from([0, 0, 0, -extreme, extreme, -2 * extreme])


@st.composite
def fills(draw, dtype: torch.dtype, allow_specials: bool = True) -> Fill:
    specials = ()
    if allow_specials and draw(st.integers(0, 3)) == 0:  # a quarter of the tensors carry specials
        specials = tuple(draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIAL_KINDS)),
                                       min_size=1, max_size=3)))
    return Fill(draw(st.integers(0, 2**31 - 1)), draw(scales(dtype)), specials)


def materialize(fill: Fill, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(fill.seed)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 ** fill.log2_scale).to(dtype)
    flat = t.view(-1)
    for where, kind in fill.specials:
        if flat.numel():
            flat[int(where * flat.numel())] = special_value(kind, dtype)
    return t


def sparse_dense(fill: Fill, rows: int, cols: int, density: float, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] weight with exact zeros at about (1 - density) of the places (specials survive)."""
    w = materialize(fill, (rows, cols), dtype)
    keep = torch.rand(rows, cols, generator=torch.Generator().manual_seed(fill.seed + 1)) < density
    for where, _ in fill.specials:  # a drawn special is meant to be stored
        if w.numel():
            keep.view(-1)[int(where * w.numel())] = True
    return torch.where(keep, w, torch.zeros((), dtype=dtype))


# Leading batch dims of x / grad_out: () is a 1-D input, sizes include 0 and 1.
lead_dims = st.lists(st.sampled_from([0, 1, 1, 2, 3, 5, 17]), min_size=0, max_size=3).map(tuple)
# N and K: empty, tiny, not multiples of 8, one/two 64-column groups, and exact tiles.
extents = st.one_of(st.integers(0, 20), st.integers(21, 140), st.sampled_from([8, 16, 64, 128]))
densities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1))
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` with another memory layout (the kernels must not care)."""
    if t.dim() == 0:
        return t
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded" and t.dim() >= 2 and t.shape[0] == 1:
        return t.expand(3, *t.shape[1:])  # stride 0 on the first dim (the oracle sees the same expand)
    return t


# ---- the oracle ------------------------------------------------------------------------------

def finite_abs(t: torch.Tensor) -> torch.Tensor:
    a = t.double().abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=torch.float64))


def sparse_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] · wᵀ [K, N] in float64 summing only over stored entries (w != 0): a pruned weight is
    absent, so a non-finite x there adds nothing (where IEEE would give 0·inf = NaN)."""
    if torch.isfinite(x).all():
        return x @ w.T
    stored = (w != 0).unsqueeze(0)
    products = x.unsqueeze(1) * w.unsqueeze(0)  # [M, N, K]
    return torch.where(stored, products, torch.zeros((), dtype=torch.float64)).sum(-1)


def flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(t.dtype).smallest_normal
    return torch.where(t.abs() < tiny, torch.zeros((), dtype=t.dtype), t)


def admissible(out: torch.Tensor, readings: list[tuple[torch.Tensor, torch.Tensor]], bound: torch.Tensor,
               may_overflow: torch.Tensor) -> torch.Tensor:
    """Elementwise: does `out` agree with one of the admissible results?

    readings: (dense, sparse) float64 results per admissible reading of the inputs. `dense` is the
    IEEE product with the decoded weight (salr.reference), `sparse` skips pruned weights; they differ
    only where a non-finite x meets a pruned zero, and there `out` may be either (the dense one is
    then NaN). Agreement: both NaN, the same infinity, or both finite within `bound`. Where
    `may_overflow` holds, a non-finite `out` is admissible too (fp32 accumulation has the right to
    overflow once the sum of |products| nears the largest finite).
    """
    o = out.double()
    ok = may_overflow & ~torch.isfinite(o)
    for dense, sparse in readings:
        for ref in (dense, sparse):
            ok |= torch.isnan(o) & torch.isnan(ref)
            ok |= torch.isinf(ref) & (o == ref)
            ok |= torch.isfinite(ref) & torch.isfinite(o) & ((o - ref).abs() <= bound)
    return ok


def describe_mismatch(out: torch.Tensor, ok: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> str:
    bad = (~ok).nonzero()
    first = tuple(bad[0].tolist())
    return (f"{len(bad)} of {ok.numel()} outputs disagree with the reference; first at {first}: got "
            f"{out[first].item()!r}, reference {ref[first].item()!r}, bound {bound[first].item():.3g}")
