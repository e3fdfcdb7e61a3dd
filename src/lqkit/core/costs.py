"""Cost table of one matrix (pure tensor math): for each candidate configuration, its exact stored
bits and its sensitivity-weighted reconstruction error.

Candidates span quantizer × bits × group size × group dim × outlier fraction (the Q part) × rank
(the L·R part, LoRC order: Q first, then the best weighted rank-r fit of the residual). The error of
a candidate is the weighted squared error ``err(W − Ŵ)`` under one metric (:mod:`.stats`):
"kfac" ‖D·E·S‖² (default), "hessian" ‖E·S‖² (S·Sᵀ = damped H), or "fisher" Σ F ∘ E².
Errors are absolute, so the errors of different matrices add up to one objective.

Work is shared and pruned so that a table over a whole model stays cheap:
1. every data-free Q config (rtn, nf) is quantized and scored cheaply at rank 0 (the metric with
   diag H, see ``_Metric.screen``);
2. a data-aware config (gptq, nuq) is run only if its data-free proxy (rtn with the same bits,
   group dim, outliers and group size; nuq: the largest group size) lies within ``slack`` of the
   rank-0 front of the proxies; the gptq configs of a matrix run as one batched sweep; a
   data-free config is scored exactly only if it lies within ``slack`` of the front of all configs;
3. low rank is tried only for Q configs within ``lowrank_slack`` of the rank-0 front of all Q configs, and
   one SVD of each residual serves every rank: err(r) = err(E) − Σ_{i≤r} σ_i² of D·E·S
   (fisher: the FWSVD factors of each rank are formed and scored exactly);
4. only the candidates on the (bits, error) Pareto front are returned: the others never help.

With ``rotations=(False, True)`` every candidate is also tried on the rotated matrix W·Rᵀ
(:mod:`.rotation`, the matrix's own rotation) with its rotated statistics. Its error is the same
metric in the same coordinates: for "kfac" and "hessian" exactly (E' = E·Rᵀ, H' = R·H·Rᵀ:
tr(E'·H'·E'ᵀ) row by row equals tr(E·H·Eᵀ), and the row sensitivities ρ_i are unchanged); for
"fisher", Σ F' ∘ E'² with F' the estimated rotated Fisher diagonal. (The 1 % dampening of H commutes
with R, except for dead inputs, whose zero diagonal ``damped`` sets to 1 before rotation mixes them.)
Both kinds meet in one Pareto front, so the integer program decides per matrix.

A set with a serving ``target`` (:mod:`.serving`, e.g. "vllm") holds only the configurations the
target serves, and keeps the Pareto front within each integer scheme: the allocation may tie layers
that the runtime fuses to one scheme, and a scheme dominated in one of them may be the best for all.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping

import numpy as np
import torch

from ..errors import SpecError
from . import fp32mm, quant as qmod
from .allocate import pareto_front
from .decompose import MatrixSpec, storage_bits
from .quant import QUANTIZERS, QuantSpec
from .rotation import Rotation, rotate_weight
from .stats import MatrixStats, require, weight_scales

METRICS = ("kfac", "hessian", "fisher")
NUQ_MAX_BITS = 4  # a per-row codebook of 2^b fp16 levels: beyond 4 bits it costs more than it saves
CHUNK = 1 << 24  # elements of stacked error matrices scored at once
RECON = 1 << 27  # elements of reconstructions held at once (GPTQ's: what one sweep stacks)
KEEP = 1 << 28  # elements of data-free reconstructions kept from the screening for the exact errors
RAW_KEEP = 1 << 27  # elements of scored error matrices kept whole until the low-rank step needs their summary


@dataclass(frozen=True)
class CandidateSet:
    """The configurations every matrix may take (before pruning)."""

    quantizers: tuple[str, ...] = ("rtn", "nf", "gptq", "nuq")
    bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    group_sizes: tuple[int, ...] = (32, 64, 128)
    group_dims: tuple[str, ...] = ("in", "out")
    ranks: tuple[int, ...] = (0, 8, 16, 32, 64, 128)
    outliers: tuple[float, ...] = (0.0, 0.005, 0.01)
    factor_dtype: str = "float16"  # stored dtype of L and R
    clip: bool = True  # rtn / gptq: MSE search of each group's range (measured better at every width here)
    act_order: bool = True  # gptq: columns by decreasing activation energy, static groups (likewise)
    slack: float = 0.25  # pruning tolerance: run a data-aware config if its proxy is within (1 + slack) of the front
    lowrank_slack: float = 0.05  # try low rank on Q configs within (1 + lowrank_slack) of the rank-0 front
    target: str | None = None  # a serving target (lqkit.core.serving.TARGETS): only what it serves
    rotations: tuple[bool, ...] = (False,)  # each candidate without / with the matrix's input rotation
    int_zero: bool = False  # rtn / gptq: integer zero points (QuantSpec.int_zero): same errors, fewer bits

    def __post_init__(self) -> None:
        for name in ("quantizers", "bits", "group_sizes", "group_dims", "ranks", "outliers", "rotations"):
            if not getattr(self, name):
                raise SpecError(f"the candidate set needs at least one value of {name}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [q for q in self.quantizers if q not in QUANTIZERS]
        if unknown:
            raise SpecError(f"unknown quantizer(s) {unknown} in the candidate set; choose from {sorted(QUANTIZERS)}")
        if any(d not in ("in", "out") for d in self.group_dims):
            raise SpecError(f"candidate group dims must be 'in' or 'out', got {self.group_dims}")
        if any(not (isinstance(r, int) and r >= 0) for r in self.ranks):
            raise SpecError(f"candidate ranks must be non-negative integers, got {self.ranks}")
        if any(not isinstance(r, bool) for r in self.rotations) or len(set(self.rotations)) < len(self.rotations):
            raise SpecError(f"candidate rotations must be distinct booleans, e.g. (False, True), got {self.rotations}")
        if self.target is not None:
            from .serving import get_target

            t = get_target(self.target)
            if True in self.rotations and not t.transforms:
                raise SpecError(f"target {t.name} takes no input rotation; drop --rotate or --target")
        if not self.quant_specs():
            why = f" that target {self.target} serves" if self.target else ""
            raise SpecError(f"the candidate set has no valid quantizer configuration{why} (check bits per quantizer)")
        if self.slack < 0 or self.lowrank_slack < 0:
            raise SpecError(f"slacks must be ≥ 0, got {self.slack} and {self.lowrank_slack}")

    def quant_specs(self) -> list[QuantSpec]:
        """Every Q configuration of the set that its quantizer (and the target, if any) supports."""
        if self.target is not None:
            from .serving import get_target, quant_refusal

            t = get_target(self.target)
            return [s for s in replace(self, target=None).quant_specs() if quant_refusal(s, t) is None]
        out = []
        for name in self.quantizers:
            allowed = QUANTIZERS[name].bits_allowed
            bits = [b for b in self.bits if b in allowed and (name != "nuq" or b <= NUQ_MAX_BITS)]
            sizes = (max(self.group_sizes),) if name == "nuq" else self.group_sizes  # nuq: one codebook per row
            extra = {"clip": self.clip, "int_zero": self.int_zero} if name in ("rtn", "gptq") else {}
            if name == "gptq":
                extra["act_order"] = self.act_order
            for b, g, d, o in itertools.product(bits, sizes, self.group_dims, self.outliers):
                out.append(QuantSpec(name, b, g, d, outliers=o, **extra))
        return out

    def needs(self) -> set[str]:
        """Statistics the data-aware quantizers and outlier selection of the set use."""
        need = set()
        methods = {s.method for s in self.quant_specs()} if self.target else set(self.quantizers)
        if "gptq" in methods:
            need.add("h")
        if "nuq" in methods:
            need.add("fisher")
        return need

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["target"] is None:  # left out: the cost tables cached before targets keep their keys
            del d["target"]
        if d["rotations"] == (False,):  # likewise before rotations
            del d["rotations"]
        if not d["int_zero"]:  # and before integer zero points
            del d["int_zero"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "CandidateSet":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class MatrixCosts:
    """The Pareto-optimal candidates of one matrix, by increasing bits (decreasing error)."""

    specs: tuple[MatrixSpec, ...]
    bits: np.ndarray  # int64, exact stored bits of each candidate
    errors: np.ndarray  # float64, weighted squared error err(W − Ŵ)
    base: float  # err(W): the error of storing nothing, for relative errors
    evaluated: int  # (Q config, rank) pairs scored before the Pareto pruning

    def to_dict(self) -> dict:
        return {"base": self.base, "evaluated": self.evaluated, "specs": [s.to_dict() for s in self.specs],
                "bits": self.bits.tolist(), "errors": self.errors.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "MatrixCosts":
        return cls(tuple(MatrixSpec.from_dict(s) for s in d["specs"]), np.array(d["bits"], dtype=np.int64),
                   np.array(d["errors"], dtype=np.float64), d["base"], d["evaluated"])


def _sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of each matrix of a stack (k, out, in) in float64 (fp32 row sums, then fp64)."""
    return x.sum(dim=2).double().sum(dim=1)


