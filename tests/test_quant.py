"""Quantizers against straightforward per-group loop references."""


import pytest
import torch

from lqkit.core import quant as Q
from lqkit.core.quant import QuantSpec, dequantize, quantize
from lqkit.errors import SpecError


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, 0] = 0.3  # an outlier
    return w


def _groups_ref(w, spec):
    """Yield (row index, column slice) of every group in the original (out, in) matrix."""
    m = w if spec.group_dim == "in" else w.t()
    rows, cols = m.shape
    for r in range(rows):
        for c0 in range(0, cols, spec.group_size):
            yield m, r, slice(c0, min(c0 + spec.group_size, cols))


def reference_dequant(w, spec):
    """Per-group loop implementation of each quantizer (fp16 scales, as stored)."""
    m_out = (w if spec.group_dim == "in" else w.t()).clone()
    for m, r, sl in _groups_ref(w, spec):
        x = m[r, sl]
        if spec.method == "rtn":
            qmax = 2**spec.bits - 1
            lo, hi = min(x.min(), 0), max(x.max(), 0)
            scale = ((hi - lo) / qmax).half().float()
            off = (-torch.round(-lo / scale).clamp(0, qmax) * scale).half().float()
            codes = torch.clamp(torch.round((x - off) / max(scale, 1e-38)), 0, qmax)
            m_out[r, sl] = codes * scale + off
        elif spec.method == "rtn_sym":
            half = 2 ** (spec.bits - 1)
            scale = (x.abs().max() / (half - 1)).half().float()
            codes = torch.clamp(torch.round(x / max(scale, 1e-38)), -half, half - 1)
            m_out[r, sl] = codes * scale
        elif spec.method == "nf":
            table = Q.nf_table(spec.bits)
            a = x.abs().max().half().float()
            idx = (x.unsqueeze(1) / a - table.unsqueeze(0)).abs().argmin(dim=1)
            m_out[r, sl] = table[idx] * a
    return m_out if spec.group_dim == "in" else m_out.t()


CASES = [
    QuantSpec("rtn", b, g, d) for b in (2, 3, 4, 8) for g in (16, 24) for d in ("in", "out")
] + [QuantSpec("rtn_sym", b, 16, d) for b in (2, 3, 4) for d in ("in", "out")] + [
    QuantSpec("nf", b, g, d) for b in (2, 3, 4) for g in (16, 24) for d in ("in", "out")
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: s.label())
def test_matches_reference(spec):
    w = _rand((40, 56))  # 56 is not a multiple of 16 or 24: partial last groups
    got = dequantize(quantize(w, spec))
    ref = reference_dequant(w, spec)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_bound(bits):
    w = _rand((64, 128), seed=bits)
    spec = QuantSpec("rtn", bits, 32)
    q = quantize(w, spec)
    err = (dequantize(q) - w).abs().view(64, 4, 32)
    g = w.view(64, 4, 32)
    step = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / (2**bits - 1)
    # half a step, plus up to half a step more at one end of the range from the integer zero point
    assert (err <= step.unsqueeze(-1) + 1e-3 * step.unsqueeze(-1) + 1e-6).all()
    assert float(err.mean()) < float(step.mean()) / 3


def test_codes_in_range_and_error_decreases_with_bits():
    w = _rand((64, 256), seed=3)
    errs = []
    for b in (2, 3, 4, 6, 8):
        q = quantize(w, QuantSpec("rtn", b, 64))
        assert int(q.codes.max()) < 2**b
        errs.append(float((dequantize(q) - w).norm()))
    assert errs == sorted(errs, reverse=True)


def test_nf_table_matches_qlora_nf4():
    # NF4 values published with QLoRA (bitsandbytes' NF4 table), to 4 decimals
    nf4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    torch.testing.assert_close(Q.nf_table(4), torch.tensor(nf4), atol=2e-4, rtol=0)
    for b in (2, 3, 4):
        t = Q.nf_table(b)
        assert t.numel() == 2**b and (t == 0).any() and t.min() == -1 and t.max() == 1


