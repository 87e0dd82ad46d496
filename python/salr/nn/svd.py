"""The SVD residual adapter of SALR: recover what pruning removed with a rank-r correction.

For a dense weight W [N, K] and its pruned version W_s, the residual R = W − W_s is approximated by
its truncated SVD, R ≈ U_r S_r V_rᵀ, split symmetrically into B = U_r·√S_r [N, r] and
A = √S_r·V_rᵀ [r, K], so that W ≈ W_s + B·A and the layer computes x·W_sᵀ + (x·Aᵀ)·Bᵀ.

By Eckart–Young the rank-r truncation keeps at least the fraction r/min(N, K) of ‖R‖_F² (the top r
of the min(N, K) squared singular values), so the per-entry MSE of the residual falls by at least
the factor (1 − r/min(N, K)).

Options:

* ``method="randomized"``: a randomized range finder (Halko, Martinsson & Tropp 2011) with
  `oversample` extra columns and `power_iters` power iterations, seeded; much cheaper than the full
  SVD for large layers when r ≪ min(N, K).
* activation-aware (``input_scale`` = per-input-feature activation magnitudes s [K]): the SVD of
  R·diag(s) minimises the error weighted by how large each input actually is, ‖(R − BA)·diag(s)‖,
  i.e. the output error on inputs with those magnitudes; A is rescaled by diag(1/s) afterwards.
"""

from __future__ import annotations

import torch

from salr._checks import check_tensor

SVD_METHODS = ("exact", "randomized")


def check_rank(rank: object, rows: int, cols: int, name: str = "rank") -> int:
    """An integer in [1, min(rows, cols)]; ValueError naming `name` otherwise."""
    limit = min(rows, cols)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{name}: expected an integer, got {rank!r}")
    if not 1 <= rank <= limit:
        raise ValueError(f"{name}: must be in [1, min(out_features, in_features)] = [1, {limit}] for a "
                         f"[{rows}, {cols}] weight, got {rank}")
    return rank


def randomized_svd(matrix: torch.Tensor, rank: int, oversample: int = 10, power_iters: int = 4,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-`rank` SVD ``(U [N, r], S [r], Vh [r, K])`` by a randomized range finder.

    Q spans M·Ω for a Gaussian Ω with rank + oversample columns, refined by power iterations
    (re-orthonormalised each time for stability); then the small matrix QᵀM is decomposed exactly.
    """
    check_rank(rank, *check_tensor(matrix, "matrix", dim=2).shape)
    rows, cols = matrix.shape
    width = min(rank + max(0, oversample), rows, cols)
    if generator is None:
        generator = torch.Generator(device=matrix.device).manual_seed(0)
    omega = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    q, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(max(0, power_iters)):
        z, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ z)
    small_u, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ small_u)[:, :rank], s[:rank], vh[:rank]


@torch.no_grad()
def svd_factors(residual: torch.Tensor, rank: int, *, method: str = "exact",
                input_scale: torch.Tensor | None = None, oversample: int = 10, power_iters: int = 4,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors ``(A [r, K], B [N, r])`` with B·A ≈ residual, in fp32.

    `input_scale` [K] turns on the activation-aware variant (SVD of residual·diag(s), then
    A·diag(1/s)); non-positive or tiny scales are clamped to 1e-6·max(s).
    """
    if residual.dim() != 2:
        raise ValueError(f"residual: expected a 2-D [out_features, in_features] tensor, got {tuple(residual.shape)}")
    rows, cols = residual.shape
    check_rank(rank, rows, cols)
    if method not in SVD_METHODS:
        raise ValueError(f"method: expected one of {', '.join(SVD_METHODS)}, got {method!r}")
    r = residual.detach().float()
    scale = None
    if input_scale is not None:
        if input_scale.shape != (cols,):
            raise ValueError(f"input_scale: expected shape ({cols},) for a residual of shape {(rows, cols)}, "
                             f"got {tuple(input_scale.shape)}")
        scale = input_scale.detach().to(device=r.device, dtype=torch.float32)
        if not torch.isfinite(scale).all():
            raise ValueError("input_scale: contains NaN or inf")
        top = scale.max().item()
        scale = scale.clamp_min(1e-6 * top) if top > 0 else torch.ones_like(scale)
        r = r * scale.unsqueeze(0)
    if method == "exact":
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = randomized_svd(r, rank, oversample, power_iters, generator)
    root = s.clamp_min(0).sqrt()
    b = u * root.unsqueeze(0)
    a = root.unsqueeze(1) * vh
    if scale is not None:
        a = a / scale.unsqueeze(0)
    return a.contiguous(), b.contiguous()


def residual_adapter(weight: torch.Tensor, pruned: torch.Tensor, rank: int, **kwargs
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``svd_factors(weight − pruned, rank, ...)``: the SALR adapter of one pruned layer."""
    if weight.shape != pruned.shape:
        raise ValueError(f"pruned: shape {tuple(pruned.shape)} differs from the weight's {tuple(weight.shape)}")
    return svd_factors(weight.detach().float() - pruned.detach().float(), rank, **kwargs)


def eckart_young_bound(rank: int, rows: int, cols: int) -> float:
    """The guaranteed MSE reduction factor 1 − r/min(N, K) of a rank-r truncated SVD."""
    check_rank(rank, rows, cols)
    return 1.0 - rank / min(rows, cols)
