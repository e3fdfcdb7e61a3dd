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


def test_codebooks_of_chunks_clustered_together_equal_each_chunk_alone(monkeypatch):
    """Rows in chunks that stop on their own, several chunks at once: the same codebooks as each
    chunk through kmeans_1d alone, also when the chunks stop at different iterations."""
    from lqkit.core import nuq

    g = torch.Generator().manual_seed(5)
    rows, n, k = 45, 64, 8
    z = torch.randn(rows, n, generator=g)
    x = z.sign() * z.abs() ** torch.linspace(1, 5, rows).unsqueeze(1)  # ever heavier tails
    wt = torch.rand(rows, n, generator=g) ** 3
    monkeypatch.setattr(nuq, "ROWS_CHUNK", 10 * n)  # chunks of 10 rows, the last one of 5
    monkeypatch.setattr(nuq, "ROWS_BATCH", 30 * n)  # three chunks at once, then the rest
    alone = [kmeans_1d(x[i:i + 10], wt[i:i + 10], k) for i in range(0, rows, 10)]
    assert len({len(h) for _, _, h in alone}) > 1  # the chunks stop at different iterations
    assert torch.equal(nuq.codebooks(x, wt, k), torch.cat([c for c, _, _ in alone]))