def test_double_quant_close_to_plain_nf_and_smaller():
    w = _rand((256, 512), seed=5)
    plain = QuantSpec("nf", 4, 64)
    dq = QuantSpec("nf", 4, 64, double_quant=True)
    e_plain = float((dequantize(quantize(w, plain)) - w).norm() / w.norm())
    e_dq = float((dequantize(quantize(w, dq)) - w).norm() / w.norm())
    assert abs(e_dq - e_plain) < 0.05 * e_plain
    assert Q.storage_bits(dq, w.shape) < Q.storage_bits(plain, w.shape)


@pytest.mark.parametrize("spec", CASES + [QuantSpec("nf", 3, 64, "out", True)], ids=lambda s: s.label())
def test_storage_bits_equals_stored_tensors(spec):
    w = _rand((40, 56))
    q = quantize(w, spec)
    assert q.nbits == Q.storage_bits(spec, tuple(w.shape))
    for name, slot in Q.aux_layout(spec, tuple(w.shape)).items():
        assert tuple(q.aux[name].shape) == slot.shape and q.aux[name].dtype == slot.dtype


def test_effective_bits_convention():
    # 4-bit, groups of 128, 16-bit scale and offset: 4 + 32/128 = 4.25 bits per parameter
    assert Q.storage_bits(QuantSpec("rtn", 4, 128), (1024, 1024)) / 1024**2 == 4.25
    assert Q.storage_bits(QuantSpec("rtn", 3, 64), (1024, 1024)) / 1024**2 == 3.5
    assert Q.storage_bits(QuantSpec("nf", 4, 64), (1024, 1024)) / 1024**2 == 4.25
    # double quantization: 8 bits per block absmax + 32 bits per 256 blocks + one 32-bit mean
    assert Q.storage_bits(QuantSpec("nf", 4, 64, double_quant=True), (1024, 1024)) == \
        4 * 1024**2 + 8 * 16384 + 32 * 64 + 32


def test_constant_group_is_exact():
    # absmax quantizers reproduce a constant group (fp16-representable) exactly; min-max up to the
    # fp16 rounding of its scale
    w = torch.full((4, 32), 0.125)
    assert torch.equal(dequantize(quantize(w, QuantSpec("nf", 3, 16))), w)
    torch.testing.assert_close(dequantize(quantize(w, QuantSpec("rtn", 3, 16))), w, rtol=1e-3, atol=0)


def test_zero_is_on_the_rtn_grid():
    w = torch.randn(8, 64) * 0.02
    w[:, ::4] = 0.0
    got = dequantize(quantize(w, QuantSpec("rtn", 3, 64)))
    # exactly 0 up to the fp16 rounding of the stored offset (half an fp16 ulp of the offset)
    assert got[:, ::4].abs().max() < 1e-3 * w.abs().max()


@pytest.mark.parametrize("spec", [QuantSpec("rtn", b, g, d, clip=c) for b in (2, 3, 4, 8)
                                  for g, d in ((16, "in"), (24, "out")) for c in (False, True)]
                         + [QuantSpec("rtn", 4, 16, outliers=0.05)],
                         ids=lambda s: s.label())
def test_integer_zero_points_same_values_fewer_bits(spec):
    """int_zero stores the zero points as packed integers of the codes' width instead of 16-bit
    offsets: the dequantized matrix is bit for bit the float-offset one's, and the stored bits are
    (16 − bits) per group fewer."""
    w = _rand((40, 56))
    w[3, :24] = 0.0  # a group of zeros (scale 0, zero point 0)
    iz = QuantSpec(**{**spec.to_dict(), "int_zero": True})
    a, b = quantize(w, spec), quantize(w, iz)
    assert "offset" not in b.aux and b.aux["zero"].dtype == torch.uint8
    assert torch.equal(dequantize(a), dequantize(b))
    torch.testing.assert_close(Q.quant_params(b.aux, iz)["offset"], a.aux["offset"], rtol=0, atol=0)
    groups = a.aux["scale"].numel()
    assert Q.storage_bits(iz, tuple(w.shape)) == Q.storage_bits(spec, tuple(w.shape)) - groups * (16 - spec.bits) + \
        (Q.packing.packed_nbytes(groups, spec.bits) * 8 - groups * spec.bits)  # packing pads to whole bytes
    assert b.nbits == Q.storage_bits(iz, tuple(w.shape))
    for name, slot in Q.aux_layout(iz, tuple(w.shape)).items():
        assert tuple(b.aux[name].shape) == slot.shape and b.aux[name].dtype == slot.dtype
    assert Q.kernel_spec(iz) == Q.kernel_spec(spec)  # the kernels read the rebuilt offsets
    assert iz.label() != spec.label() and QuantSpec.from_dict(iz.to_dict()) == iz
    assert "int_zero" not in spec.to_dict()  # plans and tables from before keep their JSON


