"""Budget allocation (pure optimisation over arrays): pick one candidate per matrix so that the total
estimated error is smallest while the total stored bits stay within a budget.

The problem is a multiple-choice knapsack, solved exactly as a mixed-integer linear program with
``scipy.optimize.milp`` (HiGHS)::

    minimise   Σ_m Σ_c err[m][c] · x[m][c]
    subject to Σ_c x[m][c] = 1            for every matrix m
               Σ_m Σ_c bits[m][c] · x[m][c] ≤ budget
               x binary

Candidates that another candidate of the same matrix dominates (no more bits and no more error)
never help and are dropped first (:func:`pareto_front`); this keeps the program small.

Ties (a serving runtime fuses layers that read one input, e.g. q/k/v, into one layer of one scheme):
each candidate carries a label (its scheme), and the matrices of a tie pick the same label::

               Σ_{c: label ℓ} x[m][c] = Σ_{c: label ℓ} x[m0][c]   for every tied m, its group's first m0, every ℓ

Only labels every member of a tie has are kept for its members, and dominance is judged within a
label (a candidate dominated by one of another label may still be the one its partners need).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import SpecError


class BudgetError(SpecError):
    """The budget cannot be met by any choice of candidates."""


@dataclass(frozen=True)
class Allocation:
    """The solver's answer: ``choice[m]`` indexes matrix m's candidate list."""

    choice: tuple[int, ...]
    bits: int  # total stored bits of the chosen candidates
    budget_bits: int
    objective: float  # total estimated error of the choice
    status: str  # solver status message
    optimal: bool  # proven optimal (within the solver's gap)
    seconds: float
    variables: int  # candidates left after dominance pruning (the program's binaries)


def pareto_front(bits: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated candidates, by increasing bits (ties: the smaller error; among
    exact duplicates the first). A candidate is dominated when another has ≤ bits and ≤ error, one
    of them strictly (or is an earlier exact duplicate)."""
    bits, err = np.asarray(bits), np.asarray(err, dtype=np.float64)
    order = np.lexsort((np.arange(len(bits)), err, bits))  # by bits, then error, then index
    keep, best = [], np.inf
    for i in order:
        if err[i] < best:
            keep.append(i)
            best = err[i]
    return np.asarray(keep, dtype=np.int64)


def min_bits(bits: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None = None,
             ties: Sequence[Sequence[int]] = ()) -> int:
    """The smallest total achievable: the cheapest candidate of every matrix (of every tie, the
    cheapest label they share)."""
    if not ties:
        return int(sum(int(np.min(b)) for b in bits))
    tied = {m for t in ties for m in t}
    total = sum(int(np.min(b)) for m, b in enumerate(bits) if m not in tied)
    for t in ties:
        common = _common(labels, t)
        total += min(sum(int(bits[m][labels[m] == lab].min()) for m in t) for lab in common)
    return int(total)


def _common(labels: Sequence[np.ndarray], tie: Sequence[int]) -> set:
    common = set(np.asarray(labels[tie[0]]).tolist())
    for m in tie[1:]:
        common &= set(np.asarray(labels[m]).tolist())
    if not common:
        raise BudgetError(f"matrices {list(tie)} must share one scheme but have no candidate scheme in common; "
                          "widen the candidates")
    return common


def _check_ties(n: int, labels, ties) -> list[tuple[int, ...]]:
    ties = [tuple(int(m) for m in t) for t in ties if len(t) > 1]
    seen: set[int] = set()
    for t in ties:
        if any(not 0 <= m < n for m in t) or seen & set(t) or len(set(t)) != len(t):
            raise SpecError(f"ties must be disjoint groups of matrix indices in [0, {n}), got {ties}")
        seen |= set(t)
    if ties and (labels is None or len(labels) != n):
        raise SpecError("ties need one label per candidate of every matrix")
    return ties


def _fronts(bits, err, labels, ties) -> list[np.ndarray]:
    """Per matrix, the candidates the program keeps: the Pareto front, or for a tied matrix the front
    within each label its tie shares."""
    fronts = [pareto_front(b, e) for b, e in zip(bits, err)]
    for t in ties:
        common = _common(labels, t)
        for m in t:
            lab = np.asarray(labels[m])
            idx = [np.flatnonzero(lab == v) for v in common]
            fronts[m] = np.sort(np.concatenate([i[pareto_front(bits[m][i], err[m][i])] for i in idx]))
    return fronts


def _check(bits: Sequence[np.ndarray], err: Sequence[np.ndarray]) -> None:
    if len(bits) != len(err):
        raise SpecError(f"{len(bits)} bit rows but {len(err)} error rows")
    for m, (b, e) in enumerate(zip(bits, err)):
        if len(b) == 0 or len(b) != len(e):
            raise SpecError(f"matrix {m}: needs at least one candidate with one error per candidate")
        if not np.all(np.isfinite(e)):
            raise SpecError(f"matrix {m}: candidate errors must be finite")


