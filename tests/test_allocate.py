"""Allocation solver: exact against brute force, never over budget, dominance pruning, clear errors."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqkit.core.allocate import BudgetError, min_bits, pareto_front, solve


def random_instance(rng, matrices, candidates):
    bits = [rng.integers(1, 50, size=rng.integers(1, candidates + 1)) for _ in range(matrices)]
    err = [rng.random(len(b)) * 10 ** rng.uniform(-3, 3) for b in bits]
    return bits, err


def brute_force(bits, err, budget, labels=None, ties=()):
    """(least total error, choice) over every choice within ``budget``; with ``ties``, the matrices of
    each tie must take candidates of one label."""
    best = (np.inf, None)
    for choice in itertools.product(*(range(len(b)) for b in bits)):
        if sum(b[c] for b, c in zip(bits, choice)) > budget:
            continue
        if any(len({labels[m][choice[m]] for m in t}) > 1 for t in ties):
            continue
        e = sum(x[c] for x, c in zip(err, choice))
        if e < best[0]:
            best = (e, choice)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    bits, err = random_instance(rng, matrices=int(rng.integers(1, 6)), candidates=5)
    lo, hi = min_bits(bits), sum(int(b.max()) for b in bits)
    budget = int(rng.integers(lo, hi + 1))
    best, _ = brute_force(bits, err, budget)
    a = solve(bits, err, budget)
    assert a.optimal and a.bits <= budget
    assert a.objective == pytest.approx(best, rel=1e-6, abs=1e-12)
    assert a.bits == sum(b[c] for b, c in zip(bits, a.choice))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_budget_never_exceeded(data):
    m = data.draw(st.integers(1, 30))
    bits = [np.array(data.draw(st.lists(st.integers(1, 10 ** 6), min_size=1, max_size=8))) for _ in range(m)]
    err = [np.array(data.draw(st.lists(st.floats(0, 1e6), min_size=len(b), max_size=len(b)))) for b in bits]
    budget = data.draw(st.integers(min_bits(bits), sum(int(b.max()) for b in bits) + 10))
    a = solve(bits, err, budget)
    assert a.bits <= budget and len(a.choice) == m
    # the cheapest-everywhere plan is feasible, so the optimum is never worse than it
    cheapest = sum(float(e[np.argmin(b)]) for b, e in zip(bits, err))
    assert a.objective <= cheapest * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_bit_counts_of_70b_size_against_brute_force(seed):
    """Bit counts of 10⁹–10¹⁰ in multiples of 16, as a 70B model's matrices have (the budget row is
    solved in units of their common divisor; HiGHS once failed on such a row): still the exact optimum,
    never over budget, also with a budget that is not a multiple of 16."""
    rng = np.random.default_rng(seed)
    small, err = random_instance(rng, matrices=int(rng.integers(2, 6)), candidates=5)
    bits = [b * 2**26 + 16 * rng.integers(0, 2**20, size=len(b)) for b in small]
    assert int(np.gcd.reduce(np.concatenate(bits))) == 16
    budget = int(rng.integers(min_bits(bits), sum(int(b.max()) for b in bits) + 1)) | 7
    best, _ = brute_force(bits, err, budget)
    a = solve(bits, err, budget)
    assert a.objective == pytest.approx(best, rel=1e-6, abs=1e-12)
    assert a.bits == sum(int(b[c]) for b, c in zip(bits, a.choice)) <= budget


def test_solver_error_is_retried_without_presolve(monkeypatch):
    """HiGHS's "Solve error" (status 4) on a feasible program: solved again without presolve, not
    reported to the user as an infeasible budget."""
    import scipy.optimize

    real, calls = scipy.optimize.milp, []

    def flaky(*args, options, **kw):
        calls.append(options["presolve"])
        if options["presolve"]:
            return scipy.optimize.OptimizeResult(x=None, status=4, message="(HiGHS Status 4: Solve error)")
        return real(*args, options=options, **kw)

    monkeypatch.setattr(scipy.optimize, "milp", flaky)
    rng = np.random.default_rng(3)
    bits, err = random_instance(rng, matrices=4, candidates=5)
    budget = (min_bits(bits) + sum(int(b.max()) for b in bits)) // 2
    a = solve(bits, err, budget)
    assert calls == [True, False]
    assert a.objective == pytest.approx(brute_force(bits, err, budget)[0], rel=1e-6, abs=1e-12)
    assert "without presolve" in a.status

    def failing(status):
        def milp(*args, options, **kw):
            calls.append(options["presolve"])
            return scipy.optimize.OptimizeResult(x=None, status=status, message=f"status {status}")
        return milp

    for status, says in ((2, "raise the budget"), (1, "time limit"), (4, "please report it")):
        calls.clear()
        monkeypatch.setattr(scipy.optimize, "milp", failing(status))
        with pytest.raises(BudgetError, match=says):
            solve(bits, err, budget)
        assert calls == ([True, False] if status == 4 else [True])  # only the solver's own error is retried


def test_budget_below_minimum_names_it():
    bits = [np.array([10, 20]), np.array([5, 7])]
    err = [np.array([1.0, 0.5]), np.array([2.0, 1.0])]
    with pytest.raises(BudgetError, match="smallest achievable 15 bits"):
        solve(bits, err, 14)
    assert solve(bits, err, 15).choice == (0, 0)
    assert solve(bits, err, 27).choice == (1, 1)


def test_pareto_front_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        b, e = rng.integers(0, 6, n), rng.integers(0, 6, n).astype(float)
        front = set(pareto_front(b, e).tolist())
        for i in range(n):
            dominated = any((b[j] <= b[i] and e[j] <= e[i]) and (b[j] < b[i] or e[j] < e[i] or j < i)
                            for j in range(n) if j != i)
            assert (i not in front) == dominated


def test_bad_tables_are_errors():
    with pytest.raises(Exception, match="at least one candidate"):
        solve([np.array([], dtype=int)], [np.array([])], 10)
    with pytest.raises(Exception, match="finite"):
        solve([np.array([1])], [np.array([np.nan])], 10)
