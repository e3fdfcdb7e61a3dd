"""Calibration statistics of one weight matrix and the errors they weight (pure tensor math).

For a linear layer y = x·Wᵀ with W of shape (out, in):
- ``h`` (in, in) is the mean input second moment E[xᵀx] (Σ xᵀx over calibration tokens / tokens).
  The output error of a perturbation E is ‖E·Xᵀ‖² ∝ tr(E·H·Eᵀ) ("hessian" weighting, as GPTQ).
- ``fisher`` (out, in) is the empirical Fisher diagonal, mean over calibration sequences of the
  squared gradient of the LM loss w.r.t. each weight: Σ F ∘ E² estimates the loss increase
  ("fisher" weighting, as LQ-LoRA / SqueezeLLM / FWSVD).
- "kfac" combines both: Σ_i ρ_i·(E·H·Eᵀ)_ii with ρ_i = Σ_j F_ij / tr(H), the output sensitivity of
  row i under the Kronecker-factored approximation F_ij ≈ ρ_i·H_jj. Like "hessian" it sees the
  correlations between inputs (what GPTQ exploits, and what the diagonal Fisher cannot see); like
  "fisher" it is on the scale of the loss, so errors of different layers can be added up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import SpecError
from . import rotation as rt
from .rotation import Rotation

WEIGHTINGS = ("none", "fisher", "hessian", "kfac")
DAMP = 0.01  # default dampening: fraction of mean(diag H) added to the diagonal


@dataclass(frozen=True)
class MatrixStats:
    """Statistics of one (out, in) matrix; any may be None.

    The Fisher diagonal is kept whole (``fisher``) where a use needs every entry (nuq codebooks,
    outlier selection, the "fisher" weighting and metric), else as its row and column sums
    (``fisher_sums``): all that the "kfac" metric and weighting and FWSVD's scales read."""

    h: torch.Tensor | None = None  # (in, in) fp32, E[xᵀx]
    fisher: torch.Tensor | None = None  # (out, in) fp32, E[g²]
    fisher_sums: tuple[torch.Tensor, torch.Tensor] | None = None  # (Σ_j F_ij (out,), Σ_i F_ij (in,)), fp32

    def to(self, device) -> "MatrixStats":
        sums = tuple(t.to(device) for t in self.fisher_sums) if self.fisher_sums is not None else None
        return MatrixStats(*(t.to(device) if t is not None else None for t in (self.h, self.fisher)), sums)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row sums, column sums) of the Fisher diagonal (clamped at 0), or None."""
        if self.fisher is not None:
            f = self.fisher.float().clamp_min(0)
            return f.sum(dim=1), f.sum(dim=0)
        return self.fisher_sums

    def rotated(self, rot: Rotation) -> "MatrixStats":
        """The statistics of the rotated matrix W·Rᵀ (:mod:`.rotation`): H' = R·H·Rᵀ exactly; the Fisher
        diagonal (or its sums) estimated from F and H, its row sums exact."""
        h = rt.rotate_gram(self.h, rot) if self.h is not None else None
        fisher = rt.rotate_fisher(self.fisher, rot, self.h) if self.fisher is not None else None
        sums = rt.rotate_fisher_sums(self.fisher_sums, rot, self.h) if self.fisher_sums is not None else None
        return MatrixStats(h, fisher, sums)

    def compact(self) -> "MatrixStats":
        """The same statistics with the Fisher diagonal reduced to its row and column sums."""
        return MatrixStats(self.h, None, self.sums())


def require(stats: MatrixStats | None, what: str, why: str):
    """The ``what`` of ``stats`` — "h", "fisher" (the whole diagonal) or "fisher_sums" (its row
    and column sums) — or a SpecError saying why it is needed."""
    t = None
    if stats is not None:
        t = stats.sums() if what == "fisher_sums" else getattr(stats, what)
    if t is None:
        kind = "input second moments (H)" if what == "h" else "a Fisher diagonal"
        if what == "fisher" and stats is not None and stats.fisher_sums is not None:
            kind = "the whole Fisher diagonal (only its row and column sums were kept)"
        raise SpecError(f"{why} needs calibration statistics with {kind}: compute them with `lqkit calibrate "
                        f"--out stats.safetensors` and pass --stats stats.safetensors")
    return t


def sq_error(e: torch.Tensor, stats: MatrixStats | None, weighting: str) -> torch.Tensor:
    """Weighted squared error of an (out, in) difference ``e`` (a 0-d tensor)."""
    if weighting == "none":
        return (e * e).sum()
    if weighting == "fisher":
        return (require(stats, "fisher", "fisher weighting") * e * e).sum()
    if weighting == "hessian":
        return ((e @ require(stats, "h", "hessian weighting")) * e).sum()  # tr(E·H·Eᵀ)
    if weighting == "kfac":
        rho = kfac_rows(require(stats, "fisher_sums", "kfac weighting"), require(stats, "h", "kfac weighting"))
        return (((e @ stats.h.float()) * e).sum(dim=1) * rho).sum()  # Σ ρ_i (E·H·Eᵀ)_ii
    raise SpecError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def rel_error(w: torch.Tensor, w_hat: torch.Tensor, stats: MatrixStats | None, weighting: str) -> float:
    """sqrt(err(W − Ŵ) / err(W)) under ``weighting`` (the plain relative Frobenius error for "none")."""
    num = sq_error(w - w_hat, stats, weighting)
    den = sq_error(w, stats, weighting).clamp_min(1e-30)
    return float((num / den).clamp_min(0).sqrt())


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H + damp·mean(diag H)·I, with dead inputs (zero diagonal) given a unit diagonal."""
    h = h.float().clone()
    d = torch.diagonal(h)
    dead = d <= 0
    d[dead] = 1.0
    mean = d.mean()
    d += damp * mean
    return h


