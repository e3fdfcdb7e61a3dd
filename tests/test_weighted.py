"""Data-aware low rank (Fisher-weighted / activation-aware SVD), weighted LQ, AdaDim, spec compat."""

import pytest
import torch

from lqkit.core import MatrixSpec, MatrixStats, QuantSpec, decompose, truncated_svd
from lqkit.core.adadim import choose_group_dim, group_dim_errors
from lqkit.core.lowrank import scaled_svd
from lqkit.core import gptq
from lqkit.core.stats import (cholesky_, damped, fisher_scales, invert_lower_, kfac_rows, memo_on, sq_error,
                              weight_scales, whitening)
from lqkit.errors import SpecError


def _problem(seed, out=48, n=80):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, 6, generator=g) @ torch.randn(6, n, generator=g) * 0.01 + torch.randn(out, n, generator=g) * 0.02
    x = torch.randn(300, n, generator=g) * (torch.rand(n, generator=g) * 4) ** 2
    r, c = torch.rand(out, generator=g) ** 3 + 1e-3, torch.rand(n, generator=g) ** 3 + 1e-3
    return w, MatrixStats(h=x.T @ x / 300, fisher=r[:, None] * c[None, :])  # separable Fisher


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighting", ["fisher", "hessian"])
def test_weighted_svd_reduces_weighted_error(seed, weighting):
    w, st = _problem(seed)
    plain = truncated_svd(w, 8).product()
    if weighting == "fisher":
        r, c = fisher_scales(st.fisher)
        lr = scaled_svd(w, 8, r, c)
    else:
        s, s_inv = whitening(st.h, damp=1e-6)
        lr = scaled_svd(w, 8, right=s, right_inv=s_inv)
    assert sq_error(w - lr.product(), st, weighting) < sq_error(w - plain, st, weighting)


def test_whitening_guards_singular_h():
    x = torch.randn(3, 20)
    h = x.T @ x  # rank 3
    s, s_inv = whitening(h, damp=0.0)  # Cholesky fails -> eigen fallback
    assert torch.isfinite(s).all() and torch.isfinite(s_inv).all()
    torch.testing.assert_close(s @ s_inv, torch.eye(20), atol=1e-3, rtol=0)
    with pytest.raises(SpecError):
        whitening(torch.full((4, 4), float("nan")))


@pytest.mark.parametrize("n,block", [(1, 4), (7, 3), (64, 16), (50, 64)])
def test_lower_factor_and_inverse_in_place_equal_dense(n, block):
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = a @ a.T + n * torch.eye(n, dtype=torch.float64)
    chol = torch.linalg.cholesky(h)
    ref = torch.linalg.solve_triangular(chol, torch.eye(n, dtype=torch.float64), upper=False)
    m = h.clone()
    ptr = m.data_ptr()
    assert cholesky_(m, block) and m.data_ptr() == ptr
    torch.testing.assert_close(m, chol, atol=1e-12, rtol=1e-10)
    assert invert_lower_(m, block).data_ptr() == ptr
    torch.testing.assert_close(m, ref, atol=1e-12, rtol=1e-10)
    assert not cholesky_(-h.clone(), block)  # not positive definite


def test_memo_on_remembers_per_tensor_and_forgets_on_change():
    calls = []
    h = torch.randn(5, 5)
    f = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert memo_on(h, "k", f) == 1 and memo_on(h, "k", f) == 1  # once per key
    assert memo_on(h, "other", f) == 2
    assert memo_on(h.clone(), "k", f) == 3  # another tensor (equal values) is another entry
    h.add_(1.0)  # an in-place change drops what was remembered
    assert memo_on(h, "k", f) == 4


