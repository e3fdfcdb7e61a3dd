"""Fused GPU kernels (lqkit.kernels): layout on CPU, kernel results against the pure-torch path.

Kernel checks run on CUDA (marked ``cuda``, skipped without a GPU and triton). They also run on the
CPU through triton's interpreter when ``LQKIT_TRITON_INTERPRET=1`` is set (slow; for development).
"""

from __future__ import annotations

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
]
SHAPES = [(96, 4096 + 64), (1000, 333), (130, 1536), (257, 200)]  # (out, in): odd sizes, tails


def _spec(f) -> QuantSpec:
    method, bits, gd, gs, dq = f
    return QuantSpec(method=method, bits=bits, group_size=gs, group_dim=gd, double_quant=dq)


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
    kw = layout.prepare_weight(q.packed, q.aux, spec, shape)
    torch.testing.assert_close(layout.reference_weight(kw), qmod.dequantize(q), rtol=0, atol=1e-6)
    assert kw.qweight.shape[0] % layout.N_PAD == 0
    assert kw.k_pad % layout.k_tile(spec.bits) == 0


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


def _case(f, shape, rank, bias, device, dtype):
    spec = _spec(f)
    w = torch.randn(shape, device=device)
    q = qmod.quantize(w, spec)
    from lqkit import kernels

    kw = kernels.prepare(q.packed, q.aux, spec, shape, device)
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


@pytest.mark.cuda
@pytest.mark.parametrize("i,f", list(enumerate(FORMATS)), ids=[_fid(f) for f in FORMATS])
def test_kernels_match_torch(i, f):
    device = _device()  # skips before importing triton when there is no CUDA + triton
    from lqkit import kernels
    from lqkit.kernels import _triton as kt

    dtype = torch.float32 if device == "cpu" else (torch.bfloat16, torch.float16)[i % 2]
    shape = SHAPES[i % len(SHAPES)]
    rank, bias = (0, 5, 16)[i % 3], i % 2 == 0
    kw, W, L, R, b = _case(f, shape, rank, bias, device, dtype)
    configs = [(None, 1), (None, 3), (None, 17),  # default dispatch
               (kt.Config(kind="gemv", bn=32, occ=8.0), 3),  # split-K with several tokens
               (kt.Config(kind="gemv", bn=64, occ=1.0), 1),  # 64-row blocks, few K-splits
               (kt.Config(kind="gemm", bm=16, bn=64, occ=8.0), 17),
               (kt.Config(kind="dequant"), 40)]  # many tokens: decode once, then cuBLAS
    if kt.mma_ok(kw, dtype):  # tensor-core kernel: split-K or not, several blocks of tokens
        configs += [(kt.Config(kind="mma", bn=64, occ=8.0), 5), (kt.Config(kind="mma", bn=128, occ=1.0), 16),
                    (kt.Config(kind="mma", bn=32, warps=4, stages=3, occ=4.0), 19)]
    for cfg, m in configs:
        for _ in range(2):  # twice: the self-resetting counters must leave the next call correct
            x = torch.randn(m, shape[1], device=device).to(dtype)  # fresh inputs every check
            out = torch.full((m, shape[0]), float("nan"), device=device, dtype=dtype)  # poison
            y = kernels.linear(x, kw, L, R, b, config=cfg, out=out)
            _check(y, _ref(x, W, L, R, b), 1e-2 if dtype != torch.float32 else 1e-4)


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


def test_dispatch_auto_needs_no_grad(monkeypatch):
    """auto takes the kernels only when usable and no gradient is needed (they have no backward)."""
    from lqkit import kernels

    m = _module()
    monkeypatch.setattr(kernels, "available", lambda: True)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    x = torch.randn(2, 320).as_subclass(FakeCuda)
    assert m.resolve_backend(x) == "torch"  # L, R require grad and grad mode is on
    with torch.no_grad():
        assert m.resolve_backend(x) == "triton"


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