def test_integer_zero_points_bits_convention():
    # 4-bit, groups of 128, a 16-bit scale and a 4-bit zero point: 4 + 20/128 = 4.15625 bits per parameter
    assert Q.storage_bits(QuantSpec("rtn", 4, 128, int_zero=True), (1024, 1024)) / 1024**2 == 4.15625
    assert Q.storage_bits(QuantSpec("gptq", 3, 64, int_zero=True), (1024, 1024)) / 1024**2 == 3 + 19 / 64


@pytest.mark.parametrize("kw, msg", [
    (dict(method="nf", bits=4, int_zero=True), "integer zero points"),
    (dict(method="rtn_sym", int_zero=True), "integer zero points"),
    (dict(method="nf", bits=5), "supports bits"),
    (dict(method="rtn", bits=1), "supports bits"),
    (dict(method="bogus"), "unknown quantizer"),
    (dict(group_size=0), "group size"),
    (dict(group_dim="row"), "group dim"),
    (dict(method="rtn", double_quant=True), "double"),
])
def test_bad_specs(kw, msg):
    with pytest.raises(SpecError, match=msg):
        QuantSpec(**kw)


def test_spec_json_roundtrip():
    s = QuantSpec("nf", 3, 64, "out", True)
    assert QuantSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_never_increases_group_error(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 256, generator=g) ** 3  # heavy tails: clipping pays
    plain = dequantize(quantize(w, QuantSpec("rtn", bits, 64)))
    clipped = dequantize(quantize(w, QuantSpec("rtn", bits, 64, clip=True)))
    e_plain = (w - plain).square().reshape(32, 4, 64).sum(-1)
    e_clip = (w - clipped).square().reshape(32, 4, 64).sum(-1)
    assert (e_clip <= e_plain * (1 + 1e-5) + 1e-9).all() and e_clip.sum() < 0.97 * e_plain.sum()
    assert QuantSpec("rtn", bits, 64, clip=True).label() == f"rtn{bits}+mse/g64in"


def test_clip_search_vectorised_equals_looped(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 200, generator=g) ** 3
    specs = [QuantSpec("rtn", b, gs, d, clip=True) for b in (2, 4) for gs, d in ((64, "in"), (16, "out"))]
    fast = [dequantize(quantize(w, s)) for s in specs]
    monkeypatch.setattr(Q, "CLIP_VECTOR_MAX", 0)
    for s, f in zip(specs, fast):
        assert torch.equal(dequantize(quantize(w, s)), f)


@pytest.mark.parametrize("case", ["groups", "transposed", "row-qmax", "flat-qmax"])
def test_clip_search_compiled_equals_eager(monkeypatch, case):
    """On a CPU the clip search runs as one compiled loop (lqkit.core.compiled): the same scales and
    offsets as the eager search, fp16 rounding of the candidate scales included."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 64, generator=g) * torch.rand(300, 1, generator=g)
    monkeypatch.setenv("LQKIT_COMPILE", "1")  # the suite runs eagerly by default (conftest.py)
    g3, qmax = {"groups": (w.view(300, 2, 32), 7), "transposed": (w.T.contiguous().T.unsqueeze(1), 3),
                "row-qmax": (w.view(300, 2, 32), torch.full((300, 1), 7.0)),
                "flat-qmax": (w[:40, :32], torch.full((40,), 3.0))}[case]
    fast = Q.minmax_params(g3, qmax, torch.float16, clip=True)
    monkeypatch.setenv("LQKIT_COMPILE", "0")
    slow = Q.minmax_params(g3, qmax, torch.float16, clip=True)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_a_failed_compile_runs_eagerly(monkeypatch, caplog):
    from lqkit.core import compiled

    monkeypatch.setenv("LQKIT_COMPILE", "1")

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_FAILED", set())

    @compiled.cpu_compiled
    def double(x):
        return x * 2

    with caplog.at_level("WARNING"):
        assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert "no C++ compiler" in caplog.text and not compiled.enabled()
