import pytest
import torch

from lqkit.core import MatrixSpec, QuantSpec, decompose, storage_bits, truncated_svd
from lqkit.errors import SpecError


def _w(shape=(96, 160), seed=0):
    g = torch.Generator().manual_seed(seed)
    # low-rank structure plus noise, like trained weights
    return (torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g)) * 0.01 + \
        torch.randn(shape, generator=g) * 0.02


Q3 = QuantSpec("rtn", 3, 32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("q", [Q3, QuantSpec("nf", 2, 32, "out"), QuantSpec("rtn_sym", 2, 16)],
                         ids=lambda s: s.label())
def test_lq_never_worse_than_first_iterate(seed, q):
    w = _w(seed=seed)
    d = decompose(w, MatrixSpec("lq", q, rank=8, iters=15))
    assert d.error <= d.history[0] + 1e-7
    assert d.error == pytest.approx(min(d.history), abs=1e-7)
    # the reported error is that of the stored reconstruction
    rec = d.reconstruct()
    assert d.error == pytest.approx(float((w - rec).norm() / w.norm()), rel=1e-5)


def test_lq_improves_over_lorc_and_quant():
    w = _w(seed=1)
    e_q = decompose(w, MatrixSpec("quant", Q3)).error
    e_lorc = decompose(w, MatrixSpec("lorc", Q3, rank=8)).error
    e_lq = decompose(w, MatrixSpec("lq", Q3, rank=8)).error
    assert e_lq < e_lorc < e_q


def test_lowrank_is_eckart_young_optimal():
    w = _w(seed=2)
    d = decompose(w, MatrixSpec("lowrank", None, rank=10, factor_dtype="float32"))
    s = torch.linalg.svdvals(w)
    best = float(s[10:].norm() / s.norm())
    assert d.error == pytest.approx(best, rel=1e-4)


def test_randomized_svd_close_to_exact():
    w = _w((300, 200), seed=3)
    exact = truncated_svd(w, 8, randomized=False).product()
    approx = truncated_svd(w, 8, randomized=True).product()
    assert float((exact - approx).norm() / exact.norm()) < 1e-3


def test_factors_stored_in_factor_dtype_and_bits_exact():
    w = _w()
    for fd in ("float16", "bfloat16", "float32"):
        spec = MatrixSpec("lorc", Q3, rank=4, factor_dtype=fd)
        d = decompose(w, spec)
        assert str(d.L.dtype) == f"torch.{fd}" and d.L.shape == (96, 4) and d.R.shape == (4, 160)
        assert d.nbits == storage_bits(spec, tuple(w.shape))


def test_rank_too_large():
    with pytest.raises(SpecError, match="larger than"):
        decompose(_w((20, 30)), MatrixSpec("lq", Q3, rank=21))


@pytest.mark.parametrize("kw, msg", [
    (dict(method="svd"), "unknown method"),
    (dict(method="lq", quant=None, rank=4), "needs a quantizer"),
    (dict(method="lq", quant=Q3, rank=0), "rank of at least 1"),
    (dict(method="quant", quant=Q3, rank=4), "no low-rank"),
    (dict(method="lowrank", quant=Q3, rank=4), "takes no quantizer"),
    (dict(method="lq", quant=Q3, rank=-1), "non-negative"),
])
def test_bad_specs(kw, msg):
    with pytest.raises(SpecError, match=msg):
        MatrixSpec(**kw)


def test_spec_json_roundtrip():
    s = MatrixSpec("lq", QuantSpec("nf", 3, 64, "out", True), rank=16, iters=7)
    assert MatrixSpec.from_dict(s.to_dict()) == s
    s2 = MatrixSpec("lowrank", None, rank=3)
    assert MatrixSpec.from_dict(s2.to_dict()) == s2