def test_factorisations_are_computed_once_per_h(monkeypatch):
    x = torch.randn(200, 24)
    h = x.T @ x / 200
    s1 = whitening(h)
    assert whitening(h)[0] is s1[0]
    spec = QuantSpec("gptq", 3, 8)
    calls = []
    real = gptq.inverse_cholesky
    monkeypatch.setattr(gptq, "inverse_cholesky", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(16, 24)
    first = gptq.gptq_many(w, h, [spec])[0]
    again = gptq.gptq_many(w, h, [QuantSpec("gptq", 4, 8), spec])[1]
    assert len(calls) == 1  # one factorisation for every chunk of configurations on this H
    torch.testing.assert_close(first.q, again.q, atol=0, rtol=0)


@pytest.mark.parametrize("weighting", ["fisher", "hessian", "kfac"])
@pytest.mark.parametrize("method", ["lq", "lorc"])
def test_weighted_decompositions_beat_unweighted_on_their_objective(weighting, method):
    w, st = _problem(7)
    q = QuantSpec("rtn", 3, 16)
    dw = decompose(w, MatrixSpec(method, q, 8, weighting=weighting), st)
    du = decompose(w, MatrixSpec(method, q, 8), st)
    assert sq_error(w - dw.reconstruct(), st, weighting) < sq_error(w - du.reconstruct(), st, weighting)
    assert dw.weighted_error == pytest.approx(min(dw.history), rel=1e-6) and du.weighted_error is None


def test_lq_with_gptq_inside():
    w, st = _problem(8)
    d = decompose(w, MatrixSpec("lq", QuantSpec("gptq", 2, 16), 8, iters=6, weighting="hessian"), st)
    lorc = decompose(w, MatrixSpec("lorc", QuantSpec("rtn", 2, 16), 8), st)
    assert torch.isfinite(d.reconstruct()).all()
    assert sq_error(w - d.reconstruct(), st, "hessian") < sq_error(w - lorc.reconstruct(), st, "hessian")


def test_weighting_needs_stats():
    w, _ = _problem(0)
    with pytest.raises(SpecError, match="Fisher"):
        decompose(w, MatrixSpec("lq", QuantSpec("rtn", 3, 16), 4, weighting="fisher"))
    with pytest.raises(SpecError, match="weighting"):
        MatrixSpec("lq", QuantSpec("rtn", 3, 16), 4, weighting="l1")


def test_adadim_picks_the_smaller_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * 0.02 * (torch.rand(64, generator=g) * 20)[None, :]  # uneven columns
    q = QuantSpec("rtn", 3, 16, "auto")
    errs = group_dim_errors(w, q)
    chosen = choose_group_dim(w, q).group_dim
    assert errs[chosen] == min(errs.values()) and chosen == "out"
    d = decompose(w, MatrixSpec("quant", q))
    assert d.spec.quant.group_dim == "out"
    with pytest.raises(SpecError, match="auto"):
        from lqkit.core import quantize
        quantize(w, q)


def test_spec_dicts_round_trip_and_old_dicts_load():
    s = MatrixSpec("lq", QuantSpec("gptq", 3, 64, act_order=True, outliers=0.005), 16, weighting="hessian")
    assert MatrixSpec.from_dict(s.to_dict()) == s
    old = {"method": "lq", "quant": {"method": "rtn", "bits": 3, "group_size": 128, "group_dim": "in",
                                     "double_quant": False, "scale_dtype": "float16"},
           "rank": 8, "iters": 20, "tol": 1e-4, "factor_dtype": "float16"}
    m = MatrixSpec.from_dict(old)
    assert m.weighting == "none" and m.quant.outliers == 0.0 and m.label() == "lq:rtn3/g128in+r8"


def test_kfac_weighting_is_the_whitened_row_scaled_norm():
    w, st = _problem(3)
    e = torch.randn_like(w)
    d, s, _ = weight_scales(st, "kfac")
    exact = float(sq_error(e, st, "kfac"))
    whitened = float(((d[:, None] * e) @ s).square().sum())
    assert whitened == pytest.approx(exact, rel=2e-2)  # equal up to the 1% dampening of H
    # with a Fisher that is exactly Kronecker-factored (F_ij = ρ_i·H_jj) kfac reduces to it on diagonal H
    h = torch.diag(torch.rand(w.shape[1]) + 0.1)
    rho = torch.rand(w.shape[0])
    st2 = MatrixStats(h=h, fisher=rho[:, None] * torch.diagonal(h)[None, :])
    torch.testing.assert_close(kfac_rows(st2.fisher, h), rho)
    torch.testing.assert_close(sq_error(e, st2, "kfac"), sq_error(e, st2, "fisher"))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighting", ["none", "kfac"])
def test_lq_init_quant_never_worse_than_lorc(seed, weighting):
    w, st = _problem(seed)
    for q in (QuantSpec("rtn", 2, 16), QuantSpec("gptq", 3, 16)):
        lorc = decompose(w, MatrixSpec("lorc", q, 8, weighting=weighting), st)
        lq = decompose(w, MatrixSpec("lq", q, 8, iters=4, weighting=weighting, init="quant"), st)
        assert lq.history[0] == pytest.approx(lorc.history[0], rel=1e-6)
        assert min(lq.history) <= lq.history[0]
        werr = (lambda d: d.weighted_error) if weighting != "none" else (lambda d: d.error)
        assert werr(lq) <= werr(lorc) * (1 + 1e-6)


def test_init_is_an_lq_option():
    with pytest.raises(SpecError, match="init"):
        MatrixSpec("lorc", QuantSpec("rtn", 3, 16), 4, init="quant")
    assert MatrixSpec("lq", QuantSpec("rtn", 3, 16), 4, init="quant").label() == "lq(init=quant):rtn3/g16in+r4"


@pytest.mark.parametrize("n", [1, 9, 70])
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(n):
    a = torch.randn(n, 3 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = (a @ a.T / (3 * n)).float()
    u = gptq.inverse_cholesky(h, 0.01)
    hinv = torch.linalg.inv(damped(h, 0.01).double())
    ref = torch.linalg.cholesky(hinv, upper=True)  # the unique factor with a positive diagonal
    assert torch.equal(u, torch.triu(u))
    torch.testing.assert_close(u.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)
