"""Products to fp32 accuracy from TF32 parts (lqkit.core.fp32mm): the split, and the three-product
sums checked against fp64 (on a CPU the split products run in fp32, the same arithmetic layout)."""

import torch

from lqkit.core import fp32mm


def test_split_is_exact_and_tf32_representable():
    x = torch.randn(257, 129, generator=torch.Generator().manual_seed(0)) * 1e3
    hi, lo = fp32mm.split(x)
    assert torch.equal(hi + lo, x)
    assert ((hi.view(torch.int32) & 8191) == 0).all()  # 13 low mantissa bits clear: a TF32 value
    assert (lo.abs() <= x.abs() * 2.0 ** -10).all()


def test_split_products_match_fp64():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 500, generator=g), torch.randn(500, 700, generator=g)
    ref = a.double() @ b.double()
    out = fp32mm.mm(a, b, force_split=True)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-6


def test_split_products_in_column_blocks_equal_one_block(monkeypatch):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 300, generator=g), torch.randn(300, 250, generator=g)
    whole = fp32mm.mm(a, b, force_split=True)
    monkeypatch.setattr(fp32mm, "COLS_BLOCK", 300 * 40)  # 40 columns a block, the last one shorter
    blocks = fp32mm.mm(a, b, force_split=True)
    ref = a.double() @ b.double()
    # both to fp32 accuracy (the BLAS may sum a narrower product in another order: 3.8e-5 apart on
    # values up to 71 on an AMD EPYC host; within 1e-5 on the Xeon hosts the test was written on)
    for out in (whole, blocks):
        assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-6
    assert (blocks - whole).abs().max() <= 2e-6 * whole.abs().max()


def test_gram_is_the_smaller_one_and_matches_fp64():
    g = torch.Generator().manual_seed(3)
    for shape in ((120, 400), (400, 120)):
        b = torch.randn(*shape, generator=g)
        t = b.double() if shape[0] <= shape[1] else b.double().T
        ref = t @ t.T
        out = fp32mm.gram(b, force_split=True)
        assert out.shape == (120, 120)
        assert torch.equal(out, out.T)
        assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-6


def test_plain_product_where_there_is_no_tf32():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert torch.equal(fp32mm.mm(a, b), a @ b)  # a CPU: no split
