"""Dense-and-sparse outliers and LLM.int8()-style 16-bit input features: exact restore, sizes, modules."""

import pytest
import torch

from lqkit.core import MatrixSpec, MatrixStats, QuantSpec, decompose, dequantize, quantize
from lqkit.core import quant as Q
from lqkit.nn.linear import CompressedLinear


def _w(seed=0, shape=(64, 128)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[torch.randperm(w.numel(), generator=g)[:40]] *= 30  # outliers
    return w


@pytest.mark.parametrize("method", ["rtn", "rtn_sym", "nf", "nuq"])
@pytest.mark.parametrize("dim", ["in", "out"])
def test_sparse_outliers_exactly_restored(method, dim):
    w = _w()
    spec = QuantSpec(method, 3, 32, dim, outliers=0.005, outlier_features=0.02)
    q = quantize(w, spec)
    wh = dequantize(q)
    idx = q.aux["sp_idx"].long()
    assert idx.numel() == Q.n_outliers(spec, w.shape) == 41
    torch.testing.assert_close(wh.view(-1)[idx], w.view(-1)[idx].half().float(), rtol=0, atol=0)
    cols = q.aux["feat_idx"].long()
    torch.testing.assert_close(wh[:, cols], w[:, cols].half().float(), rtol=0, atol=0)
    assert q.nbits == Q.storage_bits(spec, tuple(w.shape))
    assert (w - wh).norm() < (w - dequantize(quantize(w, QuantSpec(method, 3, 32, dim)))).norm()


def test_outliers_follow_sensitivity():
    w = torch.ones(8, 16) * 0.01
    f = torch.zeros(8, 16)
    f[3, 5] = 1.0
    feat, flat = Q.outlier_positions(w, QuantSpec("rtn", 3, 16, outliers=1 / 128), MatrixStats(fisher=f))
    assert flat.tolist() == [3 * 16 + 5] and feat.numel() == 0
    h = torch.diag(torch.arange(16.0))
    feat, _ = Q.outlier_positions(w, QuantSpec("rtn", 3, 16, outlier_features=2 / 16), MatrixStats(h=h))
    assert feat.tolist() == [14, 15]


@pytest.mark.parametrize("qspec", [QuantSpec("rtn", 3, 32, outliers=0.01), QuantSpec("nuq", 3),
                                   QuantSpec("gptq", 3, 32, "out", outlier_features=0.05),
                                   QuantSpec("nuq", 2, outliers=0.01, group_dim="out")],
                         ids=lambda s: s.label())
def test_module_runs_every_new_format(qspec):
    w = _w(1)
    x = torch.randn(200, w.shape[1])
    st = MatrixStats(h=x.T @ x / 200, fisher=torch.rand(w.shape))
    d = decompose(w, MatrixSpec("lq", qspec, rank=4, iters=3, weighting="hessian"), st)
    m = CompressedLinear.from_decomposition(d)
    xin = torch.randn(5, w.shape[1])
    torch.testing.assert_close(m(xin), xin @ d.reconstruct().T, rtol=1e-4, atol=1e-5)
    assert set(m.aux()) == set(Q.aux_layout(qspec, tuple(w.shape)))
