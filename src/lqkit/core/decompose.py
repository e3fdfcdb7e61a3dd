"""Decompositions W ≈ Q + L·R of one weight matrix (pure tensor math).

Methods (entries of :data:`DECOMPOSERS`):
- ``quant``: Q only (rank 0).
- ``lowrank``: L·R only (LoRD-style rank reduction, no Q).
- ``lorc``: ZeroQuant-V2 LoRC: Q = quant(W) once, then L·R = SVD_r(W − Q).
- ``lq``: LQ-LoRA alternation: L·R = SVD_r(W − Q), Q = quant(W − L·R), starting from Q = 0; the
  best iterate is kept and the loop stops when the error stops improving.
L and R are stored in ``factor_dtype`` (float16 by default); every reported error is that of the
reconstruction from the stored (rounded) values.

Data-aware variants: ``decompose(w, spec, stats)`` passes the matrix's calibration statistics to
data-aware quantizers (gptq, nuq, outlier selection), and ``spec.weighting`` makes the low-rank part
and the LQ objective weighted: "fisher" (row × column scales fitted to the Fisher diagonal, FWSVD)
or "hessian" (whitening by a Cholesky factor of H, activation-aware SVD as SVD-LLM / CorDA). The
LQ alternation then keeps the iterate with the smallest weighted error. Group dim "auto" is resolved
per matrix first (AdaDim, :mod:`.adadim`).

A spec with a ``rotation`` (:mod:`.rotation`) compresses W' = W·Rᵀ with the statistics of W' (H' = R·H·Rᵀ,
the Fisher diagonal estimated): every method above runs unchanged on the rotated matrix, whose stored
parts a layer applies to R·x. :meth:`Decomposition.reconstruct` rotates back (Ŵ = Ŵ'·R); errors are the
same in either coordinates (R is orthogonal), weighted ones exactly so for "hessian" and "kfac".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping

import torch

from ..errors import SpecError
from . import quant as qmod
from .lowrank import LowRank, scaled_svd
from .quant import QTensor, QuantSpec
from .rotation import Rotation, rotate_weight, unrotate_weight
from .stats import WEIGHTINGS, MatrixStats, rel_error, weight_scales


@dataclass(frozen=True)
class MatrixSpec:
    """How one weight matrix is compressed: the unit of a plan."""

    method: str = "lq"  # key in DECOMPOSERS: quant, lq, lorc, lowrank
    quant: QuantSpec | None = None  # quantizer of Q (None for lowrank)
    rank: int = 0  # rank of L·R (0 for quant)
    iters: int = 20  # lq: maximum number of alternations
    tol: float = 1e-4  # lq: stop when the relative error improves by less than this fraction
    factor_dtype: str = "float16"  # stored dtype of L and R
    weighting: str = "none"  # error weighting of L·R and of the LQ objective: none, fisher, hessian, kfac
    init: str = "zero"  # lq: start from Q = 0 (LQ-LoRA) or from Q = quant(W) ("quant": iterate 1 is LoRC)
    rotation: Rotation | None = None  # compress W·Rᵀ and rotate the input at run time (None: no rotation)

    def __post_init__(self) -> None:
        if self.method not in DECOMPOSERS:
            raise SpecError(f"unknown method {self.method!r}; choose one of {sorted(DECOMPOSERS)}")
        needs_q, needs_r = DECOMPOSERS[self.method].needs_quant, DECOMPOSERS[self.method].needs_rank
        if needs_q and self.quant is None:
            raise SpecError(f"method {self.method!r} needs a quantizer spec")
        if not needs_q and self.quant is not None:
            raise SpecError(f"method {self.method!r} takes no quantizer")
        if not (isinstance(self.rank, int) and self.rank >= 0):
            raise SpecError(f"rank must be a non-negative integer, got {self.rank!r}")
        if needs_r and self.rank == 0:
            raise SpecError(f"method {self.method!r} needs a rank of at least 1, e.g. --rank 16")
        if not needs_r and self.rank != 0:
            raise SpecError(f"method {self.method!r} has no low-rank part; use rank 0 or method lq/lorc")
        if not (isinstance(self.iters, int) and self.iters >= 1):
            raise SpecError(f"iters must be a positive integer, got {self.iters!r}")
        if self.factor_dtype not in ("float16", "bfloat16", "float32"):
            raise SpecError(f"factor dtype must be float16, bfloat16 or float32, got {self.factor_dtype!r}")
        if self.init not in ("zero", "quant"):
            raise SpecError(f"init must be 'zero' or 'quant', got {self.init!r}")
        if self.init != "zero" and self.method != "lq":
            raise SpecError("init is an lq option (where the alternation starts); use method lq")
        if self.weighting not in WEIGHTINGS:
            raise SpecError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.rotation is not None and not isinstance(self.rotation, Rotation):
            raise SpecError(f"rotation must be a Rotation(seed, block) or None, got {self.rotation!r}")

    def check_shape(self, shape: tuple[int, int], name: str = "matrix") -> None:
        if self.rank > min(shape):
            raise SpecError(f"rank {self.rank} is larger than {name} of shape {shape[0]}x{shape[1]} "
                            f"allows (at most {min(shape)}); choose --rank {min(shape)} or less")
        if self.rotation is not None:
            self.rotation.check(shape[1], f"the input of {name}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quant"] = self.quant.to_dict() if self.quant else None
        if self.rotation is None:  # left out: plans and cost tables written before rotations keep their form
            del d["rotation"]
        else:
            d["rotation"] = self.rotation.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "MatrixSpec":
        d = dict(d)
        q, rot = d.pop("quant", None), d.pop("rotation", None)
        return cls(quant=QuantSpec.from_dict(q) if q else None, rotation=Rotation.from_dict(rot) if rot else None, **d)

    def label(self) -> str:
        q = self.quant.label() if self.quant else ""
        r = f"+r{self.rank}" if self.rank else ""
        wt = f"@{self.weighting}" if self.weighting != "none" else ""
        init = "(init=quant)" if self.init != "zero" else ""
        rot = "+rot" if self.rotation is not None else ""
        return f"{self.method}{init}:{q}{r}{wt}{rot}"


@dataclass(frozen=True)
class Decomposition:
    """Result of :func:`decompose`: stored parts and the error of their reconstruction."""

    spec: MatrixSpec
    shape: tuple[int, int]
    q: QTensor | None  # of W·Rᵀ for a rotated spec, as L and R
    L: torch.Tensor | None  # (out, rank), factor dtype
    R: torch.Tensor | None  # (rank, in), factor dtype
    error: float  # ‖W − Ŵ‖_F / ‖W‖_F of the stored reconstruction
    history: tuple[float, ...]  # objective of each iterate (weighted error when spec.weighting is set)
    weighted_error: float | None = None  # relative error under spec.weighting (None for "none")

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ ≈ W (original coordinates: deq(Q) + L·R rotated back for a rotated spec)."""
        w = qmod.dequantize(self.q) if self.q is not None else torch.zeros(self.shape, device=self.L.device)
        if self.L is not None:
            w = w + self.L.float() @ self.R.float()
        if self.spec.rotation is not None:
            w = unrotate_weight(w, self.spec.rotation)
        return w.to(dtype)

    @property
    def nbits(self) -> int:
        """Exact stored bits of Q, L and R."""
        qb = self.q.nbits if self.q is not None else 0
        fb = sum(t.numel() * t.element_size() * 8 for t in (self.L, self.R) if t is not None)
        return qb + fb


