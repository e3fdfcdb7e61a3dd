"""Per-row quantization of embedding / head tables (lqkit.core.embed) and its modules (lqkit.nn.embedding)."""

import numpy as np
import pytest
import torch

from lqkit.core import embed
from lqkit.core.embed import (
    RowCandidates,
    RowSpec,
    TableStats,
    table_costs,
    table_error,
)
from lqkit.errors import SpecError


def _brute(w: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    """Reference: every entry rounded to the nearest level of its group, levels from the stored scale."""
    out = torch.empty_like(w)
    g = spec.group_size or w.shape[1]
    for i in range(w.shape[0]):
        for j0 in range(0, w.shape[1], g):
            x = w[i, j0:j0 + g]
            if spec.symmetric:
                scale = (x.abs().max() / (2 ** (spec.bits - 1) - 1)).half().float()
                codes = torch.arange(1, 2 ** spec.bits) - 2 ** (spec.bits - 1)
                levels = codes.float() * scale
            else:
                lo, hi = x.min(), x.max()
                scale = ((hi - lo) / (2 ** spec.bits - 1)).half().float()
                levels = torch.arange(2 ** spec.bits).float() * scale + lo.half().float()
            out[i, j0:j0 + g] = levels[(x[:, None] - levels[None, :]).abs().argmin(dim=1)]
    return out


@pytest.mark.parametrize("spec", [RowSpec(8), RowSpec(6), RowSpec(4), RowSpec(4, symmetric=False), RowSpec(3),
                                  RowSpec(4, group_size=16), RowSpec(6, symmetric=False, group_size=8)])
def test_quantize_matches_brute_force(spec):
    torch.manual_seed(0)
    w = torch.randn(12, 32) * torch.rand(12, 1) * 3
    q = embed.quantize(w, spec)
    torch.testing.assert_close(embed.dequantize(q), _brute(w, spec), rtol=0, atol=1e-6)
    ids = torch.tensor([[3, 0, 11], [3, 7, 7]])
    torch.testing.assert_close(embed.dequantize(q, ids), embed.dequantize(q)[ids])  # a lookup unpacks only its rows


def test_storage_bits_are_the_stored_tensors():
    w = torch.randn(20, 64)
    for spec in (RowSpec(8), RowSpec(4, symmetric=False), RowSpec(6, group_size=32)):
        q = embed.quantize(w, spec)
        stored = sum(t.numel() * t.element_size() * 8 for t in (q.codes, q.scales, q.offsets) if t is not None)
        assert embed.storage_bits(spec, (20, 64)) == stored
        assert q.codes.shape == (20, 64 * spec.bits // 8) and q.shape == (20, 64)
    assert embed.storage_bits(RowSpec(8), (20, 64)) == 20 * 64 * 8 + 20 * 16  # int8 codes + one fp16 scale a row


def test_bad_specs_say_what_works():
    with pytest.raises(SpecError, match="e.g. 8, 6 or 4"):
        RowSpec(9)
    with pytest.raises(SpecError, match="multiple of 8"):
        RowSpec(4).check_shape((10, 30))
    with pytest.raises(SpecError, match="does not divide"):
        RowSpec(4, group_size=48).check_shape((10, 64))


def test_table_error_is_the_weighted_sum():
    torch.manual_seed(1)
    w, w_hat = torch.randn(10, 16), torch.randn(10, 16)
    rows = torch.tensor([1, 4, 9])
    f = torch.rand(3, 16)
    a = torch.randn(16, 16)
    h, rho = a @ a.T, torch.rand(10)
    e = w - w_hat
    lookup = float((f * e[rows] ** 2).sum())
    head = float(sum(rho[v] * e[v] @ h @ e[v] for v in range(10)))
    assert table_error(w, w_hat, TableStats(rows, f)) == pytest.approx(lookup, rel=1e-5)
    assert table_error(w, w_hat, TableStats(head_h=h, head_rows=rho)) == pytest.approx(head, rel=1e-5)
    assert table_error(w, w_hat, TableStats(rows, f, h, rho)) == pytest.approx(lookup + head, rel=1e-5)
    assert table_error(w, None, TableStats(rows, f)) == pytest.approx(float((f * w[rows] ** 2).sum()), rel=1e-5)


def test_table_costs_keep_is_a_candidate_and_the_front_is_pareto():
    torch.manual_seed(2)
    w = torch.randn(50, 32)
    stats = TableStats(torch.arange(50), torch.rand(50, 32))
    c = table_costs(w, stats, RowCandidates(bits=(2, 4, 8)), keep_bits=50 * 32 * 32)
    assert c.specs[-1] is None and c.errors[-1] == 0 and c.bits[-1] == 50 * 32 * 32  # keeping costs its stored size
    assert np.all(np.diff(c.bits) > 0) and np.all(np.diff(c.errors) < 0)
    assert c.specs[0].bits == 2 and c.base > c.errors[0]
    back = embed.TableCosts.from_dict(c.to_dict())
    assert back.specs == c.specs and np.array_equal(back.bits, c.bits)


def test_modules_lookup_and_tied_head():
    from torch import nn

    from lqkit.nn.embedding import (
        QuantizedEmbedding,
        TiedHead,
        build_tables,
        quantized_tables,
        tied_heads,
    )

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 16)
            self.emb.embed_scale = torch.tensor(4.0)  # as Gemma's scaled embedding
            self.head = nn.Linear(16, 40, bias=False)
            self.head.weight = self.emb.weight

    m = Toy().eval()
    build_tables(m, {"emb": RowSpec(8)}, {"head": "emb"}, quantize=True)
    assert isinstance(m.emb, QuantizedEmbedding) and isinstance(m.head, TiedHead)
    assert list(quantized_tables(m)) == ["emb"] and tied_heads(m) == {"head": "emb"}
    assert not list(m.head.parameters()) and "head.codes" not in m.state_dict()  # one stored copy
    deq = embed.dequantize(m.emb.qrows())
    ids = torch.tensor([[1, 2, 39]])
    torch.testing.assert_close(m.emb(ids), deq[ids] * 4.0)
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(m.head(x), x @ deq.T)


def test_chunked_rows_give_the_same_table(monkeypatch):
    """Large vocabularies are quantized, dequantized and scored in chunks of rows: the same result."""
    torch.manual_seed(3)
    w = torch.randn(23, 16)
    stats = TableStats(torch.tensor([0, 7, 22]), torch.rand(3, 16), torch.eye(16), torch.rand(23))
    whole = embed.dequantize(embed.quantize(w, RowSpec(4, symmetric=False)))
    err = table_error(w, whole, stats)
    monkeypatch.setattr(embed, "CHUNK_ROWS", 5)
    q = embed.quantize(w, RowSpec(4, symmetric=False))
    torch.testing.assert_close(embed.dequantize(q), whole)
    assert table_error(w, whole, stats) == pytest.approx(err, rel=1e-6)