def _tie_rows(fronts, labels, ties, owner_start) -> list[tuple[list[int], list[float]]]:
    """Sparse rows (columns, values) of the tie equalities."""
    rows = []
    for t in ties:
        m0 = t[0]
        lab0 = np.asarray(labels[m0])[fronts[m0]]
        for m in t[1:]:
            lab = np.asarray(labels[m])[fronts[m]]
            for v in sorted(set(lab0.tolist()) | set(lab.tolist())):
                cols = [owner_start[m] + i for i in np.flatnonzero(lab == v)]
                cols0 = [owner_start[m0] + i for i in np.flatnonzero(lab0 == v)]
                rows.append((cols + cols0, [1.0] * len(cols) + [-1.0] * len(cols0)))
    return rows


def solve(bits: Sequence[np.ndarray], err: Sequence[np.ndarray], budget_bits: int, *,
          labels: Sequence[np.ndarray] | None = None, ties: Sequence[Sequence[int]] = (),
          time_limit: float = 120.0, gap: float = 1e-6) -> Allocation:
    """Minimise total error with total bits ≤ ``budget_bits``, one candidate per matrix; the
    matrices of each tie (indices) pick candidates of one label (``labels[m][c]``, any integers)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    t0 = time.time()
    _check(bits, err)
    bits = [np.asarray(b, dtype=np.int64) for b in bits]
    err = [np.asarray(e, dtype=np.float64) for e in err]
    ties = _check_ties(len(bits), labels, ties)
    need = min_bits(bits, labels, ties)
    if budget_bits < need:
        raise BudgetError(f"a budget of {budget_bits} bits is below the smallest achievable {need} bits "
                          "(the cheapest candidate of every matrix); raise the budget or add cheaper candidates")
    fronts = _fronts(bits, err, labels, ties)
    fb = np.concatenate([b[f] for b, f in zip(bits, fronts)])
    fe = np.concatenate([e[f] for e, f in zip(err, fronts)])
    owner = np.concatenate([np.full(len(f), m) for m, f in enumerate(fronts)])
    n, nm = len(fb), len(fronts)
    scale = max(float(np.abs(fe).max()), 1e-300)  # errors to O(1) for the solver's tolerances
    one = csr_array((np.ones(n), (owner, np.arange(n))), shape=(nm, n))
    # the budget row in units of the bit counts' common divisor: the same feasible set, smaller numbers (at
    # 70B sizes, counts of ~1e10 bits made HiGHS fail with "Solve error" on a feasible program)
    unit = max(int(np.gcd.reduce(fb)), 1)
    budget = LinearConstraint((fb // unit)[None, :].astype(np.float64), -np.inf, float(budget_bits // unit))
    constraints = [LinearConstraint(one, 1, 1), budget]
    rows = _tie_rows(fronts, labels, ties, np.concatenate([[0], np.cumsum([len(f) for f in fronts])]))
    if rows:
        r = np.concatenate([np.full(len(c), i) for i, (c, _) in enumerate(rows)])
        c = np.concatenate([np.asarray(c, dtype=np.int64) for c, _ in rows])
        v = np.concatenate([np.asarray(v) for _, v in rows])
        constraints.append(LinearConstraint(csr_array((v, (r, c)), shape=(len(rows), n)), 0, 0))
    for presolve in (True, False):  # HiGHS's presolve has failed on feasible programs: then once without
        res = milp(fe / scale, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                   options={"time_limit": time_limit, "mip_rel_gap": gap, "presolve": presolve})
        if res.x is not None or res.status != 4:  # 4: the solver's own error, not infeasibility
            break
    message = str(res.message) + ("" if presolve else " (solved again without presolve)")
    if res.x is None:
        raise BudgetError(_no_solution(res.status, message, time_limit))
    x = np.rint(res.x).astype(bool)
    choice = []
    for m, f in enumerate(fronts):
        picked = np.flatnonzero(x[owner == m])
        if len(picked) != 1:
            raise BudgetError(f"the solver returned {len(picked)} candidates for matrix {m} ({res.message})")
        choice.append(int(f[picked[0]]))
    total = int(sum(int(b[c]) for b, c in zip(bits, choice)))
    if total > budget_bits:  # never report a plan over budget, whatever the solver's tolerances
        raise BudgetError(f"the solver's rounded solution uses {total} bits > budget {budget_bits} ({res.message})")
    for t in ties:  # nor one that breaks a tie
        if len({labels[m][c] for m, c in ((m, choice[m]) for m in t)}) != 1:
            raise BudgetError(f"the solver's rounded solution gives tied matrices {list(t)} different labels ({res.message})")
    objective = float(sum(float(e[c]) for e, c in zip(err, choice)))
    return Allocation(tuple(choice), total, int(budget_bits), objective, message,
                      bool(res.status == 0), time.time() - t0, n)


def _no_solution(status: int, message: str, time_limit: float) -> str:
    """What to tell a user when the solver returned no allocation, by scipy.optimize.milp's status."""
    if status == 1:
        return (f"the solver found no allocation within its time limit of {time_limit:g} s ({message}); "
                "narrow the candidates (e.g. fewer --cand-bits or --cand-ranks) or pass fewer matrices")
    if status == 2:
        return f"the solver found no feasible allocation ({message}); raise the budget"
    return (f"the solver failed on this allocation program, also without presolve ({message}); try a slightly "
            "different budget, and please report it with the cached cost table")