@dataclass(frozen=True)
class Decomposer:
    name: str
    fn: Callable[[torch.Tensor, MatrixSpec, "_Ctx"], Decomposition]
    needs_quant: bool
    needs_rank: bool


DECOMPOSERS: dict[str, Decomposer] = {}


def _register(name: str, needs_quant: bool, needs_rank: bool):
    def wrap(fn):
        DECOMPOSERS[name] = Decomposer(name, fn, needs_quant, needs_rank)
        return fn
    return wrap


@dataclass(frozen=True)
class _Ctx:
    """Statistics of the matrix and the weighting they imply for L·R (built once per matrix)."""

    stats: MatrixStats | None
    weighting: str
    row: torch.Tensor | None = None  # D of ‖D·E·C‖
    right: torch.Tensor | None = None  # C: vector (diagonal) or matrix
    right_inv: torch.Tensor | None = None

    @classmethod
    def build(cls, spec: MatrixSpec, stats: MatrixStats | None) -> "_Ctx":
        row, right, right_inv = weight_scales(stats, spec.weighting)
        return cls(stats, spec.weighting, row=row, right=right, right_inv=right_inv)

    def objective(self, w: torch.Tensor, w_hat: torch.Tensor) -> float:
        return rel_error(w, w_hat, self.stats, self.weighting)

    def finish(self, spec, w, q, lr, history) -> Decomposition:
        w_hat = (qmod.dequantize(q) if q is not None else torch.zeros_like(w)) + (lr.product() if lr else 0)
        werr = self.objective(w, w_hat) if self.weighting != "none" else None
        L, R = (lr.L, lr.R) if lr is not None else (None, None)
        # the same computation as the unweighted objective, so that error == min(history) exactly
        error = rel_error(w, w_hat, None, "none")
        return Decomposition(spec, tuple(w.shape), q, L, R, error, tuple(history), werr)


