from dataclasses import replace

import pytest
import torch

from lqkit.core import MatrixSpec, MatrixStats, QuantSpec, decompose, dequantize, storage_bits, truncated_svd
from lqkit.core.rotation import Rotation, unrotate_weight
from lqkit.core.stats import rel_error
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


def _spiky(shape=(96, 160), seed=0, spikes=20):
    """_w with a few large entries: what an incoherence rotation spreads over its blocks."""
    w = _w(shape, seed)
    g = torch.Generator().manual_seed(seed + 100)
    w.view(-1)[torch.randint(0, w.numel(), (spikes,), generator=g)] = torch.randn(spikes, generator=g) * 0.5
    return w


@pytest.mark.parametrize("spec", [MatrixSpec("quant", Q3), MatrixSpec("lq", Q3, rank=8, iters=5),
                                  MatrixSpec("lowrank", None, rank=6)], ids=lambda s: s.method)
def test_rotated_decomposition_reconstructs_w(spec):
    """A rotated spec stores the parts of W·Rᵀ (zero extra bits); reconstruct() rotates them back."""
    w = _spiky()
    rot = Rotation.for_size(160, seed=3)  # blocks of 32 over 160 inputs
    d = decompose(w, replace(spec, rotation=rot))
    rotated = (dequantize(d.q) if d.q is not None else 0) + (d.L.float() @ d.R.float() if d.L is not None else 0)
    torch.testing.assert_close(d.reconstruct(), unrotate_weight(rotated, rot))  # Ŵ = Ŵ'·R
    assert d.error == pytest.approx(float((w - d.reconstruct()).norm() / w.norm()), rel=1e-4)
    assert d.nbits == storage_bits(spec, tuple(w.shape)) == decompose(w, spec).nbits
    if spec.method == "quant":  # the spikes spread over their blocks: a smaller error at the same bits
        assert d.error < 0.95 * decompose(w, spec).error


@pytest.mark.parametrize("weighting", ["hessian", "kfac"])
def test_rotated_decomposition_uses_rotated_statistics(weighting):
    """gptq and the weighted LQ objective run on W·Rᵀ with R·H·Rᵀ: the weighted error they report is
    the one of the rotated-back reconstruction under the original statistics."""
    g = torch.Generator().manual_seed(4)
    w = _spiky((48, 64))
    x = torch.randn(300, 64, generator=g) @ (torch.randn(64, 64, generator=g) * 0.3 + torch.eye(64))
    st = MatrixStats(h=x.T @ x / 300, fisher=torch.rand(48, 64, generator=g) + 0.1)
    rot = Rotation.for_size(64, seed=5)
    spec = MatrixSpec("lq", QuantSpec("gptq", 3, 16), rank=4, iters=3, weighting=weighting, rotation=rot)
    d = decompose(w, spec, st)
    assert d.weighted_error == pytest.approx(rel_error(w, d.reconstruct(), st, weighting), rel=1e-3)


def test_rotated_spec_json_label_and_checks():
    rot = Rotation(12345, 32)
    s = MatrixSpec("lq", Q3, rank=4, rotation=rot)
    assert MatrixSpec.from_dict(s.to_dict()) == s and s.to_dict()["rotation"] == {"seed": 12345, "block": 32}
    assert "rotation" not in MatrixSpec("lq", Q3, rank=4).to_dict()  # unrotated plans keep their JSON
    assert s.label().endswith("+rot")
    with pytest.raises(SpecError, match="does not divide"):
        decompose(_w((20, 48)), s)
