"""Non-uniform (SqueezeLLM-style) quantization: weighted k-means and stored codebooks."""

import pytest
import torch

from lqkit.core import MatrixStats, QuantSpec, dequantize, quantize
from lqkit.core import quant as Q
from lqkit.core.nuq import kmeans_1d
from lqkit.core.stats import sq_error


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [4, 8, 16])
def test_kmeans_error_decreases_monotonically(seed, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 200, generator=g) ** 3  # heavy tails
    wt = torch.rand(12, 200, generator=g) ** 4
    c, codes, hist = kmeans_1d(x, wt, k, iters=25)
    assert all(b <= a * (1 + 1e-5) + 1e-9 for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]
    assert (c[:, 1:] >= c[:, :-1]).all()
    assert hist[-1] == pytest.approx(float((wt * (x - torch.gather(c, 1, codes)) ** 2).sum()), rel=1e-5)


def test_nuq_beats_uniform_and_counts_codebook():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g) * 0.02
    spec = QuantSpec("nuq", 3)
    q = quantize(w, spec)
    assert q.nbits == Q.storage_bits(spec, (64, 512)) == 64 * 512 * 3 + 64 * 8 * 16
    assert q.aux["codebook"].dtype == torch.float16
    e_nuq = float((w - dequantize(q)).norm())
    e_rtn = float((w - dequantize(quantize(w, QuantSpec("rtn", 3, 128)))).norm())
    assert e_nuq < e_rtn


def test_fisher_weighting_lowers_fisher_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) * 0.02
    f = torch.rand(32, 256, generator=g) ** 6
    st = MatrixStats(fisher=f)
    e_w = sq_error(w - dequantize(quantize(w, QuantSpec("nuq", 2), st)), st, "fisher")
    e_u = sq_error(w - dequantize(quantize(w, QuantSpec("nuq", 2))), st, "fisher")
    assert e_w < e_u


def test_nuq_group_dim_out():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 24, generator=g)
    q = quantize(w, QuantSpec("nuq", 4, group_dim="out"))
    assert q.aux["codebook"].shape == (24, 16)
    assert float((w - dequantize(q)).norm() / w.norm()) < 0.15
