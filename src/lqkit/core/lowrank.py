"""Truncated SVD factorisations A ≈ L·R (pure tensor math)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT_SVD_MAX_DIM = 4096  # exact SVD at most up to this smaller dimension ...
RANDOMIZED_MIN_DIM = 256  # ... and randomized above this one when rank ≤ min(m, n) / 4


@dataclass(frozen=True)
class LowRank:
    """A ≈ L @ R with L (m, r) and R (r, n); singular values split evenly (L = U√S, R = √S Vᵀ)."""

    L: torch.Tensor
    R: torch.Tensor

    @property
    def rank(self) -> int:
        return self.L.shape[1]

    def product(self) -> torch.Tensor:
        return self.L.float() @ self.R.float()

    def to(self, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.L.to(dtype), self.R.to(dtype))


def truncated_svd(a: torch.Tensor, rank: int, *, randomized: bool | None = None,
                  oversample: int = 16, niter: int = 4, seed: int = 0) -> LowRank:
    """Best rank-``rank`` approximation of ``a`` (m, n) in Frobenius norm.

    By default (``randomized=None``) exact (LAPACK/cuSOLVER) for small matrices or large ranks,
    and Halko et al.'s randomized range finder with ``niter`` power iterations (seeded, so results
    are reproducible) when min(m, n) > EXACT_SVD_MAX_DIM, or min(m, n) ≥ RANDOMIZED_MIN_DIM and
    rank ≤ min(m, n) / 4, where it is ~10x faster at near-identical error.
    """
    a = a.float()
    m, n = a.shape
    if not 0 < rank <= min(m, n):
        raise ValueError(f"rank must be in 1..{min(m, n)} for a {m}x{n} matrix, got {rank}")
    if randomized is None:
        k = min(m, n)
        randomized = k > EXACT_SVD_MAX_DIM or (k >= RANDOMIZED_MIN_DIM and 4 * rank <= k)
    if randomized:
        gen = torch.Generator(device=a.device).manual_seed(seed)
        q = min(rank + oversample, min(m, n))
        omega = torch.randn(n, q, device=a.device, generator=gen)  # (n, q)
        y = a @ omega  # (m, q)
        for _ in range(niter):
            y, _ = torch.linalg.qr(y)
            y = a @ (a.t() @ y)
        basis, _ = torch.linalg.qr(y)  # (m, q)
        ub, s, vh = torch.linalg.svd(basis.t() @ a, full_matrices=False)  # (q, q), (q,), (q, n)
        u = basis @ ub
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()  # (r,)
    return LowRank(u[:, :rank] * root, root.unsqueeze(1) * vh[:rank])


def scaled_svd(a: torch.Tensor, rank: int, row_scale: torch.Tensor | None = None,
               right: torch.Tensor | None = None, right_inv: torch.Tensor | None = None) -> LowRank:
    """Best rank-``rank`` L·R in the weighted norm ‖D·(A − L·R)·C‖_F, D = diag(row_scale) (positive)
    and C = ``right``: a positive vector (diagonal) or an invertible (n, n) matrix with inverse
    ``right_inv`` (e.g. a Cholesky factor of the input second moment H: activation-aware SVD).

    Exact by Eckart–Young on the scaled matrix: D·A·C ≈ U_r Σ_r V_rᵀ, L = D⁻¹·U_r·Σ_r^½,
    R = Σ_r^½·V_rᵀ·C⁻¹. With neither scaling this is :func:`truncated_svd`."""
    b = a.float()
    if row_scale is not None:
        b = row_scale.float().unsqueeze(1) * b
    if right is not None:
        b = b * right.float().unsqueeze(0) if right.ndim == 1 else b @ right.float()
    lr = truncated_svd(b, rank)
    L, R = lr.L, lr.R
    if row_scale is not None:
        L = L / row_scale.float().unsqueeze(1)
    if right is not None:
        R = R / right.float().unsqueeze(0) if right.ndim == 1 else R @ right_inv.float()
    # rebalance each rank-1 term so that L's column and R's row have equal norms (fp16-friendly)
    alpha = (R.norm(dim=1) / L.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()  # (r,)
    return LowRank(L * alpha, R / alpha.unsqueeze(1))