T = TypeVar("T")
_MEMO: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (its version, {key: value})


def memo_on(t: torch.Tensor, key: Hashable, fn: Callable[[], T]) -> T:
    """``fn()``, computed once per ``key`` for as long as ``t`` lives unchanged (in-place changes bump
    its version and drop what was remembered). One cost-table row factors its H many times over (every
    chunk of GPTQ configurations, every metric built): this makes that once. ``fn``'s result must not
    refer to ``t``, or ``t`` would never be freed."""
    version = 0 if t.is_inference() else t._version
    slot = _MEMO.get(t)
    if slot is None or slot[0] != version:
        slot = _MEMO[t] = (version, {})
    if key not in slot[1]:
        slot[1][key] = fn()
    return slot[1][key]


def forget(t: torch.Tensor) -> None:
    """Drop what :func:`memo_on` remembers for ``t`` (e.g. once no later step reads H's factorisations)."""
    _MEMO.pop(t, None)


def cholesky_(a: torch.Tensor, block: int = 2048) -> bool:
    """Replace the symmetric ``a`` by its lower Cholesky factor (zeros above the diagonal) where it is:
    block column by block column (right-looking: factor the diagonal block, solve the panel below it,
    subtract its outer product from the trailing matrix), so that no second n×n matrix is held (a
    28672-wide fp64 H is 6.6 GB; the library factorisation on a GPU holds 3.5 more). False when ``a``
    is not positive definite (then ``a`` holds an unusable partial factor)."""
    n = a.shape[0]
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        d, info = torch.linalg.cholesky_ex(a[j0:j1, j0:j1])
        if int(info) != 0:
            return False
        a[j0:j1, j0:j1] = d
        if j1 < n:
            p = torch.linalg.solve_triangular(d.mT, a[j1:, j0:j1], upper=True, left=False)  # A₂₁·L₁₁⁻ᵀ
            a[j1:, j0:j1] = p
            a[j1:, j1:].addmm_(p, p.mT, alpha=-1.0)
            a[j0:j1, j1:] = 0
            del p
    return True


