"""Cost tables: exact bits, errors equal to those of the built decompositions, sound pruning."""

import numpy as np
import pytest
import torch

from lqkit.core import MatrixStats, decompose, storage_bits
from lqkit.core import costs as C
from lqkit.core.costs import CandidateSet, matrix_costs, metric_error, near_front
from lqkit.core.rotation import Rotation
from lqkit.errors import SpecError


def problem(seed, out=40, n=96, tokens=500):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, 4, generator=g) @ torch.randn(4, n, generator=g) * 0.02 + torch.randn(out, n, generator=g) * 0.02
    w[3, 5] = 0.5  # an outlier
    mix = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * (torch.rand(n, generator=g) * 3)
    fisher = (torch.rand(out, 1, generator=g) ** 2) * (x.square().mean(0))[None, :] + 1e-6
    return w, MatrixStats(h=x.T @ x / tokens, fisher=fisher)


SMALL = CandidateSet(quantizers=("rtn", "nf", "gptq", "nuq"), bits=(2, 3, 4), group_sizes=(16, 32),
                     ranks=(0, 4, 8), outliers=(0.0, 0.02), factor_dtype="float32")


@pytest.mark.parametrize("metric", ["kfac", "hessian", "fisher"])
def test_table_bits_and_errors_are_those_of_the_built_matrices(metric):
    w, st = problem(0)
    t = matrix_costs(w, st, SMALL, metric)
    assert len(t.specs) >= 3 and np.all(np.diff(t.bits) > 0) and np.all(np.diff(t.errors) < 0)
    for spec, bits, err in zip(t.specs, t.bits, t.errors):
        d = decompose(w, spec, st)
        assert d.nbits == bits == storage_bits(spec, tuple(w.shape))
        built = metric_error(w - d.reconstruct(), st, metric)
        assert built == pytest.approx(err, rel=1e-3), spec.label()
    assert t.base == pytest.approx(metric_error(w, st, metric), rel=1e-6)


def test_pruning_keeps_the_front_close_to_exhaustive():
    w, st = problem(1)
    full = matrix_costs(w, st, CandidateSet(**{**SMALL.to_dict(), "slack": float("inf"), "lowrank_slack": float("inf")}))
    pruned = matrix_costs(w, st, SMALL)
    assert pruned.evaluated < full.evaluated
    # at every budget the pruned front's best error is within the slack of the exhaustive one
    for b in full.bits:
        best_full = full.errors[full.bits <= b].min()
        best_pruned = pruned.errors[pruned.bits <= b].min() if (pruned.bits <= b).any() else np.inf
        assert best_pruned <= best_full * (1 + SMALL.slack) ** 2


def test_near_front():
    bits = np.array([1, 2, 2, 3, 5])
    err = np.array([10.0, 6.0, 5.0, 7.0, 1.0])
    assert near_front(bits, err, 0.0).tolist() == [True, False, True, False, True]
    assert near_front(bits, err, 0.25).tolist() == [True, True, True, False, True]


def test_candidate_set_validation_and_round_trip():
    c = CandidateSet(bits=(2, 3), ranks=(0, 16))
    assert CandidateSet.from_dict(c.to_dict()) == c
    assert all(s.bits <= 4 for s in c.quant_specs() if s.method in ("nf", "nuq"))
    with pytest.raises(SpecError, match="unknown quantizer"):
        CandidateSet(quantizers=("foo",))
    with pytest.raises(SpecError, match="no valid"):
        CandidateSet(quantizers=("nf",), bits=(8,))
    with pytest.raises(SpecError, match="metric"):
        matrix_costs(torch.randn(8, 8), None, c, "l2")


def test_top_eigenvalues_of_large_grams_match_lapack():
    """Above EIG_EXACT_MAX rows the spectrum's top comes from randomized subspace iteration: the
    rank-r errors it gives (trace − partial sum) are within 1 % of LAPACK's and never below them."""
    from lqkit.core.costs import EIG_EXACT_MAX, top_eigenvalues

    torch.manual_seed(0)
    n = EIG_EXACT_MAX + 300
    for decay in (0.0, 0.5):  # a flat (residual-like) spectrum and a decaying one
        a = torch.randn(n, n, dtype=torch.float64) * torch.arange(1, n + 1, dtype=torch.float64) ** -decay
        g = a @ a.T
        exact = torch.cumsum(torch.linalg.eigvalsh(g).flip(0)[:64], 0)
        fast = torch.cumsum(top_eigenvalues(g, 64), 0)
        assert (fast <= exact * (1 + 1e-12)).all()
        err_exact, err_fast = g.trace() - exact, g.trace() - fast
        assert float(((err_fast - err_exact) / err_exact).max()) < 1e-2