def _factors(a: torch.Tensor, spec: MatrixSpec, ctx: _Ctx) -> LowRank:
    return scaled_svd(a, spec.rank, ctx.row, ctx.right, ctx.right_inv).to(qmod.DTYPES[spec.factor_dtype])


@_register("quant", needs_quant=True, needs_rank=False)
def _quant_only(w: torch.Tensor, spec: MatrixSpec, ctx: _Ctx) -> Decomposition:
    q = qmod.quantize(w, spec.quant, ctx.stats)
    return ctx.finish(spec, w, q, None, [ctx.objective(w, qmod.dequantize(q))])


@_register("lowrank", needs_quant=False, needs_rank=True)
def _lowrank(w: torch.Tensor, spec: MatrixSpec, ctx: _Ctx) -> Decomposition:
    lr = _factors(w, spec, ctx)
    return ctx.finish(spec, w, None, lr, [ctx.objective(w, lr.product())])


@_register("lorc", needs_quant=True, needs_rank=True)
def _lorc(w: torch.Tensor, spec: MatrixSpec, ctx: _Ctx) -> Decomposition:
    q = qmod.quantize(w, spec.quant, ctx.stats)
    wq = qmod.dequantize(q)
    lr = _factors(w - wq, spec, ctx)
    return ctx.finish(spec, w, q, lr, [ctx.objective(w, wq + lr.product())])


@_register("lq", needs_quant=True, needs_rank=True)
def _lq(w: torch.Tensor, spec: MatrixSpec, ctx: _Ctx) -> Decomposition:
    """Alternate L·R = SVD_r(W − Q) and Q = quant(W − L·R); keep the best iterate. init "zero": Q
    starts at 0 and each iterate is (L·R, then Q); init "quant": Q starts at quant(W) and each iterate
    is (Q, then L·R), so the first iterate is LoRC's result and the outcome is never worse than it."""
    quantize = lambda a: qmod.quantize(a, spec.quant, ctx.stats)  # noqa: E731
    q = quantize(w) if spec.init == "quant" else None
    wq = qmod.dequantize(q) if q is not None else torch.zeros_like(w)
    best: tuple[float, QTensor, LowRank] | None = None
    history: list[float] = []
    for _ in range(spec.iters):
        lr = _factors(w - wq, spec, ctx)
        lrp = lr.product()
        if spec.init == "zero":
            q = quantize(w - lrp)
            wq = qmod.dequantize(q)
        err = ctx.objective(w, wq + lrp)
        history.append(err)
        stop = best is not None and err > best[0] * (1 - spec.tol)
        if best is None or err < best[0]:
            best = (err, q, lr)
        if stop:
            break
        if spec.init == "quant":
            q = quantize(w - lrp)
            wq = qmod.dequantize(q)
    _, q, lr = best
    return ctx.finish(spec, w, q, lr, history)


def decompose(w: torch.Tensor, spec: MatrixSpec, stats: MatrixStats | None = None) -> Decomposition:
    """Compress one (out, in) matrix according to ``spec``, using its calibration ``stats`` where
    the spec's quantizer or weighting needs them."""
    if w.ndim != 2:
        raise SpecError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    spec.check_shape(tuple(w.shape))
    w = w.float()
    stats = stats.to(w.device) if stats is not None else None
    if spec.rotation is not None:
        w = rotate_weight(w, spec.rotation)
        stats = stats.rotated(spec.rotation) if stats is not None else None
    if spec.quant is not None and spec.quant.group_dim == "auto":
        from .adadim import choose_group_dim

        spec = replace(spec, quant=choose_group_dim(w, spec.quant, stats, spec.weighting))
    return DECOMPOSERS[spec.method].fn(w, spec, _Ctx.build(spec, stats))


def storage_bits(spec: MatrixSpec, shape: tuple[int, int]) -> int:
    """Exact stored bits of a matrix of ``shape`` compressed with ``spec``."""
    out, inp = shape
    qb = qmod.storage_bits(spec.quant, shape) if spec.quant is not None else 0
    fb = spec.rank * (out + inp) * torch.empty((), dtype=qmod.DTYPES[spec.factor_dtype]).element_size() * 8
    return qb + fb
