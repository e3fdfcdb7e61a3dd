"""GPTQ: Hessian-weighted error never above RTN's, stored like RTN, guards on H."""

import pytest
import torch

from lqkit.core import MatrixStats, QuantSpec, dequantize, quantize
from lqkit.core import quant as Q
from lqkit.core.stats import sq_error
from lqkit.errors import SpecError


def problem(seed, out=48, n=96, tokens=400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.02
    mix = torch.randn(n, n, generator=g) * 0.4 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * torch.rand(n, generator=g) * 3  # correlated, uneven
    return w, MatrixStats(h=x.T @ x / tokens)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits,gs,dim,ao", [(3, 32, "in", False), (2, 32, "in", True), (3, 16, "out", False),
                                            (4, 96, "in", False), (3, 24, "out", True)])
def test_gptq_never_worse_than_rtn_in_hessian_error(seed, bits, gs, dim, ao):
    w, st = problem(seed)
    e_rtn = sq_error(w - dequantize(quantize(w, QuantSpec("rtn", bits, gs, dim))), st, "hessian")
    e_gptq = sq_error(w - dequantize(quantize(w, QuantSpec("gptq", bits, gs, dim, act_order=ao), st)), st, "hessian")
    assert e_gptq <= e_rtn * (1 + 1e-6)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("dim", ["in", "out"])
def test_gptq_with_diagonal_h_is_rtn(clip, dim):
    w, _ = problem(0)  # 48 outputs: groups of 32 along "out" leave a short last group
    st = MatrixStats(h=torch.diag(torch.rand(w.shape[1]) + 0.5))
    a = dequantize(quantize(w, QuantSpec("gptq", 3, 32, dim, clip=clip), st))
    b = dequantize(quantize(w, QuantSpec("rtn", 3, 32, dim, clip=clip)))
    torch.testing.assert_close(a, b)


def test_gptq_storage_is_rtn_format():
    w, st = problem(1)
    spec = QuantSpec("gptq", 3, 32)
    q = quantize(w, spec, st)
    assert set(q.aux) == {"scale", "offset"} and q.nbits == Q.storage_bits(spec, tuple(w.shape))
    rtn_view = Q.dequantize_packed(q.packed, q.aux, Q.kernel_spec(spec), q.shape)
    torch.testing.assert_close(dequantize(q), rtn_view)


def test_gptq_keeps_outliers_exactly_and_helps():
    w, st = problem(2)
    plain = QuantSpec("gptq", 2, 32)
    sp = QuantSpec("gptq", 2, 32, outliers=0.02, outlier_features=0.05)
    q = quantize(w, sp, st)
    wh = dequantize(q)
    idx = q.aux["sp_idx"].long()
    assert torch.equal(wh.view(-1)[idx], q.aux["sp_val"].float())
    assert torch.equal(wh[:, q.aux["feat_idx"].long()], q.aux["feat_val"].float())
    assert sq_error(w - wh, st, "hessian") < sq_error(w - dequantize(quantize(w, plain, st)), st, "hessian")


def test_gptq_singular_and_bad_h():
    w, _ = problem(3)
    x = torch.randn(5, w.shape[1])  # rank 5: singular H
    h = x.T @ x
    h[:, 7] = h[7, :] = 0  # a dead input
    wh = dequantize(quantize(w, QuantSpec("gptq", 3, 32), MatrixStats(h=h)))
    assert torch.isfinite(wh).all()
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SpecError, match="NaN"):
        quantize(w, QuantSpec("gptq", 3, 32), MatrixStats(h=bad))
    with pytest.raises(SpecError, match="calibration statistics"):
        quantize(w, QuantSpec("gptq", 3, 32))
    with pytest.raises(SpecError, match="act-order"):
        QuantSpec("rtn", 3, 32, act_order=True)


