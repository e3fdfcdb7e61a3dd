"""Fused GPU kernels (lqkit.kernels): layout on CPU, kernel results against the pure-torch path.

Kernel checks run on CUDA (marked ``cuda``, skipped without a GPU and triton). They also run on the
CPU through triton's interpreter when ``LQKIT_TRITON_INTERPRET=1`` is set (slow; for development).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from lqkit.core import quant as qmod
from lqkit.core.quant import QuantSpec
from lqkit.kernels import layout

INTERPRET = os.environ.get("LQKIT_TRITON_INTERPRET") == "1"
if INTERPRET:  # must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    try:  # triton 3.6's interpreter turns size-1 arrays into ints with int(), which numpy >= 2.4 refuses
        import triton.runtime.interpreter as _ti

        _patch = _ti._patch_lang_tensor

        def _patch_index(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _ti._patch_lang_tensor = _patch_index
    except (ImportError, AttributeError):
        pass

FORMATS = [  # (method, bits, group_dim, group_size, double_quant)
    ("rtn", 4, "in", 128, False),
    ("rtn", 3, "in", 128, False),
    ("rtn", 2, "in", 64, False),
    ("rtn", 8, "in", 32, False),
    ("rtn", 3, "in", 100, False),  # group size not a multiple of 32: per-element path
    ("rtn", 4, "out", 128, False),
    ("rtn", 3, "out", 32, False),
    ("rtn", 2, "out", 48, False),
    ("rtn_sym", 4, "in", 64, False),
    ("rtn_sym", 3, "out", 64, False),
    ("nf", 4, "in", 64, False),
    ("nf", 3, "in", 128, True),
    ("nf", 2, "out", 64, True),
    ("nf", 4, "out", 128, False),
    ("nuq", 4, "in", 128, False),  # a codebook per output row (group size unused)
    ("nuq", 3, "out", 128, False),  # a codebook per input column
    ("nuq", 3, "in", 128, False),
]
OUTLIER_FORMATS = [  # (method, bits, group_dim, group_size, double_quant, outliers, outlier_features)
    ("rtn", 4, "in", 64, False, 0.01, 0.02),  # fragment layout by default
    ("nf", 4, "in", 64, False, 0.02, 0.0),
    ("nuq", 3, "in", 128, False, 0.0, 0.03),
]
SHAPES = [(96, 4096 + 64), (1000, 333), (130, 1536), (257, 200)]  # (out, in): odd sizes, tails
CPU_SHAPES = [(40, 1050), (70, 333), (33, 520), (57, 200)]  # triton's CPU interpreter: smaller, still tails


def _interp_exhaustive(*values, id: str | None = None):
    """A parameter set that the interpreter runs only in ``make test-all`` (minutes there; its
    format and layout are covered by cheaper cases), while a GPU always runs it."""
    return pytest.param(*values, id=id, marks=pytest.mark.exhaustive if INTERPRET else ())


def _spec(f) -> QuantSpec:
    method, bits, gd, gs, dq, sp, of = (*f, 0.0, 0.0)[:7]
    return QuantSpec(method=method, bits=bits, group_size=gs, group_dim=gd, double_quant=dq, outliers=sp,
                     outlier_features=of)


def _fid(f) -> str:
    return _spec(f).label().replace("/", "-")


# ----------------------------------------------------------------------------------------------
# CPU: layout and import hygiene (no triton needed)


@pytest.mark.parametrize("f", FORMATS, ids=_fid)
def test_layout_decodes_to_stored_weight(f):
    spec = _spec(f)
    shape = (70, 333)
    w = torch.randn(shape)
    q = qmod.quantize(w, spec)
    kw = layout.prepare_weight(q.packed, q.aux, spec, shape, layout="interleaved")
    torch.testing.assert_close(layout.reference_weight(kw), qmod.dequantize(q), rtol=0, atol=1e-6)
    assert kw.qweight.shape[0] % layout.N_PAD == 0
    assert kw.k_pad % layout.k_tile(spec.bits) == 0


@pytest.mark.parametrize("f", [f for f in FORMATS if layout.frag_ok(_spec(f))], ids=_fid)
def test_layout_frag_decodes_to_stored_weight(f):
    spec = _spec(f)
    w = torch.randn(40, 300)
    q = qmod.quantize(w, spec)
    kw = layout.prepare_weight(q.packed, q.aux, spec, (40, 300), layout="frag")
    assert kw.layout == "frag" and kw.k_pad % layout.frag_kblock(spec.bits) == 0
    torch.testing.assert_close(layout.reference_weight(kw), qmod.dequantize(q), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
def test_integer_zero_points_reach_the_kernels_as_offsets(bits):
    """A layer storing integer zero points (QuantSpec.int_zero) prepares the kernels' weight in the
    float-offset format: the same kernel spec, and a layout that decodes to the same weight."""
    from lqkit.core import MatrixSpec, decompose
    from lqkit.nn import CompressedLinear

    w = torch.randn(64, 256) * 0.02
    got = []
    for iz in (False, True):
        spec = MatrixSpec("quant", QuantSpec("rtn", bits, 64, int_zero=iz))
        m = CompressedLinear.from_decomposition(decompose(w, spec), dtype=torch.float16)
        kw = m.prepare_kernel_weight()
        assert qmod.kernel_spec(spec.quant) == QuantSpec("rtn", bits, 64)
        got.append(layout.reference_weight(kw))
        if iz:  # the stored aux straight to prepare_weight (its zero points, no offsets): the same weight
            q = qmod.quantize(w, spec.quant)
            raw = layout.prepare_weight(q.packed, q.aux, qmod.kernel_spec(spec.quant), tuple(w.shape))
            torch.testing.assert_close(layout.reference_weight(raw), qmod.dequantize(q), rtol=0, atol=1e-6)
    assert torch.equal(got[0], got[1])
    grad = CompressedLinear.from_decomposition(decompose(w, spec), dtype=torch.float32)
    x = torch.randn(2, 256)
    assert not grad._grad_needed(x)
    grad._buffers["q_scale"] = torch.nn.Parameter(grad.q_scale.clone())  # as lqkit.distill trains it
    assert grad._grad_needed(x)  # so the kernels (no backward) are not chosen


def test_layout_auto_picks_frag_where_it_holds_the_format():
    spec = QuantSpec(method="rtn", bits=4, group_size=64)
    q = qmod.quantize(torch.randn(16, 64), spec)
    assert layout.prepare_weight(q.packed, q.aux, spec, (16, 64)).layout == "frag" == layout.auto_layout(spec)
    assert layout.prepare_weight(q.packed, q.aux, spec, (16, 64), layout="interleaved").layout == "interleaved"
    kw = layout.prepare_weight(q.packed, q.aux, spec, (16, 64), layout="frag")
    assert kw.layout == "frag"
    torch.testing.assert_close(layout.reference_weight(kw), qmod.dequantize(q), rtol=0, atol=1e-6)
    for spec in (QuantSpec(method="nf", bits=4, group_size=64), QuantSpec(method="rtn", bits=8, group_size=64),
                 QuantSpec(method="rtn", bits=4, group_size=64, group_dim="out")):
        q = qmod.quantize(torch.randn(64, 64), spec)
        assert layout.prepare_weight(q.packed, q.aux, spec, (64, 64)).layout == "interleaved"
        with pytest.raises(ValueError, match="fragment layout"):
            layout.prepare_weight(q.packed, q.aux, spec, (64, 64), layout="frag")


@pytest.mark.parametrize("f", OUTLIER_FORMATS, ids=_fid)
def test_layout_outliers_are_a_sparse_correction(f):
    """Exactly kept outliers: the plain codes in the kernels' layout plus a CSR correction C =
    kept − deq(Q) give the stored matrix; C holds every kept position once, sorted by row."""
    spec = _spec(f)
    shape = (70, 333)
    w = torch.randn(shape)
    w[3, 7] = 40.0  # an outlier
    q = qmod.quantize(w, spec)
    want = qmod.dequantize(q)
    for lay in ("interleaved", "frag") if layout.frag_ok(spec) else ("interleaved",):
        kw = layout.prepare_weight(q.packed, q.aux, spec, shape, layout=lay)
        assert kw.fix is not None and kw.spec.outliers == 0 and kw.spec.outlier_features == 0
        n_kept = qmod.n_outliers(spec, shape) + shape[0] * qmod.n_outlier_features(spec, shape)
        assert kw.fix.nnz == n_kept and kw.fix.rowptr[-1] == n_kept
        rows, cols = kw.fix.rows(), kw.fix.col.long()
        assert torch.all(rows[1:] * shape[1] + cols[1:] > rows[:-1] * shape[1] + cols[:-1])
        torch.testing.assert_close(layout.reference_weight(kw), want, rtol=0, atol=1e-5)
        assert kw.nbytes() > kw.fix.nbytes() > 0
    with pytest.raises(ValueError, match="each matrix adds its own"):
        layout.stack_weights([kw, kw])


def test_layout_per_column_codebooks_and_refusals():
    """nuq with groups along 'out': a table per input column (k_pad of them), not stackable; a spec the
    kernels read only through kernel_spec is refused."""
    spec = QuantSpec(method="nuq", bits=3, group_dim="out")
    q = qmod.quantize(torch.randn(32, 100), spec)
    kw = layout.prepare_weight(q.packed, q.aux, spec, (32, 100))
    assert kw.lut_cols and kw.lut.shape == (kw.k_pad, 8) and kw.lut_stride == -8
    torch.testing.assert_close(layout.reference_weight(kw), qmod.dequantize(q), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="per input column"):
        layout.stack_weights([kw, kw])
    q = qmod.quantize(torch.randn(32, 64), QuantSpec(method="rtn", bits=4, group_size=32))
    with pytest.raises(ValueError, match="kernel_spec"):  # gptq's codes are rtn's: prepared under kernel_spec's
        layout.prepare_weight(q.packed, q.aux, QuantSpec(method="gptq", bits=4, group_size=32), (32, 64))


@pytest.mark.parametrize("with_offset", [True, False])
def test_frag_params_order_and_roundtrip(with_offset):
    """Fragment-ordered parameters: [row block, group, g] holds (s[g], s[g + 8], o[g], o[g + 8])."""
    s, o = torch.randn(48, 5), torch.randn(48, 5)
    p = layout.frag_params(s, o if with_offset else None)
    assert p.shape == (3, 5, 8, 4 if with_offset else 2)
    for rb, j, g in [(0, 0, 0), (1, 3, 7), (2, 4, 5)]:
        want = [s[16 * rb + g, j], s[16 * rb + g + 8, j]] + ([o[16 * rb + g, j], o[16 * rb + g + 8, j]] if with_offset
                                                              else [])
        assert torch.equal(p[rb, j, g], torch.stack(want))
    s2, o2 = layout.frag_unparams(p)
    assert torch.equal(s2, s) and (torch.equal(o2, o) if with_offset else o2 is None)


def test_path_for_names_where_a_format_runs():
    from lqkit import kernels

    assert kernels.path_for(QuantSpec(method="rtn", bits=4, group_size=128)) == "triton/frag"
    assert kernels.path_for(QuantSpec(method="gptq", bits=3, group_size=64)) == "triton/frag"  # rtn's codes
    assert kernels.path_for(QuantSpec(method="rtn", bits=8, group_size=128)) == "triton/interleaved"
    assert kernels.path_for(QuantSpec(method="nf", bits=4, group_size=64)) == "triton/interleaved"
    assert kernels.path_for(QuantSpec(method="rtn", bits=4, group_size=64, group_dim="out")) == "triton/interleaved"
    assert kernels.path_for(QuantSpec(method="nuq", bits=3, group_size=128)) == "triton/interleaved"
    assert kernels.path_for(QuantSpec(method="nuq", bits=3, group_size=128, group_dim="out")) == "triton/interleaved"
    assert kernels.path_for(QuantSpec(method="rtn", bits=4, group_size=128, outliers=0.01)) == "triton/frag"
    assert kernels.path_for(QuantSpec(method="nf", bits=4, group_size=64, outlier_features=0.01)) == \
        "triton/interleaved"
    assert kernels.path_for(None) == "torch"


@pytest.mark.parametrize("bits", range(2, 8))
def test_frag_pack_roundtrip_and_fragment_order(bits):
    """Round trip, and the documented order: lane 4g + q, its word v (words [rb, kb, lane, v]), slot p -> row g + 8·(u & 1),
    k = 16·(u // 4) + 4q + 2·((u % 4) >> 1) (+1 in the high half), u = P·v + p."""
    codes = torch.randint(0, 2 ** bits, (48, 301), dtype=torch.uint8)
    kb = layout.frag_kblock(bits)
    k_pad = -(-301 // kb) * kb
    words = layout.frag_pack(codes, bits, k_pad)
    assert words.shape == (3, k_pad // kb * 4 * 32)
    assert torch.equal(layout.frag_unpack(words, bits, 301), codes)
    full = torch.zeros(48, k_pad, dtype=torch.uint8)
    full[:, :301] = codes
    pw, mask = 16 // bits, (1 << bits) - 1
    gen = torch.Generator().manual_seed(bits)
    for _ in range(50):
        rb, blk, v, g, q, p = (int(torch.randint(0, n, (1,), generator=gen)) for n in (3, k_pad // kb, 4, 8, 4, pw))
        word = int(words[rb, (blk * 32 + 4 * g + q) * 4 + v]) & 0xFFFFFFFF
        u = pw * v + p
        row, k = 16 * rb + g + 8 * (u & 1), blk * kb + 16 * (u // 4) + 4 * q + 2 * ((u % 4) >> 1)
        assert (word >> (bits * p)) & mask == full[row, k]
        assert (word >> (16 + bits * p)) & mask == full[row, k + 1]


@pytest.mark.parametrize("bits", range(2, 9))
def test_interleave_roundtrip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 777), dtype=torch.uint8)
    k_pad = -(-777 // layout.k_tile(bits)) * layout.k_tile(bits)
    words = layout.interleave(codes, bits, k_pad)
    assert words.dtype == torch.int32 and words.shape == (5, k_pad // (32 // bits))
    assert torch.equal(layout.deinterleave(words, bits, 777), codes)


def test_import_is_lazy():
    code = ("import sys, lqkit, lqkit.kernels, lqkit.nn; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized(), 'cuda initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# kernels vs the pure-torch path


def _device() -> str:
    from lqkit import kernels

    if INTERPRET and kernels._triton_importable():
        return "cpu"
    if not kernels.available():
        pytest.skip("needs CUDA and triton")
    return "cuda"


def _check(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> float:
    assert torch.isfinite(y).all(), "non-finite output (unwritten or NaN)"
    err = float((y.float() - ref).norm() / ref.norm())
    assert err <= tol, f"relative error {err:.2e} > {tol}"
    return err


def _case(f, shape, rank, bias, device, dtype, layout="auto"):
    spec = _spec(f)
    w = torch.randn(shape, device=device)
    q = qmod.quantize(w, spec)
    from lqkit import kernels

    kw = kernels.prepare(q.packed, q.aux, spec, shape, device, layout=layout)
    W = qmod.dequantize_packed(q.packed, q.aux, spec, shape)  # fp32 reference weight
    L = (torch.randn(shape[0], rank, device=device) / rank ** 0.5).to(dtype) if rank else None
    R = (torch.randn(rank, shape[1], device=device) / shape[1] ** 0.5).to(dtype) if rank else None
    b = torch.randn(shape[0], device=device).to(dtype) if bias else None
    return kw, W, L, R, b


def _ref(x, W, L, R, b):
    y = x.float() @ W.t()
    if L is not None:
        y = y + (x.float() @ R.float().t()) @ L.float().t()
    return y + b.float() if b is not None else y


def _run_configs(kw, W, L, R, b, shape, device, dtype, configs):
    from lqkit import kernels

    for cfg, m in configs:
        for _ in range(2):  # twice: the self-resetting counters must leave the next call correct
            x = torch.randn(m, shape[1], device=device).to(dtype)  # fresh inputs every check
            out = torch.full((m, shape[0]), float("nan"), device=device, dtype=dtype)  # poison
            y = kernels.linear(x, kw, L, R, b, config=cfg, out=out)
            _check(y, _ref(x, W, L, R, b), 1e-2 if dtype != torch.float32 else 1e-4)


FRAG = [f for f in FORMATS if layout.frag_ok(_spec(f))]


def _frag_configs(device: str) -> list:
    """(config, tokens) pairs the fragment test runs; few distinct compilations (the unrolled kernel
    takes 15-40 s each on a GPU, minutes in the interpreter): the default, U = 1 and 2, ..."""
    from lqkit.kernels import _triton as kt

    configs = [(None, 1), (None, 24 if device != "cpu" else 20),  # default (17-32: launches of 16)
               (kt.Config(kind="frag", bn=32, warps=2, occ=16.0, pf=1), 3),  # one block per step
               (kt.Config(kind="frag", bn=64, warps=4, split=1, pf=2), 9),  # no split-K, tokens 8-15
               (kt.Config(kind="frag", bn=32, warps=2, occ=8.0, pf=4), 2),  # 4 blocks per step (2 groups at 4 bits)
               (kt.Config(kind="frag", bn=32, warps=2, occ=64.0, pf=1, maxnreg=80), 16),  # many splits
               (kt.Config(kind="frag", bn=64, warps=4, occ=4.0, pf=2, unroll=2), 5),  # two steps per iteration
               (kt.Config(kind="frag", bn=32, warps=2, occ=64.0, pf=1, unroll=2), 1),  # ... and few per split
               # one token: x's words once per step, shuffled into the B fragments
               (kt.Config(kind="frag", bn=32, warps=2, occ=64.0, pf=1, xs=1), 1),
               (kt.Config(kind="dequant"), 4)]
    if device != "cpu":  # more tokens: dequantize + cuBLAS by default; x shuffled with U = 4 and unroll 2
        configs += [(None, 70), (kt.Config(kind="frag", bn=32, warps=2, occ=8.0, pf=4, xs=1), 1),
                    (kt.Config(kind="frag", bn=64, warps=4, occ=4.0, pf=4, unroll=2, xs=1), 1),
                    (kt.Config(kind="frag", bn=16, warps=1, split=1, pf=8, xs=1), 1),  # one warp, U = 8
                    (kt.Config(kind="frag", bn=16, warps=1, split=8, pf=4, xs=1), 1)]  # one warp, split-K
    return configs


def _frag_part(part: str, n: int) -> list[int]:
    """Which of the configurations a part runs. "sample" (``make test``, through the interpreter):
    every format's default one-token launch and its dequantize path; "rest-a"/"rest-b" (exhaustive:
    ``make test-all`` and the GPU): all the others — several blocks per step, split-K or not, unroll,
    x shuffled, launches of 16 — in two halves for two workers (each takes minutes in the interpreter)."""
    sample = [0, 9]
    rest = [j for j in range(n) if j not in sample]
    return sample if part == "sample" else rest[0::2] if part == "rest-a" else rest[1::2]


@pytest.mark.cuda
@pytest.mark.parametrize("part", ["sample", pytest.param("rest-a", marks=pytest.mark.exhaustive),
                                  pytest.param("rest-b", marks=pytest.mark.exhaustive)])
@pytest.mark.parametrize("i,f", list(enumerate(FRAG)), ids=[_fid(f) for f in FRAG])
def test_frag_kernel_matches_torch(i, f, part):
    """The tensor-core GEMV over the fragment layout (the default where it holds the format): 1-16 tokens,
    split-K or not, 2 and 4 warps, 1, 2 or 4 blocks per step (steps that start at group boundaries take
    their group ends from compile-time positions), one or two steps per loop iteration, odd
    shapes, rank 0 / odd / even, one token with x read once per step and shuffled (Config(xs=1)); more
    tokens in launches of 16; dequantize + cuBLAS.
    In triton's CPU interpreter (fp16 only) the mma is emulated from its PTX fragment layouts.
    Each format runs in three parts (:func:`_frag_part`): a sample by default, the rest exhaustive."""
    device = _device()
    from lqkit.kernels import _triton as kt

    shapes = SHAPES if device != "cpu" else CPU_SHAPES
    for j, dtype in enumerate((torch.bfloat16, torch.float16) if device != "cpu" else (torch.float16,)):
        shape = shapes[(i + j) % len(shapes)]
        rank, bias = (0, 5, 16, 32)[(i + j) % 4], (i + j) % 2 == 0
        kw, W, L, R, b = _case(f, shape, rank, bias, device, dtype, layout="frag")
        assert kw.layout == "frag"
        configs = _frag_configs(device)
        _run_configs(kw, W, L, R, b, shape, device, dtype, [configs[k] for k in _frag_part(part, len(configs))])
    if part != "sample":
        return
    with pytest.raises(ValueError, match="does not read the 'frag' layout"):  # interleaved-only kinds
        kt.linear(torch.randn(2, shape[1], device=device).to(dtype), kw, config=kt.Config(kind="mma"))
    with pytest.raises(ValueError, match="1 or 2 steps"):
        kt.linear(torch.randn(2, shape[1], device=device).to(dtype), kw, config=kt.Config(kind="frag", unroll=3))
    with pytest.raises(ValueError, match="xs=2"):
        kt.linear(torch.randn(1, shape[1], device=device).to(dtype), kw, config=kt.Config(kind="frag", xs=2))


@pytest.mark.cuda
def test_frag_warps_split_k():
    """Config(kwarps=1): a program's warps share one block of 16 rows and split its K (whole steps and
    groups each), their sums added in the program; 1-12 tokens, U = 1-4, one or two steps an iteration,
    group ends at compile or run time, x once per step, bias, 2, 3 and 4 bits; rejected with a low rank,
    a K-split, a warp's share not whole groups, or K not in whole blocks (3 bits' 80-k blocks in 512)."""
    device = _device()
    from lqkit.kernels import _triton as kt

    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    f4, f4g64, f2 = ("rtn", 4, "in", 128, False), ("rtn", 4, "in", 64, False), ("rtn", 2, "in", 64, False)
    f3g64 = ("rtn", 3, "in", 64, False)
    cases = [(f4, (48, 512), dict(warps=4, pf=2), 1), (f4g64, (40, 1024), dict(warps=4, pf=4, xs=1), 1),
             (f4, (32, 512), dict(warps=2, pf=2), 3), (f4g64, (24, 512), dict(warps=2, pf=1), 12),
             (f2, (32, 1024), dict(warps=4, pf=2), 1),
             (f4, (32, 512), dict(warps=4, pf=1), 1),  # group ends tested at run time (U = 1, 2 blocks a group)
             (f4, (32, 1024), dict(warps=2, pf=2, unroll=2), 1),  # two steps an iteration (clamped loads)
             (f3g64, (32, 640), dict(warps=2, pf=2), 2),  # 80-k blocks, group ends at run time
             (("rtn", 3, "in", 128, False), (32, 1280), dict(warps=2, pf=4, xs=1), 1)]  # as _frag._kwarps takes it
    if device != "cpu":
        cases += [(f4, (4096, 1024), dict(warps=4, pf=4, xs=1), 1), (f4, (1024, 4096), dict(warps=8, pf=4, xs=1), 1),
                  (f4, (4096, 4096), dict(warps=4, pf=4, unroll=2, xs=1), 1)]
    for f, shape, fields, m in cases:
        kw, W, _, _, b = _case(f, shape, 0, True, device, dtype, layout="frag")
        cfg = kt.Config(kind="frag", bn=16 * fields["warps"], occ=4.0, kwarps=1, **fields)
        _run_configs(kw, W, None, None, b, shape, device, dtype, [(cfg, m)])
    kw, _, L, R, _ = _case(f4, (32, 512), 4, False, device, dtype, layout="frag")
    x = torch.randn(1, 512, device=device).to(dtype)
    for c, args in [(kt.Config(kind="frag", bn=64, warps=4, pf=2, kwarps=1), (L, R)),
                    (kt.Config(kind="frag", bn=64, warps=4, pf=2, split=2, kwarps=1), (None, None)),
                    (kt.Config(kind="frag", bn=128, warps=8, pf=1, kwarps=1), (None, None))]:  # half a group each
        with pytest.raises(ValueError, match="kwarps=1 does not fit"):
            kt.linear(x, kw, *args, config=c)
    kw3 = _case(("rtn", 3, "in", 128, False), (32, 512), 0, False, device, dtype, layout="frag")[0]
    with pytest.raises(ValueError, match="kwarps=1 does not fit"):
        kt.linear(x, kw3, config=kt.Config(kind="frag", bn=32, warps=2, pf=1, kwarps=1))


@pytest.mark.cuda
def test_step_offsets_keep_group_ends_at_compile_time():
    """Where the fragment kernel's group ends are fixed at compile time (the kernel's OFF1, OFF2) and
    blocks per split: every step from a group boundary with 64-k blocks (4 bits) and where U blocks span
    whole groups; with 80-k blocks (3 bits, groups of 128) only an iteration of two steps of 4 does
    (splits of a multiple of 2U), else the ends are tested at run time."""
    _device()  # imports triton
    from lqkit.kernels import _frag
    from lqkit.kernels import _triton as kt

    def offs(bits, group, **cfg):
        c = kt.Config(kind="frag", **cfg)
        return _frag.step_offsets(bits, group, c), _frag.step_multiple(bits, group, c)

    assert offs(4, 128, pf=2, unroll=2) == ((0, 0), 2) and offs(2, 64, pf=1) == ((0, 0), 1)
    assert offs(6, 128, pf=4) == ((0, 0), 4) and offs(3, 64, pf=4) == ((0, 0), 4) and offs(3, 128, pf=8) == ((0, 0), 8)
    assert offs(3, 128, pf=4, unroll=2) == ((-1, 4), 8) and offs(5, 128, pf=4, unroll=2) == ((-1, 4), 8)
    assert offs(3, 128, pf=2, unroll=2) == ((-1, -1), 2) and offs(3, 128, pf=4) == ((-1, -1), 4)


@pytest.mark.cuda
@pytest.mark.parametrize("bits, group, k, extra, m, offsets", [
    # iterations from group boundaries; 3 splits asked, 2 made (4 blocks a split would start mid-group)
    (3, 128, 760, {"pf": 4, "unroll": 2, "xs": 1, "split": 3}, 1, (-1, 4)),
    (3, 64, 440, {"pf": 4, "split": 2}, 1, (0, 0)),  # steps of 4 blocks (320 k = 5 groups of 64)
    (5, 128, 1000, {"pf": 4, "unroll": 2, "split": 2}, 3, (-1, 4))])  # 48-k blocks: iterations of 8 (3 groups)
def test_frag_group_ends_fixed_at_compile_time(bits, group, k, extra, m, offsets):
    """Where blocks straddle groups (3 and 5 bits) but a step, or an iteration of two, spans whole groups,
    the fragment kernel takes its group ends from compile-time positions: equal to torch, two K-splits,
    each starting at such a boundary, the second one short (its last blocks past the end of K)."""
    device = _device()
    from lqkit import kernels
    from lqkit.kernels import _frag
    from lqkit.kernels import _triton as kt

    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    spec = QuantSpec("rtn", bits, group)
    w = torch.randn(16, k, device=device)
    q = qmod.quantize(w, spec)
    kw = kernels.prepare(q.packed, q.aux, spec, (16, k), device, layout="frag")
    W = qmod.dequantize_packed(q.packed, q.aux, spec, (16, k))
    cfg = kt.Config(kind="frag", bn=16, warps=1, **extra)
    mult = _frag.step_multiple(bits, group, cfg)
    assert _frag.step_offsets(bits, group, cfg) == offsets
    assert kt._split(kw, 1, cfg, kw.qweight.device, multiple=mult)[0] == 2 and kw.n_tiles % mult != 0
    b = torch.randn(16, device=device).to(dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    _check(kernels.linear(x, kw, None, None, b, config=cfg), _ref(x, W, None, None, b))


@pytest.mark.cuda
@pytest.mark.parametrize("f", [_interp_exhaustive(FORMATS[0], id=_fid(FORMATS[0])),  # frag
                               FORMATS[10], FORMATS[-1]], ids=_fid)  # interleaved / per-row tables
def test_stacked_kernel_matches_members(f):
    """Matrices stacked into one (nn.fuse's q/k/v, gate/up): one call gives every member's output,
    with block-diagonal low-rank factors (ranks 5, 0, 3) and biases on some members only."""
    device = _device()
    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    from lqkit import kernels

    k = 1000 if device != "cpu" else 333
    members = [_case(f, (n, k), rank, bias, device, dtype) for n, rank, bias in ((40, 5, True), (24, 0, False),
                                                                               (70, 3, True))]
    s, offs = kernels.stack([c[0] for c in members])
    assert s.layout == members[0][0].layout and offs == (0, 128, 256)
    L, R, b = kernels.stack_factors([c[2] for c in members], [c[3] for c in members], [c[4] for c in members],
                                    tuple(c[0].shape[0] for c in members), offs, s.shape[0])
    for m in (1, 3) + ((17,) if device != "cpu" else ()):
        x = torch.randn(m, k, device=device).to(dtype)
        y = kernels.linear(x, s, L, R, b)
        for (kw, W, Li, Ri, bi), o in zip(members, offs):
            _check(y[:, o:o + kw.shape[0]], _ref(x, W, Li, Ri, bi))


@pytest.mark.cuda
@pytest.mark.parametrize("f", [FORMATS[0], FORMATS[6], OUTLIER_FORMATS[0]], ids=_fid)  # frag / interleaved / + outliers
def test_bound_call_matches_linear(f, monkeypatch):
    """kernels.bind: the first call's result, then later calls on new inputs of the same token count
    straight to the kept launch (no configuration looked up again: default_config is made to fail),
    twice more (self-resetting counters), the second with a leading shape; one-launch kinds and the
    general path (many tokens)."""
    device = _device()
    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    from lqkit import kernels
    from lqkit.kernels import _triton as kt

    shape = (70, 333 + 1) if device == "cpu" else (1000, 1536)  # K even: the fragment kernel reads x in pairs
    kw, W, L, R, b = _case(f, shape, 5, True, device, dtype)
    if device == "cpu" and kw.layout == "frag" and kw.fix is not None:
        pytest.skip("the interpreter's fragment kernel is slow: checked on a GPU")
    for m in (1, 3, 40) if device != "cpu" or kw.layout != "frag" else (1,):
        x = torch.randn(m, shape[1], device=device).to(dtype)
        bound, y = kernels.bind(x, kw, L, R, b)
        _check(y, _ref(x, W, L, R, b))
        assert (bound.general is None) == (m <= 3)  # one planned launch, or linear() with the config fixed
        with monkeypatch.context() as mp:
            mp.setattr(kt, "default_config", lambda *a: (_ for _ in ()).throw(AssertionError("looked up")))
            x2 = torch.randn(m, shape[1], device=device).to(dtype)
            _check(bound(x2), _ref(x2, W, L, R, b))
            y3 = bound(x2.view(1, m, -1), (1, m, shape[0]))  # any leading shape: y allocated as asked
            assert y3.shape == (1, m, shape[0])
            _check(y3[0], _ref(x2, W, L, R, b))


def test_tune_remembers_failing_configs():
    """A candidate that raises is reported as failed once and not tried again for the same format,
    token count and dtype (another shape of that format included): its compile would fail again."""
    pytest.importorskip("triton")
    from lqkit import kernels
    from lqkit.kernels import _triton as kt

    kws = [_case(FORMATS[6], shape, 0, False, "cpu", torch.float32)[0] for shape in ((64, 256), (96, 256))]
    assert kws[0].layout == "interleaved"
    bad = kt.Config(kind="frag")  # reads the fragment layout only: linear() raises
    seen = []
    for kw in kws:
        cfg, ms = kernels.tune(torch.randn(1, 256), kw, configs=[bad], report=lambda c, ms, s: seen.append((c, ms)))
        assert cfg is None and ms == float("inf")
    assert seen == [(bad, None)]


@pytest.mark.cuda
def test_frag_default_config_by_tokens():
    """The fragment layout's dispatch: its kernel up to SLICED_MAX_M tokens (in launches of 16), then
    (and for fp32 activations) dequantize + cuBLAS; tuning tries both where both apply."""
    device = _device()
    from lqkit.kernels import _frag
    from lqkit.kernels import _triton as kt

    kw = _case(FRAG[0], (64, 256), 0, False, device, torch.float16, layout="frag")[0]
    h = torch.float16
    assert [kt.default_config(kw, m, h).kind for m in (1, 16, 17, _frag.SLICED_MAX_M, _frag.SLICED_MAX_M + 1)] == \
        ["frag"] * 4 + ["dequant"]
    assert kt.default_config(kw, 4, torch.float32).kind == "dequant"
    assert {c.kind for c in kt.candidates(kw, 8, h)} == {"frag"}
    assert {c.kind for c in kt.candidates(kw, 40, h)} == {"frag", "dequant"}
    assert {c.kind for c in kt.candidates(kw, 256, h)} == {"dequant"}
    # the two-steps-per-iteration loop competes at one token only
    assert {c.unroll for c in kt.candidates(kw, 1, h)} == {1, 2}
    assert {c.unroll for c in kt.candidates(kw, 8, h)} == {1}
    assert {c.xs for c in kt.candidates(kw, 1, h)} == {0, 1}
    assert {c.xs for c in kt.candidates(kw, 8, h)} == {0}


@pytest.mark.cuda
def test_one_token_default_keeps_group_ends_at_compile_time():
    """At one token the default launch is one whose steps, or iterations of two steps, span whole
    groups: 3 bits with groups of 128 (80-k blocks) takes U = 4 with two steps per iteration, 4 bits
    keeps U = 2 (64-k blocks: every block is whole groups). What load(tune=True) times: the default
    first, plain U = 2, the one-warp U = 8 launch, six in all, and the warps splitting K where they fit
    (3 bits here: 16 blocks of 80 k, two warps of 8 blocks = 5 groups each; 4 bits: 20 blocks, none)."""
    device = _device()
    from lqkit.kernels import _frag
    from lqkit.kernels import _triton as kt

    h = torch.float16
    f3, f4 = ("rtn", 3, "in", 128, False), ("rtn", 4, "in", 128, False)
    for f, want, kwarps in ((f3, (4, 2, 1), [2]), (f4, (2, 1, 0), [])):
        kw = _case(f, (64, 1280), 0, False, device, h, layout="frag")[0]
        d = kt.default_config(kw, 1, h)
        assert (d.pf, d.unroll, d.xs) == want
        assert _frag.step_offsets(kw.bits, kw.spec.group_size, d) != (-1, -1)
        assert kt.default_config(kw, 8, h).unroll == 1  # more tokens: the plain loop
        q = kt.quick_candidates(kw, 1, h)
        assert q[0] == d and kt.Config(kind="frag", bn=64, warps=4, occ=4.0, pf=2) in q
        assert [c.warps for c in q if c.kwarps] == kwarps
        assert len([c for c in q if not c.kwarps]) == 6
        assert any(c.warps == 1 and c.pf == 8 for c in q)


@pytest.mark.cuda
def test_one_token_default_splits_k_inside_the_program_on_few_rows():
    """4-bit layers with at most KWARPS_MAX_PROGRAMS blocks of 16 rows per SM, up to KWARPS_MAX_IN wide,
    take the warps splitting K (Config(kwarps=1)) at one token: the most of 8, 4, 2 warps that each get
    a step of U = 4 and fit; one row block more, a rank, 3 bits, more tokens or a wider layer keep the
    launches they had. Tuning tries it where it fits (not with a rank)."""
    device = _device()
    from lqkit.kernels import _frag
    from lqkit.kernels import _triton as kt

    h = torch.float16 if device == "cpu" else torch.bfloat16
    rows = 16 * math.floor(_frag.KWARPS_MAX_PROGRAMS * kt._sms(torch.device(device)))
    f4, f3 = ("rtn", 4, "in", 128, False), ("rtn", 3, "in", 128, False)
    for width, warps in ((1024, 4), (2048, 8), (512, 2), (256, 0), (1152, 0)):  # 16, 32, 8, 4, 18 blocks of 64
        kw = _case(f4, (rows, width), 0, False, device, h, layout="frag")[0]
        d = kt.default_config(kw, 1, h)
        assert (d.kwarps, d.warps if d.kwarps else 0) == ((1, warps) if warps else (0, 0)), width
        if warps:
            assert (d.pf, d.xs, d.bn) == (4, 1, 16 * warps) and _frag.kwarps_fit(kw, d, False)
            assert kt.quick_candidates(kw, 1, h)[0] == d and d in kt.candidates(kw, 1, h)
            assert kt.default_config(kw, 1, h, has_lr=True) == _frag._plain() == kt.default_config(kw, 2, h)
            assert not any(c.kwarps for c in kt.quick_candidates(kw, 1, h, has_lr=True) + kt.candidates(kw, 1, h, True))
    more = _case(f4, (rows + 16, 1024), 0, False, device, h, layout="frag")[0]
    wide = _case(f4, (rows, _frag.KWARPS_MAX_IN + 512), 0, False, device, h, layout="frag")[0]
    three = _case(f3, (rows, 1280), 0, False, device, h, layout="frag")[0]  # 16 blocks of 80: fits, not timed
    assert _frag._kwarps(three) is not None and _frag._kwarps(wide) is not None
    for kw, want in ((more, _frag._plain()), (wide, _frag._plain()), (three, _frag._iter_aligned())):
        assert kt.default_config(kw, 1, h) == want, kw.shape


@pytest.mark.cuda
def test_one_token_default_is_one_warp_on_layers_with_many_rows():
    """Layers with enough rows for ONE_WARP_MIN_PROGRAMS one-warp programs per SM take one warp per
    program by default at one token (3 bits and more, without low rank), and that call is right (GPU);
    one row block fewer, 2 bits, a rank or more tokens keep the launches they had; past the cap, U = 4 with
    two steps an iteration up to WIDE_ITER_MAX_IN wide (3 bits with groups of 128 at any width)."""
    device = _device()
    from lqkit.kernels import _frag
    from lqkit.kernels import _triton as kt

    h = torch.float16 if device == "cpu" else torch.bfloat16
    rows = 16 * math.ceil(_frag.ONE_WARP_MIN_PROGRAMS * kt._sms(torch.device(device)))
    f3, f4, f2 = ("rtn", 3, "in", 128, False), ("rtn", 4, "in", 128, False), ("rtn", 2, "in", 128, False)
    kw, W, _, _, _ = _case(f3, (rows, 1280), 0, False, device, h, layout="frag")
    one = _frag._one_warp()
    assert kt.default_config(kw, 1, h) == one and kt.quick_candidates(kw, 1, h)[0] == one
    fewer = _case(f3, (rows - 16, 1280), 0, False, device, h, layout="frag")[0]
    assert kt.default_config(kw, 1, h, has_lr=True) == kt.default_config(fewer, 1, h) != one
    assert kt.default_config(kw, 2, h) != one
    assert kt.default_config(_case(f4, (rows, 1280), 0, False, device, h, layout="frag")[0], 1, h) == one
    assert kt.default_config(_case(f2, (rows, 1280), 0, False, device, h, layout="frag")[0], 1, h) != one
    many = 16 * math.floor(_frag.ONE_WARP_MAX_PROGRAMS * kt._sms(torch.device(device)) + 1)  # past the cap
    wide = _frag.WIDE_ITER_MAX_IN + 128
    assert kt.default_config(_case(f3, (many - 16, 1280), 0, False, device, h, layout="frag")[0], 1, h) == one
    for f, width, want in [(f3, 1280, _frag._iter_aligned()), (f4, 1280, _frag._iter_aligned()),
                           (f4, wide, _frag._plain()), (f3, wide, _frag._iter_aligned())]:
        past = _case(f, (many, width), 0, False, device, h, layout="frag")[0]
        assert kt.default_config(past, 1, h) == want and kt.default_config(past, 1, h, has_lr=True) == (
            _frag._plain() if f == f4 else want)
    if device == "cpu":  # minutes in the interpreter; the one-warp U = 8 launch itself: _frag_configs on a GPU
        return
    from lqkit import kernels

    x = torch.randn(1, 1280, device=device).to(h)
    y = kernels.linear(x, kw, None, None, None)
    assert kt.chosen_config(kw, 1, False, h) == one
    assert torch.allclose(y.float(), _ref(x, W, None, None, None), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("cold", [True, False], ids=["cold", "isolated"])
def test_tune_keeps_the_fastest_candidate(cold):
    """Tuning (back-to-back on rotating weight copies, or isolated calls) returns one of the
    candidates with a positive time, leaves the weight untouched, and later calls use its choice."""
    from lqkit import kernels

    if INTERPRET or not kernels.available():
        pytest.skip("times CUDA events: needs a GPU")
    from lqkit.kernels import _triton as kt

    shape, h = (256, 512), torch.bfloat16
    kw, W, L, R, b = _case(FRAG[0], shape, 8, False, "cuda", h, layout="frag")
    words = kw.qweight.clone()
    copy = kt.clone_weight(kw)
    assert copy.qweight.data_ptr() != kw.qweight.data_ptr() and torch.equal(copy.qweight, kw.qweight)
    assert copy.cache == {} and kt.cold_copies(kw.nbytes(), torch.device("cuda")) >= 2
    configs = kt.candidates(kw, 1, h)[:3]
    cfg, ms = kernels.tune(torch.randn(1, shape[1], device="cuda", dtype=h), kw, L, R, configs=configs,
                           rep_ms=2, cold=cold)
    assert cfg in configs and 0 < ms < 10
    assert torch.equal(kw.qweight, words)
    assert kt.tuned_choice(kw, 1, True, h) == cfg
    x = torch.randn(1, shape[1], device="cuda", dtype=h)
    _check(kernels.linear(x, kw, L, R), _ref(x, W, L, R, None))


@pytest.mark.cuda
def test_tuned_config_kept_as_json_and_reused():
    """kernels.tuned_config times the quick candidates of a one-token call once; its result survives
    a JSON round trip, is used (not timed again) when found under its key, and becomes the process's
    choice; an entry that is not a valid configuration for the layout is refused and timed again;
    calls without quick candidates keep the default and give nothing to keep."""
    import json

    from lqkit import kernels

    if INTERPRET or not kernels.available():
        pytest.skip("times CUDA events: needs a GPU")
    from lqkit.kernels import _triton as kt

    shape, h = (256, 512), torch.bfloat16
    kw, W, L, R, b = _case(FRAG[0], shape, 8, False, "cuda", h, layout="frag")
    x = torch.randn(1, shape[1], device="cuda", dtype=h)
    key, cfg, now = kernels.tuned_config(x, kw, L, R)
    assert now and cfg is not None and kt.Config(**cfg) in kt.quick_candidates(kw, 1, h)
    kept = json.loads(json.dumps({key: cfg}))
    kt.forget_tuned()
    assert kernels.tuned_config(x, kw, L, R, known=kept) == (key, cfg, False)
    assert kt.tuned_choice(kw, 1, True, h) == kt.Config(**cfg)
    assert not kernels.use_config(x, kw, L, R, {"kind": "gemv"}) and not kernels.use_config(x, kw, L, R, {"bogus": 1})
    assert kernels.tuned_config(x, kw, L, R, known={key: {"bogus": 1}})[2]  # refused: timed again
    x16 = torch.randn(16, shape[1], device="cuda", dtype=h)
    assert kernels.tuned_config(x16, kw, L, R)[1:] == (None, False)
    assert key != kernels.tuned_config(x, kw, None, None, known=kept)[0]  # the rank is part of the key
    _check(kernels.linear(x, kw, L, R), _ref(x, W, L, R, None))


@pytest.mark.cuda
@pytest.mark.parametrize("f", FRAG + [("rtn", 5, "in", 32, False), ("rtn", 7, "in", 64, False)], ids=_fid)
def test_frag_dequantize_kernel(f):
    """The fragment layout's decode-to-dense kernel (many tokens) gives the stored weight."""
    device = _device()
    from lqkit.kernels import _frag

    spec = _spec(f)
    shape = (130, 333)
    q = qmod.quantize(torch.randn(shape, device=device), spec)
    kw = layout.prepare_weight(q.packed, q.aux, spec, shape, device, layout="frag")
    torch.testing.assert_close(_frag.dequantize(kw, torch.float32), qmod.dequantize(q), rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("i,f", list(enumerate(FORMATS)), ids=[_fid(f) for f in FORMATS])
def test_kernels_match_torch(i, f):
    """The kernels over the interleaved layout (every format; the default layout)."""
    device = _device()  # skips before importing triton when there is no CUDA + triton
    from lqkit.kernels import _triton as kt

    dtype = torch.float32 if device == "cpu" else (torch.bfloat16, torch.float16)[i % 2]
    shape = (SHAPES if device != "cpu" else CPU_SHAPES)[i % len(SHAPES)]
    rank, bias = (0, 5, 16)[i % 3], i % 2 == 0
    kw, W, L, R, b = _case(f, shape, rank, bias, device, dtype, layout="interleaved")
    configs = [(None, 1), (None, 3), (None, 17),  # default dispatch
               (kt.Config(kind="gemv", bn=32, occ=8.0), 3),  # split-K with several tokens
               (kt.Config(kind="gemv", bn=64, occ=1.0), 1),  # 64-row blocks, few K-splits
               (kt.Config(kind="gemm", bm=16, bn=64, occ=8.0), 17),
               (kt.Config(kind="dequant"), 40)]  # many tokens: decode once, then cuBLAS
    if kt.mma_ok(kw, dtype):  # tensor-core kernel: split-K or not, several blocks of tokens
        configs += [(kt.Config(kind="mma", bn=64, occ=8.0), 5), (kt.Config(kind="mma", bn=128, occ=1.0), 16),
                    (kt.Config(kind="mma", bn=32, warps=4, stages=3, occ=4.0), 19)]
    _run_configs(kw, W, L, R, b, shape, device, dtype, configs)


_OUTLIER_CASES = [(i, f, lay) for i, f in enumerate(OUTLIER_FORMATS)
                  for lay in (("interleaved", "frag") if layout.frag_ok(_spec(f)) else ("interleaved",))]


@pytest.mark.cuda
@pytest.mark.parametrize("i,f,lay", [_interp_exhaustive(*c, id=f"{_fid(c[1])}-{c[2]}") if c[2] == "frag" else
                                     pytest.param(*c, id=f"{_fid(c[1])}-{c[2]}") for c in _OUTLIER_CASES])
def test_kernels_add_the_outliers(i, f, lay):
    """Exactly kept outliers on every path: the main kernel on the plain codes, then the sparse pass
    (one token, a few, split-K, the tiled kernel), or folded into the decoded weight (many tokens)."""
    device = _device()
    from lqkit.kernels import _triton as kt

    shape = (300, 1000) if device != "cpu" else (70, 333)
    if device == "cpu":  # the interpreter's fragment kernel takes fp16 only
        dtype = torch.float32 if lay == "interleaved" else torch.float16
    else:
        dtype = (torch.bfloat16, torch.float16)[i % 2]
    kw, W, L, R, b = _case(f, shape, (0, 5)[i % 2], i % 2 == 0, device, dtype, layout=lay)
    assert kw.fix is not None and kw.layout == lay
    configs = [(None, 1), (None, 3), (kt.Config(kind="dequant"), 40)]
    if lay == "interleaved":
        configs += [(kt.Config(kind="gemv", bn=32, occ=8.0), 2), (kt.Config(kind="gemm", bm=16, bn=64), 17)]
    _run_configs(kw, W, L, R, b, shape, device, dtype, configs)


@pytest.mark.cuda
def test_kernel_batch_shapes_and_lowrank_only_cost():
    """3-D inputs keep their leading dims; rank-32 and bias on the main benchmark format."""
    from lqkit import kernels

    device = _device()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kw, W, L, R, b = _case(FORMATS[0], (256, 1024), 32, True, device, dtype)
    x = torch.randn(2, 3, 1024, device=device).to(dtype)
    y = kernels.linear(x, kw, L, R, b)
    assert y.shape == (2, 3, 256) and y.dtype == dtype
    _check(y.reshape(6, 256), _ref(x.reshape(6, 1024), W, L, R, b))


# ----------------------------------------------------------------------------------------------
# CompressedLinear dispatch


def _module(dtype=torch.float32, device="cpu"):
    from lqkit.core.decompose import MatrixSpec, decompose
    from lqkit.nn import CompressedLinear

    spec = MatrixSpec(method="lorc", quant=QuantSpec(bits=4, group_size=64), rank=4)
    w = torch.randn(96, 320)
    d = decompose(w, spec)
    return CompressedLinear.from_decomposition(d, bias=torch.randn(96), dtype=dtype).to(device)


def test_dispatch_on_cpu_uses_torch_and_logs(caplog):
    m = _module()
    x = torch.randn(3, 320)
    with caplog.at_level("INFO", logger="lqkit.nn.linear"):
        with torch.no_grad():
            y = m(x)
    assert m.resolve_backend(x) == "torch"
    assert "backend torch" in caplog.text
    ref = x @ m.merged_weight().t() + m.bias
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_dispatch_forced_and_invalid_backends():
    from lqkit.errors import SpecError

    m = _module()
    x = torch.randn(2, 320)
    m.backend = "triton"
    with pytest.raises(RuntimeError, match="CUDA"):
        m(x)
    m.backend = "gpu"
    with pytest.raises(SpecError):
        m(x)
    m.backend = "torch"
    assert m.resolve_backend(x) == "torch"


def test_dispatch_auto_needs_no_grad(monkeypatch, caplog):
    """auto takes the kernels only when usable and no gradient is needed (they have no backward);
    the log line names the kernels' layout."""
    from lqkit import kernels

    m = _module()
    monkeypatch.setattr(kernels, "available", lambda: True)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    x = torch.randn(2, 320).as_subclass(FakeCuda)
    assert m.resolve_backend(x) == "torch"  # L, R require grad and grad mode is on
    with torch.no_grad(), caplog.at_level("DEBUG", logger="lqkit.nn.linear"):
        assert m.resolve_backend(x) == "triton"
    assert "backend triton (frag layout)" in caplog.text  # rtn 4-bit g64: the fragment layout


def test_kernel_layout_cached_and_invalidated():
    m = _module()
    kw = m.kernel_weight()
    assert m.kernel_weight() is kw  # prepared once
    with torch.no_grad():
        m.qcodes.add_(0)  # in-place change (as load_state_dict does) bumps the version
    kw2 = m.kernel_weight()
    assert kw2 is not kw
    torch.testing.assert_close(layout.reference_weight(kw2), m.dequantized_weight(), rtol=0, atol=1e-6)


@pytest.mark.cuda
def test_module_triton_matches_torch():
    device = _device()
    if device == "cpu":
        pytest.skip("module dispatch needs CUDA")
    m = _module(torch.bfloat16, "cuda")
    x = torch.randn(5, 320, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert m.resolve_backend(x) == "triton"
        y = m(x)
        m.backend = "torch"
        ref = m(x)
        m.cpu()  # moving the buffers invalidates the prepared layout
        assert m.kernel_weight().device.type == "cpu"
    _check(y, ref.float())


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["frag", "frag-pf", "frag+params", "flat"])
def test_stream_probe_reads_every_word_once(kind, monkeypatch):
    """bench/stream_probe.py (the access-pattern baseline of bench/KERNELS.md) reads every word of a
    fragment-layout buffer exactly once, over several grids and splits: the XOR of its outputs is the
    XOR of all words (a parameter word is read by the 4 lanes that share its rows: it cancels)."""
    from pathlib import Path

    import numpy as np

    device = _device()
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import stream_probe as sp

    if device == "cpu":
        monkeypatch.setattr(sp, "sms", lambda: 8)
    xor = lambda t: int(np.bitwise_xor.reduce(t.cpu().numpy()))  # noqa: E731
    n, k, bits = 64, 640, 4  # 10 k blocks per row block: splits that do not divide it
    nkb, ng = k // (16 * 16 // bits), k // 128
    q = torch.randint(-2**31, 2**31 - 1, ((n // 16) * nkb * sp.WB,), dtype=torch.int32, device=device)
    p = torch.randint(-2**31, 2**31 - 1, ((n // 16) * ng * 16,), dtype=torch.int32, device=device)
    for nw, u, occ in ((4, 1, 2.0), (2, 2, 3.0), (2, 4, 8.0), (1, 2, 5.0)):
        out = torch.zeros(1 << 16, dtype=torch.int32, device=device)
        if kind == "flat":
            fn, _ = sp.flat_fn(q, out, nw, u, occ)
        else:
            fn, _ = sp.frag_fn(q, p, out, n, nkb, ng, nw, u, occ, kind == "frag-pf", kind == "frag+params", 2)
        fn()
        assert xor(out) == xor(q), (kind, nw, u, occ)


@pytest.mark.cuda
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_fused_sweep_equals_torch_sweep(act_order, monkeypatch):
    """The cost table's GPTQ sweep with each block's column steps in one Triton launch per family
    (lqkit.core.gptq_triton) gives the codes and group parameters of the torch sweep, over a stack of
    families: groups along "in" (static with act-order) and "out" of 16/32/64 rows, clip on and off,
    kept outliers, two super-blocks of columns, the second short (n = 160: blocks of 32, super-blocks of 128)."""
    from lqkit.core import gptq as G

    device = _device()
    if device == "cpu":  # the interpreter: three clip fractions instead of nine (the same search, a third of the steps)
        from lqkit.core import quant

        monkeypatch.setattr(quant, "CLIP_SHRINK", quant.CLIP_SHRINK[::4])
        monkeypatch.setattr(quant, "_SHRINK", {})
    g = torch.Generator().manual_seed(3)
    out, n, tokens = 64, 160, 300
    w = torch.randn(out, n, generator=g) * 0.02
    x = torch.randn(tokens, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.4 + torch.eye(n))
    h = x.T @ x / tokens
    cfg = [(3, 32, "out", True), (2, 16, "out", True), (4, 64, "out", False)]
    if act_order:
        cfg += [(3, 32, "in", True), (8, 32, "in", False), (2, 40, "in", True)]
    specs = [QuantSpec("gptq", b, gs, d, clip=c, act_order=act_order) for b, gs, d, c in cfg]
    keep = torch.rand(out, n, generator=g) < 0.02
    keeps = [keep if i % 2 else None for i in range(len(specs))]
    w, h, keeps = w.to(device), h.to(device), [k.to(device) if k is not None else None for k in keeps]
    monkeypatch.setenv("LQKIT_GPTQ_FUSED", "0")
    ref = G.gptq_many(w, h, specs, keeps)
    monkeypatch.setenv("LQKIT_GPTQ_FUSED", "1")
    calls = []
    real = G._fused_sweep
    monkeypatch.setattr(G, "_fused_sweep", lambda *a: calls.append(1) or real(*a))
    got = G.gptq_many(w, h, specs, keeps)
    assert calls, "the fused sweep did not run"
    for s, a, b in zip(specs, ref, got):
        assert torch.equal(a.codes, b.codes), s
        assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset), s
        torch.testing.assert_close(a.q, b.q, rtol=0, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("n, tokens, block", [(64, 3, None), (640, 17, None), (768, 2, None), (1536, 1, None),
                                              (3072, 5, None), (2048, 1, None), (14336, 1, None), (4096, 2, None),
                                              (4096, 2, 4096), (8 * 8192, 1, 8 * 8192), (24, 1, None)])
def test_rotation_in_one_launch_equals_the_core_transform(n, tokens, block):
    """kernels.rotation: R·x in one Triton launch (one product for blocks ≤ 128, two for 256..4096;
    the core transform for others: here one block of 65536 and blocks of 8) against the core
    transform in float32, to 16-bit rounding, for bf16 and fp16 inputs (fp16 only under triton's
    interpreter, which misreads bf16); fp32 inputs and the inverse go to the core transform. Blocks:
    the default (at most 2048), or one block of 4096 or 65536."""
    from lqkit import kernels
    from lqkit.core.rotation import Rotation, transform

    device = _device()
    from lqkit.kernels import _rotate  # imports triton: after the skip where there is none

    rot = Rotation(5, block) if block else Rotation.for_size(n, seed=5)
    r = kernels.rotation(rot, n, device)
    one_launch = _rotate.stages(rot.block) is not None
    assert isinstance(r, _rotate.TritonRotation) == one_launch, (n, rot.block)
    if one_launch and r.r1 > 1:  # two products: a token's blocks over >= 4 programs where the tiles allow
        nb = n // rot.block
        assert r.cols >= 16 and r.r2 % r.cols == 0
        assert nb * (r.r2 // r.cols) >= min(_rotate.PROGRAMS, nb * (r.r2 // 16)), (n, r.cols)
    ref = transform(rot, n, device)
    for dtype in (torch.bfloat16, torch.float16) if device != "cpu" else (torch.float16,):  # interpreter: no bf16
        x = (torch.randn(tokens, n, device=device) * 3).to(dtype)
        want = ref(x.float())
        got = r(x)
        assert got.dtype == dtype and got.shape == x.shape
        err = float((got.float() - want).abs().max() / want.abs().max())
        assert err < (8e-3 if dtype == torch.bfloat16 else 1e-3), (dtype, err)
        # the same rows in another layout: the same bits on a GPU; under the interpreter (numpy's products),
        # within one 16-bit rounding step of the largest value (one element of 21760 once differed by one
        # step, 9.5e-7, in CI: the 640-17 case, not reproduced in 36 reruns of it)
        same = dict(rtol=0, atol=0 if device != "cpu" else float(want.abs().max()) * 2 ** -10)
        x3 = x.view(1, tokens, n).expand(2, tokens, n)  # leading dims
        torch.testing.assert_close(r(x3), torch.stack([got, got]), **same)
        xt = x.t().contiguous().t()  # columns apart: copied to rows first
        assert xt.stride(-1) != 1 or tokens == 1
        torch.testing.assert_close(r(xt), got, **same)
        xu = torch.cat([x, x[:, :1]], 1)[:, 1:]  # rows of stride n + 1, 2 bytes off 16-byte alignment
        torch.testing.assert_close(r(xu).float(), ref(xu.float()), rtol=0, atol=float(want.abs().max()) * 8e-3)
    x32 = torch.randn(tokens, n, device=device)
    torch.testing.assert_close(r(x32), ref(x32))
    torch.testing.assert_close(r(r(x32), inverse=True), x32, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_rotated_layer_runs_its_rotation_before_the_kernel():
    """A rotated layer's prepared call: x rotated (on the device, in float32, back to x's dtype), then the
    kernel: the outputs of x·Ŵᵀ with Ŵ the layer's reconstruction in the original coordinates."""
    from lqkit.core import MatrixSpec, decompose
    from lqkit.core.rotation import Rotation
    from lqkit.nn import CompressedLinear

    device = _device()
    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    shape = (70, 320) if device == "cpu" else (1024, 1536)  # blocks of 64 and of 512: not powers of two
    w = torch.randn(shape) * 0.02
    spec = MatrixSpec("lorc", QuantSpec("rtn", 4, 64, "out"), rank=4, rotation=Rotation.for_size(shape[1], 3))
    m = CompressedLinear.from_decomposition(decompose(w, spec), dtype=dtype).to(device)
    run = m.prepare_runner()
    assert run.rotate is not None
    merged = m.merged_weight().to(device)
    from lqkit import kernels
    from lqkit.kernels import _rotate

    seen = kernels.cached_rotation.cache_info()
    for t in (1, 3):
        x = torch.randn(t, shape[1], device=device).to(dtype)
        with torch.no_grad():
            _check(run(x), x.float() @ merged.t())
            _check(m._kernel_forward(x), x.float() @ merged.t())  # unprepared: the same one-launch rotation
    assert len(run.calls) == 2  # the kernels ran (bound once per token count)
    info = kernels.cached_rotation.cache_info()
    assert info.misses - seen.misses <= 1 and info.hits - seen.hits >= 1  # built once, then reused
    assert isinstance(kernels.cached_rotation(spec.rotation, shape[1], x.device), _rotate.TritonRotation)


@pytest.mark.cuda
@pytest.mark.parametrize("shape, bits, rank, block, split, extra, runner", [
    ((32, 2048), 2, 0, 2048, 3, {"xs": 1}, False), ((40, 640), 3, 16, 32, 4, {"unroll": 2}, True),
    ((32, 1024), 4, 0, 1024, 0, {"xs": 1, "kwarps": 1}, False)])
def test_one_token_call_plans_its_rotation(shape, bits, rank, block, split, extra, runner, monkeypatch):
    """At one token a rotated layer's call takes its input rotation into the fragment GEMV's plan: the
    rotation's launch into the plan's scratch x', then the GEMV's on it (no allocation, no general
    call; on a Hopper GPU a programmatic dependent launch unless LQKIT_PDL=0), blocks of two products
    (2048, 1024) and of one (32), K-splits, xs=1 / unroll=2, the warps splitting K (kwarps=1: chained
    also under LQKIT_ROT_LAUNCH=one, whose rotation inside the launch it does not take), with and without
    a low-rank term. Equal to the
    rotation launched first, then the layer in fp32; the prepared call binds both launches (a chained
    bound call) and rotates first (the general call) at 3 tokens. (Kept small: each launch of the
    fragment kernel takes seconds in triton's interpreter.)"""
    from lqkit import kernels
    from lqkit.core import MatrixSpec, decompose
    from lqkit.core.rotation import Rotation
    from lqkit.nn import CompressedLinear

    device = _device()
    from lqkit.kernels import _frag, _rotate, _triton  # imports triton: after the skip where there is none

    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    w = torch.randn(shape) * 0.02
    rot = Rotation(7, block)
    method = "lorc" if rank else "quant"
    spec = MatrixSpec(method, QuantSpec("rtn", bits, 64, "in"), rank=rank, rotation=rot)
    m = CompressedLinear.from_decomposition(decompose(w, spec), dtype=dtype).to(device)
    kw = m.prepare_kernel_weight()
    assert kw.layout == "frag"
    r = kernels.rotation(rot, shape[1], device)
    L, R = (m.L, m.R) if rank else (None, None)
    cfg = _triton.Config(kind="frag", bn=64, warps=4, pf=2, split=split, **extra)
    merged = m.merged_weight().to(device).detach()
    x = (torch.randn(1, shape[1], device=device) * 2).to(dtype)
    assert kernels.plans_rotation(kw, 1, dtype, r, has_lr=bool(rank))
    assert not kernels.plans_rotation(kw, 3, dtype, r)
    own_launch = _rotate.TritonRotation.__call__
    with torch.no_grad():
        with monkeypatch.context() as mp:  # never the rotation's general call (x' allocated, launched alone)
            mp.setattr(_rotate.TritonRotation, "__call__",
                       lambda *a, **k: pytest.fail("rotated by the rotation's general call"))
            got = kernels.linear(x, kw, L, R, m.bias, config=cfg, rotation=r)
        assert _rotate.TritonRotation.__call__ is own_launch
        xr = r(x).float()  # the rotation launched first: x' rounded to x's dtype, as the planned launch stores it
        want = xr @ layout.reference_weight(kw).t() + ((xr @ R.float().t()) @ L.float().t() if rank else 0)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=float(want.abs().max()) * 4e-3)
        _check(got, x.float() @ merged.t(), 3e-2 if bits == 2 else 1e-2)
        if cfg.kwarps:  # LQKIT_ROT_LAUNCH=one: the warps splitting K keep the chained launches, the same result
            with monkeypatch.context() as mp:
                mp.setenv("LQKIT_ROT_LAUNCH", "one")
                assert _frag.rotates_inside(r, False) and kernels.plans_rotation(kw, 1, dtype, r)
                assert not _frag.rotates_inside(r, False, True)
                one = kernels.linear(x, kw, L, R, m.bias, config=cfg, rotation=r)
                step = float(want.abs().max()) * 2 ** -10  # the interpreter (numpy's products): one 16-bit step
                torch.testing.assert_close(one, got, rtol=0, atol=0 if device != "cpu" else step)
        if not runner:
            return
        run = m.prepare_runner()
        for t in (1, 3):  # the first call binds; the second one (t = 1) reuses the plan and its scratch
            for _ in range(2 if t == 1 else 1):
                x = torch.randn(t, shape[1], device=device).to(dtype)
                _check(run(x), x.float() @ merged.t())
    rotates_first = {k[0][0]: v[2] is not None for k, v in run.calls.items()}
    assert rotates_first == {1: False, 3: True}
    one = next(v[0] for k, v in run.calls.items() if k[0][0] == 1)
    assert one.general is None  # planned launches on x itself
    assert one.pre is not None  # chained: the rotation's launch, then the GEMV's


@pytest.mark.cuda
@pytest.mark.parametrize("n, k, block, split, warps, gpu_only", [
    (48, 1024, 1024, 3, 4, False), (48, 512, 256, 1, 4, False), (256, 1024, 1024, 3, 4, True),
    (256, 2048, 256, 2, 8, True)])
def test_rotation_inside_the_gemv_launch_matches_the_chained_launches(n, k, block, split, warps, gpu_only,
                                                                      monkeypatch):
    """LQKIT_ROT_LAUNCH=one: at one token, without a low-rank term, a rotated call of two-product blocks
    rotates x in the GEMV's own launch (its first programs write x' and count themselves in; the GEMV's
    programs wait for that count): one launch, recorded and bound as one; equal to the chained launches
    (the default) to x' rounding (the same products; under another warp count the tile's fp32 sums may
    run in another order), a 1024-block over 4 programs and 256-blocks over one each, with and without
    K-splits; the counters back at 0 after every call (a count left over would let the next call's GEMV
    read x' before it is written). On a GPU also several blocks of rows (the last reader among all of
    them resets the counts), 8 warps, and replays of a CUDA graph."""
    from lqkit import kernels

    device = _device()
    if gpu_only and device == "cpu":
        pytest.skip("the interpreter's fragment kernel is slow: checked on a GPU")
    from lqkit.core.rotation import Rotation
    from lqkit.kernels import _frag, _triton  # imports triton: after the skip where there is none

    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    spec = QuantSpec("rtn", 4, 128)
    q = qmod.quantize(torch.randn(n, k) * 0.02, spec)
    kw = kernels.prepare(q.packed, q.aux, qmod.kernel_spec(spec), (n, k), device)
    r = kernels.rotation(Rotation(3, block), k, device)
    cfg = _triton.Config(kind="frag", bn=16 * warps, warps=warps, pf=2, split=split)
    # inputs in turn on a GPU (a read of x' before it is written would show); one in the interpreter (programs
    # run one after another there: 3 launches of the fragment kernel take ~25 s)
    xs = [(torch.randn(1, k, device=device) * 2).to(dtype) for _ in range(1 if device == "cpu" else 2)]
    monkeypatch.delenv("LQKIT_ROT_LAUNCH", raising=False)
    assert not _frag.rotates_inside(r, False)
    wants = [kernels.linear(x, kw, rotation=r, config=cfg).float() for x in xs]
    monkeypatch.setenv("LQKIT_ROT_LAUNCH", "one")
    assert _frag.rotates_inside(r, False) and not _frag.rotates_inside(r, True)
    tol = float(wants[0].abs().max()) * 2e-3
    counters = kw.cache["counters"]
    bound, y0 = kernels.bind(xs[0], kw, rotation=r, config=cfg)
    assert bound.general is None and bound.pre is None and bound.x32 is not None  # one launch, reading x'
    nb = -(-n // (16 * warps))
    splits = _triton._split(kw, nb, cfg, kw.qweight.device, multiple=_frag.step_multiple(4, 128, cfg))[0]
    assert splits == split and bound.grid[0] == (k // block) * (r.r2 // r.cols) + nb * splits  # rotation's, GEMV's
    assert int(counters.abs().sum()) == 0
    torch.testing.assert_close(y0.float(), wants[0], rtol=0, atol=tol)
    for i in range(1 if device == "cpu" else 200):
        torch.testing.assert_close(bound(xs[i % len(xs)]).float(), wants[i % len(xs)], rtol=0, atol=tol)
        assert int(counters.abs().sum()) == 0
    if device == "cpu":
        return
    xin, out = xs[0].clone(), {}
    g = _triton._graph([lambda: out.update(y=bound(xin))])  # out["y"]: the captured call's output
    for i in range(100):
        xin.copy_(xs[i % 2])
        g.replay()
        torch.testing.assert_close(out["y"].float(), wants[i % 2], rtol=0, atol=tol)
    assert int(counters.abs().sum()) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("rank", [0, 16])
def test_programmatic_dependent_launch_matches_plain_launches(rank, monkeypatch):
    """On a Hopper GPU (the default; LQKIT_PDL=0 turns it off): the rotation lets the GEMV start at
    once, the GEMV prefetches its first words and waits for x' (griddepcontrol). Equal to the same
    call with plain launches, through ``linear`` and through the bound chained call, over several calls
    (a read of x' before the wait would show as a wrong or varying result); and the GEMV's compiled
    kernel is a programmatic dependent launch."""
    from lqkit import kernels

    if _device() == "cpu" or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launches need a Hopper or later GPU")
    from lqkit.core.rotation import Rotation
    from lqkit.kernels import _frag

    shape = (4096, 4096)
    q = qmod.quantize(torch.randn(shape) * 0.02, QuantSpec("rtn", 4, 128))
    kw = kernels.prepare(q.packed, q.aux, qmod.kernel_spec(QuantSpec("rtn", 4, 128)), shape, "cuda")
    L = torch.randn(shape[0], rank, device="cuda", dtype=torch.bfloat16) * 0.02 if rank else None
    R = torch.randn(rank, shape[1], device="cuda", dtype=torch.bfloat16) * 0.02 if rank else None
    r = kernels.rotation(Rotation(3, 4096), shape[1], "cuda")
    xs = [torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    monkeypatch.setenv("LQKIT_PDL", "0")
    want = [kernels.linear(x, kw, L, R, rotation=r).float() for x in xs]
    monkeypatch.delenv("LQKIT_PDL")
    assert _frag.pdl_ok(torch.device("cuda"))  # the default
    bound, y0 = kernels.bind(xs[0], kw, L, R, rotation=r)
    assert bound.pre is not None and bound.opts[3]  # the GEMV's launch is a programmatic dependent one
    for x, w in zip(xs, want):  # the same kernels: equal up to summation order at most
        tol = float(w.abs().max()) * 1e-3
        torch.testing.assert_close(kernels.linear(x, kw, L, R, rotation=r).float(), w, rtol=0, atol=tol)
        for _ in range(3):
            torch.testing.assert_close(bound(x).float(), w, rtol=0, atol=tol)
    torch.testing.assert_close(y0.float(), want[0], rtol=0, atol=float(want[0].abs().max()) * 1e-3)