def invert_lower_(chol: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """Replace the lower-triangular ``chol`` (zeros above the diagonal) by its inverse where it is, block
    column by block column from the last: with the trailing part already inverted (X₂₂), a block column
    [A₁₁; A₂₁] becomes [A₁₁⁻¹; −X₂₂·A₂₁·A₁₁⁻¹] (one matrix product per block; no second n×n matrix).
    Returns ``chol``."""
    n = chol.shape[0]
    for j0 in reversed(range(0, n, block)):
        j1 = min(n, j0 + block)
        eye = torch.eye(j1 - j0, dtype=chol.dtype, device=chol.device)
        d = torch.linalg.solve_triangular(chol[j0:j1, j0:j1], eye, upper=False)  # A₁₁⁻¹
        if j1 < n:
            t = chol[j1:, j0:j1] @ d
            chol[j1:, j0:j1] = -(chol[j1:, j1:] @ t)
            del t
        chol[j0:j1, j0:j1] = d
    return chol


def whitening(h: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with S·Sᵀ = damped H, so that tr(E·H·Eᵀ) ≈ ‖E·S‖²_F.

    Cholesky of the damped H; if that fails (H not positive definite even after dampening, e.g.
    from NaN-free but degenerate statistics), the eigen-decomposition with eigenvalues clamped to
    ≥ 1e-6·max is used instead (S = V·Λ^½, S⁻¹ = Λ^-½·Vᵀ). Non-finite H raises a SpecError.
    Remembered per H (:func:`memo_on`)."""
    return memo_on(h, ("whitening", damp), lambda: _whitening(h, damp))


def _whitening(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.isfinite(h).all():
        raise SpecError("the input second-moment matrix H has NaN/inf entries; re-run calibration")
    chol = damped(h, damp).double()
    if cholesky_(chol):  # fp64 n×n once, factored and inverted where it is
        s = chol.float()
        return s, invert_lower_(chol).float()
    del chol
    hd = damped(h, damp).double()
    evals, evecs = torch.linalg.eigh((hd + hd.T) / 2)
    evals = evals.clamp_min(evals.max().clamp_min(1e-30) * 1e-6)
    root = evals.sqrt()
    return (evecs * root).float(), (evecs / root).T.float()


def fisher_scales(fisher, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column scales (r, c), both positive, with F_ij ≈ r_i²·c_j² (the best separable,
    i.e. independence, fit: r² = row sums, c² = column sums / total), normalised to mean 1.
    ``fisher``: the (out, in) diagonal, or its (row sums, column sums)."""
    rows, cols = fisher if isinstance(fisher, tuple) else MatrixStats(fisher=fisher).sums()  # (out,), (in,)
    rows = rows / rows.mean().clamp_min(1e-30)
    cols = cols / cols.mean().clamp_min(1e-30)
    return (rows + eps).sqrt(), (cols + eps).sqrt()


def kfac_rows(fisher, h: torch.Tensor) -> torch.Tensor:
    """ρ (out,): the output sensitivity of each row, Σ_j F_ij / tr(H) (F_ij ≈ ρ_i·H_jj).
    ``fisher``: the (out, in) diagonal, or its (row sums, column sums)."""
    rows = fisher[0] if isinstance(fisher, tuple) else MatrixStats(fisher=fisher).sums()[0]
    return rows.float() / torch.diagonal(h).float().clamp_min(0).sum().clamp_min(1e-30)


def weight_scales(stats: MatrixStats | None, weighting: str
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(D, C, C⁻¹) with the weighted error ≈ ‖D·E·C‖²_F: D a positive row vector or None, C a
    positive column vector or an (in, in) matrix (then C⁻¹ too) or None.

    fisher: the separable fit of F (FWSVD); hessian: C = S, S·Sᵀ = damped H; kfac: D = √ρ (with a
    floor of 1e-6·mean ρ so that dead rows stay invertible) and C = S. Exact for hessian and kfac
    up to H's 1% dampening; an approximation for fisher."""
    if weighting == "none":
        return None, None, None
    if weighting == "fisher":
        r, c = fisher_scales(require(stats, "fisher_sums", "weighting 'fisher'"))
        return r, c, None
    s, s_inv = whitening(require(stats, "h", f"weighting {weighting!r}"))
    if weighting == "hessian":
        return None, s, s_inv
    if weighting == "kfac":
        rho = kfac_rows(require(stats, "fisher_sums", "weighting 'kfac'"), stats.h)
        return (rho + 1e-6 * rho.mean().clamp_min(1e-30)).sqrt(), s, s_inv
    raise SpecError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