@pytest.mark.parametrize("bits", [6, 8])
def test_int6_int8_uniform(bits):
    w, st = problem(4)
    for spec, weighting in ((QuantSpec("rtn", bits, 64), "none"), (QuantSpec("gptq", bits, 64), "hessian")):
        q = quantize(w, spec, st)
        rel = float((sq_error(w - dequantize(q), st, weighting) / sq_error(w, st, weighting)).sqrt())
        assert rel < (0.03 if bits == 6 else 0.008)
        assert q.nbits == Q.storage_bits(spec, tuple(w.shape))


def _reference_gptq(w, h, spec):
    """Textbook GPTQ, one column at a time with full updates (no blocks, no batching), groups along
    the input dimension: the unoptimised algorithm of the paper."""
    from lqkit.core.stats import damped

    W = w.clone().double()
    u = torch.linalg.cholesky(torch.linalg.inv(damped(h, spec.damp).double()), upper=True)
    qmax, gs = (1 << spec.bits) - 1, spec.group_size
    out = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % gs == 0:
            aux = Q.QUANTIZERS["rtn"].quantize(W[:, j:j + gs].float(), spec)[1]
            s, o = aux["scale"].double()[:, 0].clamp_min(1e-30), aux["offset"].double()[:, 0]
        q = torch.round((W[:, j] - o) / s).clamp(0, qmax) * s + o
        e = (W[:, j] - q) / u[j, j]
        W[:, j:] -= torch.outer(e, u[j, j:])
        out[:, j] = q
    return out.float()


@pytest.mark.parametrize("seed", range(3))
def test_gptq_matches_textbook_reference(seed):
    w, st = problem(seed, n=300)  # several lazy blocks of 128 columns and a short last group
    spec = QuantSpec("gptq", 3, 32)
    ours = dequantize(quantize(w, spec, st))
    ref = _reference_gptq(w, st.h, spec)
    assert (ours != ref).float().mean() < 0.01  # rounding ties may flip a few codes in fp32 vs fp64
    e_ours, e_ref = sq_error(w - ours, st, "hessian"), sq_error(w - ref, st, "hessian")
    assert abs(float(e_ours / e_ref) - 1) < 0.02


@pytest.mark.parametrize("ao", [False, True])
def test_gptq_integer_zero_points_same_weights_as_offsets(ao):
    """gptq (act-order, MSE ranges, one spec alone and in a batch) with integer zero points: the
    dequantized matrix bit for bit that of the 16-bit offsets, its cost table values too, in fewer bits."""
    w, st = problem(2, out=40, n=160)
    specs = [QuantSpec("gptq", b, gs, dim, act_order=ao, clip=True)
             for b in (2, 3, 4) for gs, dim in ((32, "in"), (16, "out"))]
    izs = [QuantSpec(**{**s.to_dict(), "int_zero": True}) for s in specs]
    for s, iz, a, b in zip(specs, izs, Q.quantize_many(w, specs, st), Q.quantize_many(w, izs, st)):
        assert "zero" in b.aux and "offset" not in b.aux and b.nbits < a.nbits
        assert torch.equal(dequantize(a), dequantize(b)) and torch.equal(dequantize(b), dequantize(quantize(w, iz, st)))
    for a, b in zip(Q.reconstruct_many(w, specs, st), Q.reconstruct_many(w, izs, st)):
        assert torch.equal(a, b)


def test_quantize_many_equals_one_at_a_time():
    w, st = problem(5, out=40, n=160)
    specs = [QuantSpec("gptq", b, gs, dim, outliers=o) for b in (2, 4) for gs, dim in ((32, "in"), (16, "out"), (64, "in"))
             for o in (0.0, 0.02)] + [QuantSpec("rtn", 3, 32), QuantSpec("nf", 3, 32, "out")]
    many = Q.quantize_many(w, specs, st)
    for s, qt in zip(specs, many):
        one = quantize(w, s, st)
        assert qt.spec == s and set(qt.aux) == set(one.aux)
        torch.testing.assert_close(dequantize(qt), dequantize(one), rtol=0, atol=1e-5)
        assert qt.nbits == one.nbits == Q.storage_bits(s, tuple(w.shape))