class _Metric:
    """The weighted error of one matrix and its weighted low-rank spectrum."""

    def __init__(self, stats: MatrixStats | None, metric: str, device, top: int = 0):
        """``top``: the largest rank that :meth:`rank_errors` will be asked for (0: not known)."""
        if metric not in METRICS:
            raise SpecError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric = metric
        self.top = top
        self.d, self.c, self.c_inv = weight_scales(stats, metric)
        self.fisher = require(stats, "fisher", "the fisher metric").float().to(device) if metric == "fisher" else None

    def scaled(self, e: torch.Tensor) -> torch.Tensor:
        """D·E·C for a stack e (k, out, in)."""
        if self.d is not None:
            e = e * self.d.unsqueeze(1)
        if self.c is None:
            return e
        if self.c.ndim == 1:
            return e * self.c
        k, o, n = e.shape
        return fp32mm.mm(e.reshape(k * o, n), self.c).reshape(k, o, n)

    def errors(self, e: torch.Tensor) -> torch.Tensor:
        """err of each matrix of the stack e (k, out, in), float64 (k,)."""
        return self.errors_and_spectral(e)[0]

    def errors_and_spectral(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(errors (k,), the matrices whose best rank-r fits define the low rank: D·E·C, or E for fisher)."""
        if self.fisher is not None:
            return _sum(self.fisher * e * e), e
        b = self.scaled(e)
        return _sum(b.square()), b

    def screen(self, e: torch.Tensor) -> torch.Tensor:
        """A cheap estimate of :meth:`errors` for screening (k, out, in) -> (k,): the metric with the
        correlations between inputs ignored (diag H); exact for "fisher". Rounding errors of
        data-free quantizers are nearly uncorrelated across inputs, where the two agree closely."""
        if self.fisher is not None or self.c is None or self.c.ndim == 1:
            return self.errors(e)
        col = self.c.square().sum(dim=1)  # diag(S·Sᵀ) = diag of the damped H
        e2 = e * e
        if self.d is not None:
            e2.mul_(self.d.square().unsqueeze(1))
        return _sum(e2.mul_(col))

    def spectral_summary(self, b: torch.Tensor) -> torch.Tensor:
        """What :meth:`rank_errors` needs of a matrix ``b`` that :meth:`errors_and_spectral` gave: its
        smaller Gram matrix (σ² are its eigenvalues), or for fisher ``b`` itself (E). A Gram matrix of
        more than GRAM_KEEP_MAX elements is reduced at once to its ``top`` largest eigenvalues (what
        :meth:`rank_errors` computes of it): a table keeps one summary per configuration until the
        low-rank step, and on a 70B-sized matrix a Gram matrix is 256 MiB."""
        if self.fisher is not None:
            return b
        g = fp32mm.gram(b)
        return top_eigenvalues(g, self.top) if self.top and g.numel() > GRAM_KEEP_MAX else g

    def rank_errors(self, b: torch.Tensor, total: float, ranks: list[int]) -> list[float]:
        """err(E − best weighted rank-r fit) for each r in ``ranks`` (all > 0), from
        :meth:`spectral_summary` of E's matrix (the Gram matrix of D·E·C; E itself for fisher)."""
        if self.fisher is None:  # σ² are the eigenvalues of the smaller Gram matrix (or already those)
            ev = b[:max(ranks)] if b.ndim == 1 else top_eigenvalues(b, max(ranks))
            cum = torch.cumsum(ev, 0).tolist()
            return [max(total - cum[r - 1], 0.0) for r in ranks]
        e = b.double()
        u, s, vh = torch.linalg.svd(self.scaled(b.unsqueeze(0))[0].double(), full_matrices=False)
        res = []
        for r in ranks:
            lr = (u[:, :r] * s[:r]) @ vh[:r]
            lr = lr / self.d.double().unsqueeze(1) / self.c.double()
            res.append(float((self.fisher.double() * (e - lr).square()).sum()))
        return res


GRAM_KEEP_MAX = 1 << 22  # Gram matrices (a low-rank summary) up to this many elements are kept whole (2048²)
EIG_EXACT_MAX = 1024  # Gram matrices up to this size get every eigenvalue (LAPACK); larger ones the top ones
EIG_OVERSAMPLE = 32
EIG_POWER = 4


def top_eigenvalues(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest eigenvalues (fp64, descending, ≥ 0) of a symmetric PSD matrix. Up to
    EIG_EXACT_MAX rows: all of them by LAPACK. Above: randomized subspace iteration (seeded;
    EIG_POWER power steps on k + EIG_OVERSAMPLE directions, then the Ritz values), a few matrix
    products instead of a full eigen-decomposition; by Ky Fan's principle each partial sum of the
    Ritz values is at most the true one, so an error err(r) = total − Σ_{i≤r} λ_i is never
    underestimated, and the power steps make the gap small."""
    n = gram.shape[0]
    g = gram.double()
    if n <= max(EIG_EXACT_MAX, 2 * (k + EIG_OVERSAMPLE)):
        return torch.linalg.eigvalsh(g).flip(0).clamp_min(0)[:k]
    gen = torch.Generator(device=g.device).manual_seed(0)
    y = g @ torch.randn(n, k + EIG_OVERSAMPLE, generator=gen, device=g.device, dtype=g.dtype)
    for _ in range(EIG_POWER):
        y = g @ orthonormal(y)
    q = orthonormal(y)
    return torch.linalg.eigvalsh(q.T @ g @ q).flip(0).clamp_min(0)[:k]


def orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (n, m) of the span of the columns of a tall y (n, m), by Cholesky QR
    twice (Q = Y·R⁻¹ with RᵀR = YᵀY, then once more to restore orthogonality lost to rounding):
    a few matrix products, where a Householder QR on a GPU runs column by column. Falls back to
    Householder QR when YᵀY is too ill-conditioned to factorise."""
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(y.T @ y, upper=True)
        if int(info) != 0:
            return torch.linalg.qr(y).Q
        y = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    return y


def near_front(bits: np.ndarray, err: np.ndarray, slack: float) -> np.ndarray:
    """Boolean mask: err_i ≤ (1 + slack) · min{err_j : bits_j ≤ bits_i}."""
    bits, err = np.asarray(bits), np.asarray(err, dtype=np.float64)
    order = np.argsort(bits, kind="stable")
    best = np.minimum.accumulate(err[order])
    # the best error among all candidates with no more bits (ties in bits share their group's best)
    sb = bits[order]
    last = np.searchsorted(sb, sb, side="right") - 1
    bound = np.empty_like(err)
    bound[order] = best[last]
    return err <= (1 + slack) * bound


def _proxy(spec: QuantSpec, cands: CandidateSet) -> QuantSpec:
    """The data-free rtn config that stands in for a data-aware one when pruning."""
    gs = max(cands.group_sizes) if spec.method == "nuq" else spec.group_size
    return QuantSpec("rtn", spec.bits, gs, spec.group_dim, outliers=spec.outliers, clip=cands.clip)


def _chunks(w: torch.Tensor, specs: list[QuantSpec]) -> list[list[QuantSpec]]:
    """The specs in groups whose reconstructions together stay within RECON elements (gptq configs
    stay together up to what one GPTQ sweep stacks, so that they share it)."""
    from .gptq import max_stack

    per = max(1, RECON // w.numel())
    gptq_per = max(per, max_stack(w.device) // w.numel())
    out, cur, cur_gptq = [], [], []
    for s in specs:
        bucket = cur_gptq if s.method == "gptq" else cur
        bucket.append(s)
        if len(bucket) >= (gptq_per if s.method == "gptq" else per):
            out.append(list(bucket))
            bucket.clear()
    return out + [c for c in (cur, cur_gptq) if c]


@dataclass(frozen=True)
class _Raw:
    """A scored matrix kept as it is: its summary is formed only if the low-rank step asks for it."""

    b: torch.Tensor


def _errors(w: torch.Tensor, specs: list[QuantSpec], stats: MatrixStats | None, fn, summary=None,
            cache: dict | None = None, raw: list[int] | None = None
            ) -> tuple[np.ndarray, dict[QuantSpec, torch.Tensor | _Raw]]:
    """(``fn`` of each W − quantized W, a stack of differences -> errors, in chunks; with ``summary``,
    ``fn`` returns (errors, matrices) and {spec: summary(its matrix)} is returned too, or, while
    ``raw[0]`` elements are left, the matrix itself as :class:`_Raw` (a chunk at a time, ``raw[0]``
    counted down): most are never summarised. Only a chunk of reconstructions is in memory at a time,
    plus what ``cache`` keeps (up to KEEP elements) for a later call: a reconstruction found there is
    not computed again."""
    errs: dict[QuantSpec, float] = {}
    kept: dict[QuantSpec, torch.Tensor] = {}
    per = max(1, CHUNK // w.numel())
    cache = cache if cache is not None else {}
    todo = [s for s in specs if s not in cache]
    groups = _chunks(w, todo) + ([[s for s in specs if s in cache]] if len(todo) < len(specs) else [])
    for group in groups:
        recon = [cache.get(s) for s in group]
        if any(r is None for r in recon):
            recon = qmod.reconstruct_many(w, group, stats)
            for sp, r in zip(group, recon):
                if (len(cache) + 1) * w.numel() <= KEEP:
                    cache[sp] = r
        for i in range(0, len(group), per):
            part = recon[i:i + per]
            diff = torch.empty((len(part), *w.shape), dtype=w.dtype, device=w.device)
            for j, r in enumerate(part):
                torch.sub(w, r, out=diff[j])
            res = fn(diff)
            del diff
            if summary is not None:
                res, mats = res
                if raw is not None and raw[0] >= mats.numel():
                    raw[0] -= mats.numel()
                    kept.update((sp, _Raw(mt)) for sp, mt in zip(group[i:i + per], mats))
                else:
                    kept.update((sp, summary(mt)) for sp, mt in zip(group[i:i + per], mats))
            errs.update(zip(group[i:i + per], res.tolist()))
        del recon
    return np.array([errs[s] for s in specs], dtype=np.float64), kept


def _near(specs: list[QuantSpec], err: np.ndarray, shape, slack: float) -> list[QuantSpec]:
    bits = np.array([qmod.storage_bits(s, shape) for s in specs])
    return [s for s, ok in zip(specs, near_front(bits, err, slack)) if ok]


def matrix_costs(w: torch.Tensor, stats: MatrixStats | None, cands: CandidateSet = CandidateSet(),
                 metric: str = "kfac", on_progress: Callable[[int], None] | None = None,
                 rotation: Rotation | None = None) -> MatrixCosts:
    """The Pareto-optimal candidates of the (out, in) matrix ``w`` with their bits and errors.
    ``on_progress(n)`` is told as Q configurations are settled (n in all: ``len(cands.quant_specs())``
    per entry of ``cands.rotations``). ``rotation``: the matrix's rotation for its rotated candidates
    (default: ``Rotation.for_size(in)``, seed 0)."""
    step = on_progress or (lambda n: None)
    w = w.float()
    shape = tuple(w.shape)
    stats = stats.to(w.device) if stats is not None else None
    specs = cands.quant_specs()
    target = None
    if cands.target is not None:
        from . import serving

        target = serving.get_target(cands.target)
        specs = [s for s in specs if serving.refusal(MatrixSpec("quant", s), shape, target) is None]
        if not specs:
            fits = [g for g in (2 ** k for k in range(3, 13)) if any(  # group sizes the target serves for this shape
                serving.refusal(MatrixSpec("quant", replace(s, group_size=g)), shape, target) is None
                for s in cands.quant_specs())]
            below = [g for g in fits if g < shape[1]]  # the largest proper group, else one row per group
            pick = below[-1] if below else fits[0] if fits else None
            hint = f", e.g. --cand-group-sizes {','.join(map(str, [*cands.group_sizes, pick]))}" if pick else ""
            raise SpecError(f"no candidate group size suits a {shape[0]}x{shape[1]} matrix for target {target.name}; "
                            f"add one dividing {shape[1]} to --cand-group-sizes{hint}")
    out_specs, out_bits, out_err, evaluated = [], [], [], 0
    for rotate in cands.rotations:
        rot = (rotation or Rotation.for_size(shape[1])) if rotate else None
        wr, sr = w, stats
        if rot is not None:
            rot.check(shape[1], f"the input of a {shape[0]}x{shape[1]} matrix")
            wr, sr = rotate_weight(w, rot), (stats.rotated(rot) if stats is not None else None)
        sp, bt, er, ev = _candidates(wr, sr, specs, cands, metric, step, rot)
        out_specs += sp
        out_bits += bt
        out_err += er
        evaluated += ev
    if not out_specs:
        raise SpecError(f"no candidate fits a {shape[0]}x{shape[1]} matrix (ranks {cands.ranks} too large?)")
    bits, err = np.array(out_bits, dtype=np.int64), np.array(out_err, dtype=np.float64)
    front = pareto_front(bits, err) if target is None else _scheme_fronts(out_specs, bits, err, shape[1])
    base = float(_Metric(stats, metric, w.device).errors(w.unsqueeze(0))[0])
    return MatrixCosts(tuple(out_specs[i] for i in front), bits[front], err[front], base, evaluated)


def _candidates(w: torch.Tensor, stats: MatrixStats | None, specs: list[QuantSpec], cands: CandidateSet, metric: str,
                step: Callable[[int], None], rot: Rotation | None
                ) -> tuple[list[MatrixSpec], list[int], list[float], int]:
    """(specs, bits, errors, configs evaluated) of every candidate of ``w`` (already rotated by ``rot``,
    with its statistics) that the pruning keeps, before the Pareto front."""
    shape = tuple(w.shape)
    ranks = sorted(r for r in set(cands.ranks) if 0 < r <= min(shape))
    m = _Metric(stats, metric, w.device, top=max(ranks, default=0))
    aware = [s for s in specs if QUANTIZERS[s.method].data_aware]
    free = [s for s in specs if not QUANTIZERS[s.method].data_aware]
    # 1. data-free configs and the rtn proxies of the data-aware ones, screened cheaply
    proxies = list(dict.fromkeys(_proxy(s, cands) for s in aware))
    cheap = list(dict.fromkeys(free + proxies))
    recon: dict[QuantSpec, torch.Tensor] = {}  # screened reconstructions kept for step 3, within KEEP
    screen = dict(zip(cheap, _errors(w, cheap, stats, m.screen, cache=recon)[0]))
    # 2. a data-aware config runs when its proxy is near the front of the proxies (same quantizer family)
    near_proxies = set(_near(proxies, np.array([screen[s] for s in proxies]), shape, cands.slack))
    run = [s for s in aware if _proxy(s, cands) in near_proxies]
    # each Q config's D·E·C is kept only as what the low rank needs (its smaller Gram matrix)
    raw = [RAW_KEEP]  # scored matrices kept whole (until this budget is spent) rather than summarised now
    aerr, spectral = _errors(w, run, stats, m.errors_and_spectral, m.spectral_summary, raw=raw)
    step(len(aware))
    # 3. exact errors for the data-free configs near the front of (their screened errors, the
    #    data-aware configs' exact errors): most are dominated by the data-aware ones
    joint = free + run
    jerr = np.concatenate([np.array([screen[s] for s in free]), aerr])
    free_set = set(free)
    free_near = [s for s in _near(joint, jerr, shape, cands.slack) if s in free_set]
    ferr, fspec = _errors(w, free_near, stats, m.errors_and_spectral, m.spectral_summary, cache=recon, raw=raw)
    del recon
    spectral.update(fspec)
    qspecs = free_near + run
    step(len(free))
    q0 = np.concatenate([ferr, aerr])
    qbits = np.array([qmod.storage_bits(s, shape) for s in qspecs], dtype=np.int64)
    evaluated = len(cheap) + len(run)
    wt = metric  # built matrices use the metric's weighting for their low rank (and report it)
    out_specs, out_bits, out_err = [], [], []
    if 0 in cands.ranks:
        for s, b, e in zip(qspecs, qbits, q0):
            out_specs.append(MatrixSpec("quant", s, 0, factor_dtype=cands.factor_dtype, weighting=wt, rotation=rot))
            out_bits.append(int(b))
            out_err.append(float(e))
    # 4. low rank for the Q configs near the exact rank-0 front: one spectrum serves every rank
    if ranks:
        for s, b, e, ok in zip(qspecs, qbits, q0, near_front(qbits, q0, cands.lowrank_slack)):
            if not ok:
                continue
            evaluated += len(ranks)
            sm = spectral[s]
            sm = m.spectral_summary(sm.b) if isinstance(sm, _Raw) else sm
            for r, er in zip(ranks, m.rank_errors(sm, float(e), ranks)):
                spec = MatrixSpec("lorc", s, r, factor_dtype=cands.factor_dtype, weighting=wt, rotation=rot)
                out_specs.append(spec)
                out_bits.append(storage_bits(spec, shape))
                out_err.append(er)
    return out_specs, out_bits, out_err, evaluated


def min_candidate_bits(cands: CandidateSet, shape: tuple[int, int]) -> int:
    """A lower bound of the stored bits of any candidate of a ``shape`` matrix, from the specs alone
    (no data): the cheapest Q configuration (that the target serves), plus the smallest rank's
    factors when rank 0 is not a candidate."""
    specs = cands.quant_specs()
    if cands.target is not None:
        from . import serving

        target = serving.get_target(cands.target)
        specs = [s for s in specs if serving.refusal(MatrixSpec("quant", s), shape, target) is None] or specs
    q = min(qmod.storage_bits(s, shape) for s in specs)
    if 0 in cands.ranks:
        return q
    r = min(r for r in cands.ranks if r > 0)
    return storage_bits(MatrixSpec("lorc", specs[0], r, factor_dtype=cands.factor_dtype), shape) - \
        qmod.storage_bits(specs[0], shape) + q


def _scheme_fronts(specs: list[MatrixSpec], bits: np.ndarray, err: np.ndarray, in_features: int) -> np.ndarray:
    """The Pareto front within each integer scheme, by increasing bits."""
    from .serving import scheme

    keys = [scheme(s.quant, in_features) for s in specs]
    keep = []
    for k in dict.fromkeys(keys):
        idx = np.array([i for i, kk in enumerate(keys) if kk == k])
        keep.extend(idx[pareto_front(bits[idx], err[idx])].tolist())
    keep = np.array(sorted(keep), dtype=np.int64)
    return keep[np.lexsort((err[keep], bits[keep]))]


def metric_error(e: torch.Tensor, stats: MatrixStats | None, metric: str = "kfac") -> float:
    """The cost table's error of one (out, in) difference e = W − Ŵ under ``metric``."""
    return float(_Metric(stats, metric, e.device).errors(e.float().unsqueeze(0))[0])