def spiky(seed=0, spikes=12):
    """problem() with a dozen large entries: a matrix where an input rotation helps."""
    w, st = problem(seed)
    g = torch.Generator().manual_seed(5)
    w.view(-1)[torch.randint(0, w.numel(), (spikes,), generator=g)] = torch.randn(spikes, generator=g) * 0.4
    return w, st


ROTATING = CandidateSet(**{**SMALL.to_dict(), "rotations": (False, True)})


def test_orthonormal_basis_by_cholesky_qr_and_its_fallback():
    from lqkit.core.costs import orthonormal

    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -5, 40, dtype=torch.float64)
    q = orthonormal(y)
    assert torch.allclose(q.T @ q, torch.eye(40, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q @ (q.T @ y), y, atol=1e-10)  # the same span
    deficient = torch.cat([y[:, :20], y[:, :20]], dim=1)  # YᵀY singular: Householder QR instead
    q = orthonormal(deficient)
    assert q.shape == (500, 40)
    assert torch.allclose(q.T @ q, torch.eye(40, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("metric", ["kfac", "hessian"])
def test_rotated_candidates_share_the_front_with_comparable_errors(metric):
    """Rotated and unrotated candidates are scored in the same coordinates (exactly, for kfac and hessian):
    the table's error of each is the error of the built matrix, rotated back, under the original statistics."""
    w, st = spiky()
    rot = Rotation.for_size(96, seed=11)
    t = matrix_costs(w, st, ROTATING, metric, rotation=rot)
    assert {s.rotation for s in t.specs} == {None, rot}  # both kinds on the front
    plain = matrix_costs(w, st, SMALL, metric)
    assert t.base == pytest.approx(plain.base) and t.evaluated > plain.evaluated
    for b in plain.bits:  # the joint front is never worse than the unrotated one
        assert t.errors[t.bits <= b].min() <= plain.errors[plain.bits <= b].min() * (1 + 1e-9)
    for spec, bits, err in list(zip(t.specs, t.bits, t.errors))[::3]:
        d = decompose(w, spec, st)
        assert d.nbits == bits
        assert metric_error(w - d.reconstruct(), st, metric) == pytest.approx(err, rel=1e-3), spec.label()


def test_candidate_rotations_validation_and_keys():
    assert "rotations" not in SMALL.to_dict()  # cost tables cached before rotations keep their keys
    assert CandidateSet.from_dict(ROTATING.to_dict()) == ROTATING and ROTATING.to_dict()["rotations"] == (False, True)
    with pytest.raises(SpecError, match="distinct booleans"):
        CandidateSet(rotations=(True, True))
    with pytest.raises(SpecError, match="takes no input rotation"):
        CandidateSet(rotations=(False, True), target="vllm")


def test_large_gram_matrices_kept_as_eigenvalues_give_the_same_table(monkeypatch):
    """Low-rank summaries above GRAM_KEEP_MAX elements are reduced to their top eigenvalues at once
    (bounded memory on large matrices); the table is the same as with the Gram matrices kept whole."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 80, generator=g) * 0.02
    x = torch.randn(400, 80, generator=g) * torch.rand(80, generator=g) * 2
    st = MatrixStats(h=x.T @ x / 400, fisher=torch.rand(96, 80, generator=g) ** 4)
    cands = C.CandidateSet(quantizers=("rtn", "gptq"), bits=(2, 3), group_sizes=(16, 32), ranks=(0, 4, 16))
    monkeypatch.setattr(C, "GRAM_KEEP_MAX", 1 << 40)
    whole = C.matrix_costs(w, st, cands)
    monkeypatch.setattr(C, "GRAM_KEEP_MAX", 0)
    reduced = C.matrix_costs(w, st, cands)
    assert any(s.rank > 0 for s in whole.specs)
    assert [s.to_dict() for s in whole.specs] == [s.to_dict() for s in reduced.specs]
    assert np.array_equal(whole.errors, reduced.errors) and np.array_equal(whole.bits, reduced.bits)


def test_scored_matrices_kept_whole_give_the_same_table(monkeypatch):
    """Error matrices kept whole until the low-rank step (RAW_KEEP) give the table that summarising
    each at once gives."""
    from lqkit.core import costs

    w, st = problem(4)
    kept = matrix_costs(w, st, SMALL)
    monkeypatch.setattr(costs, "RAW_KEEP", 0)  # every matrix summarised as it is scored
    at_once = matrix_costs(w, st, SMALL)
    assert kept.specs == at_once.specs
    assert np.array_equal(kept.errors, at_once.errors) and np.array_equal(kept.bits, at_once.bits)