def test_gptq_many_sweeps_in_chunks(monkeypatch):
    from lqkit.core import gptq as G

    w, st = problem(6, out=24, n=64)
    specs = [QuantSpec("gptq", b, 16) for b in (2, 3, 4, 5)]
    full = G.gptq_many(w, st.h, specs)
    monkeypatch.setattr(G, "MAX_STACK", 24 * 64)  # one configuration per sweep
    chunked = G.gptq_many(w, st.h, specs)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a.q, b.q, rtol=0, atol=1e-6)


def test_reconstruct_many_equals_dequantize_of_quantize():
    w, st = problem(7, out=40, n=160)
    specs = [QuantSpec("gptq", 3, 32, outliers=0.02), QuantSpec("rtn", 2, 32, "out", outlier_features=0.05),
             QuantSpec("nf", 3, 32), QuantSpec("nuq", 2, outliers=0.01), QuantSpec("rtn_sym", 4, 16),
             QuantSpec("rtn", 3, 48, clip=True), QuantSpec("nf", 2, 24, "out", double_quant=True),
             QuantSpec("nuq", 3, group_dim="out"),  # groups that do not tile the matrix, double quant, "out"
             QuantSpec("nuq", 4, outliers=0.01), QuantSpec("nuq", 2, group_dim="out")]  # nuq: rows sorted once
    st2 = type(st)(h=st.h, fisher=torch.rand_like(w))
    for s, dense in zip(specs, Q.reconstruct_many(w, specs, st2)):
        assert torch.equal(dense, dequantize(quantize(w, s, st2))), s.label()


@pytest.mark.parametrize("ao", [False, True])
def test_out_groups_as_views_equal_the_gathered_groups(monkeypatch, ao):
    """Groups along "out" that tile the rows are read as views of the stack; the general gather gives
    the same codes and parameters, outliers included."""
    from lqkit.core import gptq as G

    w, st = problem(8, out=64, n=96)
    specs = [QuantSpec("gptq", b, gs, "out", act_order=ao, outliers=o) for b in (2, 3) for gs in (16, 32)
             for o in (0.0, 0.02)]
    fast = Q.quantize_many(w, specs, st)
    made = G._out_groups

    def gathered(*a, **k):
        res = made(*a, **k)
        assert all(og.view is not None for og in res)  # 64 rows: every family tiles
        for og in res:
            og.view = None
        return res

    monkeypatch.setattr(G, "_out_groups", gathered)
    for a, b in zip(fast, Q.quantize_many(w, specs, st)):
        assert torch.equal(a.packed, b.packed) and all(torch.equal(a.aux[k], b.aux[k]) for k in a.aux)


@pytest.mark.parametrize("ao", [False, True])
def test_stack_built_for_the_fused_sweep_equals_the_transposed_one(monkeypatch, ao):
    """The fused (GPU) branch gets the stack row-major in the sweep's order and the torch branch
    transposed: with the torch sweep standing in for the fused one, both give the same results, with
    outliers and dead inputs."""
    from lqkit.core import gptq as G

    w, st = problem(11, out=48, n=96)
    h = st.h.clone()
    h[5], h[:, 5] = 0.0, 0.0  # a dead input
    specs = [QuantSpec("gptq", b, 16, d, act_order=ao, clip=True) for b in (2, 3) for d in ("in", "out")]
    keeps = [(torch.rand(48, 96, generator=torch.Generator().manual_seed(i)) < 0.03) if i % 2 else None
             for i in range(len(specs))]
    plain = G.gptq_many(w, h, specs, keeps)

    def fused(W, keep, qmax, fams, u, perm, out):
        c, q = G._sweep(W.T.contiguous(), keep.T.contiguous() if bool(keep.any()) else None, qmax, fams, u, perm, out)
        return c.T, q.T

    monkeypatch.setattr(G, "_fused_sweep_ok", lambda *a: True)
    monkeypatch.setattr(G, "_fused_sweep", fused)
    for a, b in zip(plain, G.gptq_many(w, h, specs, keeps)):
        for x, y in zip((a.codes, a.scale, a.offset, a.q), (b.codes, b.scale, b.offset, b.q)):
            assert torch.equal(x, y)
