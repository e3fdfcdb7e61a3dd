"""The input rotation of a rotated layer (:mod:`lqkit.core.rotation`) as one Triton launch.

x' = R·x with R = blockdiag((1/√b)·H_b·diag(s)). For b = r1·r2 ≥ 256 the block is an (r1, r2) tile X
and X' = H_r1·(S⊙X)·H_r2 / √b (H_b = H_r1 ⊗ H_r2, the core transform's two stages): a program per
block, or per 16 or 32 columns of X' where a token has fewer than 4 blocks (each reads all of X); both
products on the tensor cores, the first exact (±1 times 16-bit values, fp32 sums), the second on the
fp32 result as three TF32 products ("tf32x3": about fp32's accuracy; the output is rounded to 16 bits
after). For 16 ≤ b ≤ 128 a program rotates one block of 16 tokens with one product by H_b. The core
transform takes everything else (fp32 inputs, b < 16 or b > 4096, 2³¹ elements or more): it is the
reference, and the path of the CPU. Replaces that transform's four or five launches (signs, one
matmul per stage, the cast) in a prepared layer's call.

A prepared one-token call of the fragment GEMV (:mod:`._frag`) plans this launch with its own
(:meth:`TritonRotation.launch` into its scratch x'); with ``trigger`` the GEMV may start as a
programmatic dependent launch while this one runs. Opted in (``LQKIT_ROT_LAUNCH=one``, measured slower
on an H100), the GEMV's launch runs :func:`_tile_two` in its own first programs instead.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..core.rotation import Rotation, hadamard, signs, transform
from ..errors import SpecError

try:  # griddepcontrol (programmatic dependent launch, Hopper on): triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: no programmatic dependent launch (_frag.pdl_ok false)
    gdc_launch_dependents = gdc_wait = None

TOKENS = 16  # tokens per program of the one-stage kernel (a tensor-core tile's rows)
# a token's blocks of the two-stage kernel spread over at least this many programs where they are
# fewer, each block's (r1, r2) tile split by columns (at least 16 a program). On an H100 at one token
# with a programmatic dependent launch: 14336×4096 (one block of 4096) +2.9 µs with one program, +2.2 µs
# with 4 (means of 3 and 7 runs); 4096×14336 (7 blocks of 2048) +1.1 µs with a program per block, +1.6
# µs with 4 per block (means of 3 and 7): rotation-pdl-variants-h100.json; 14336×4096 in two blocks of 2048
# (the default block since core.rotation.MAX_BLOCK): +1.47 µs with 2 programs a block (mean of 5 runs,
# rotation-block-h100-*.json, +1.18 to +1.69), +1.56 µs with one (one run, rotation-block-programs2-h100.json):
# no evidence either way
PROGRAMS = 4


@triton.jit
def _tile_two(x_ptr, s_ptr, h1_ptr, h2_ptr, y_ptr, blk, part, scale, R1: tl.constexpr, R2: tl.constexpr,
              BC: tl.constexpr):
    """One token's block ``blk``, columns [part·BC, +BC) of its (R1, R2) tile X (x_ptr, y_ptr: the
    token's rows): X'[:, cols] = H1·(S⊙X)·H2[:, cols]·scale, reading the whole tile."""
    i = tl.arange(0, R1)
    j = tl.arange(0, R2)
    c = part * BC + tl.arange(0, BC)
    off = blk * (R1 * R2) + i[:, None] * R2 + j[None, :]
    x = tl.load(x_ptr + off)
    xs = x * tl.load(s_ptr + off)  # ±1: exact in x's dtype
    h2 = tl.load(h2_ptr + j[:, None] * R2 + c[None, :])  # x's dtype, ±1
    y = tl.dot(xs, h2)  # (R1, BC) fp32, exact products
    h1 = tl.load(h1_ptr + i[:, None] * R1 + i[None, :])  # fp32, ±1
    z = tl.dot(h1, y, input_precision="tf32x3")  # fp32 accuracy from three TF32 products
    out = blk * (R1 * R2) + i[:, None] * R2 + c[None, :]
    tl.store(y_ptr + out, (z * scale).to(y_ptr.dtype.element_ty))


@triton.jit
def _rotate_two(x_ptr, s_ptr, h1_ptr, h2_ptr, y_ptr, stride_x, stride_y, scale,
                R1: tl.constexpr, R2: tl.constexpr, BC: tl.constexpr, TRIGGER: tl.constexpr = False):
    """Token program_id(0), block program_id(1), columns [program_id(2)·BC, +BC) of the (R1, R2)
    tile X (:func:`_tile_two`: the block's work is spread over R2 / BC programs). TRIGGER: let the
    next launch (a programmatic dependent launch) start now; it waits for this one's results itself
    (griddepcontrol.wait)."""
    if TRIGGER:
        gdc_launch_dependents()
    m = tl.program_id(0)
    _tile_two(x_ptr + m * stride_x, s_ptr, h1_ptr, h2_ptr, y_ptr + m * stride_y, tl.program_id(1),
              tl.program_id(2), scale, R1, R2, BC)


@triton.jit
def _rotate_one(x_ptr, s_ptr, h_ptr, y_ptr, M, stride_x, stride_y, scale, B: tl.constexpr, BM: tl.constexpr,
                TRIGGER: tl.constexpr = False):
    """Tokens [program_id(0)·BM, +BM), block program_id(1): x' = (s⊙x)·H_B·scale (TRIGGER: as
    :func:`_rotate_two`)."""
    if TRIGGER:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.arange(0, B)
    off = tl.program_id(1) * B + c
    mask = rows[:, None] < M
    x = tl.load(x_ptr + rows[:, None] * stride_x + off[None, :], mask=mask, other=0.0)
    xs = x * tl.load(s_ptr + off)[None, :]
    z = tl.dot(xs, tl.load(h_ptr + c[:, None] * B + c[None, :]))
    tl.store(y_ptr + rows[:, None] * stride_y + off[None, :], (z * scale).to(y_ptr.dtype.element_ty), mask=mask)


def stages(block: int) -> tuple[int, int] | None:
    """(r1, r2) of the launch for blocks of ``block``: (1, b) for one product, or None where the core
    transform runs (b < 16 or b > 4096)."""
    if block < 16 or block > 4096:
        return None
    if block <= 128:
        return 1, block
    r2 = min(64, block // 16)
    return block // r2, r2


class TritonRotation:
    """R·x for x (..., n) in bf16 or fp16 on a CUDA device (or triton's interpreter) in one launch;
    other inputs through the core transform. Tensors built once: the signs in both 16-bit dtypes and
    the Hadamard factors."""

    DTYPES = (torch.bfloat16, torch.float16)

    def __init__(self, rot: Rotation, n: int, device: torch.device | str):
        rot.check(n)
        rs = stages(rot.block)
        if rs is None:
            raise SpecError(f"the one-launch rotation takes blocks of 16 to 4096, not {rot.block}; use "
                            "lqkit.kernels.rotation, which falls back to the core transform")
        dev = torch.device(device)
        self.n, self.block = n, rot.block
        self.key = (rot, n, dev)  # equal for every instance of the same rotation (kernels' plans key on it)
        self.fallback = transform(rot, n, dev)
        self.r1, self.r2 = rs
        self.scale = 1.0 / math.sqrt(rot.block)
        s = signs(rot, n)
        self.s = {dt: s.to(dev, dt) for dt in self.DTYPES}
        self.h2 = {dt: hadamard(self.r2).to(dev, dt) for dt in self.DTYPES}
        self.h1 = hadamard(self.r1).to(dev, torch.float32) if self.r1 > 1 else None
        nb = n // rot.block
        parts = min(self.r2 // 16, 1 << max(0, math.ceil(math.log2(PROGRAMS / nb)))) if self.r1 > 1 else 1
        self.cols = self.r2 // parts  # columns of a tile per program (two-stage kernel)

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        s = self.s.get(x.dtype)
        if inverse or s is None or x.shape[-1] != self.n or x.device != s.device or x.numel() >= 2**31:
            return self.fallback(x, inverse)  # (offsets in the kernel are 32-bit)
        x2 = x.reshape(-1, self.n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        y = torch.empty((m, self.n), dtype=x.dtype, device=x.device)
        if m == 0:
            return y.view(x.shape)
        self.launch(x2, y)
        return y.view(x.shape)

    def launch(self, x: torch.Tensor, y: torch.Tensor, plan: dict | None = None, trigger: bool = False) -> None:
        """y (m, n) = R·x for x (m, n) of a dtype in :attr:`DTYPES` on the rotation's device, rows
        contiguous: the one launch, through the kernels' launcher (with ``plan``, a dict kept by the
        caller, the compiled kernel is kept and later calls skip triton's argument binding).
        ``trigger``: the next launch, made a programmatic dependent one, may start at once."""
        from ._triton import _launch

        m = x.shape[0]
        nb = self.n // self.block
        if self.r1 == 1:
            grid = (triton.cdiv(m, TOKENS), nb)
            args = (x, self.s[x.dtype], self.h2[x.dtype], y, m, x.stride(0), y.stride(0), self.scale,
                    self.r2, TOKENS, trigger)
            _launch(_rotate_one, plan, grid, args, 4, 1)
        else:
            args = (x, self.s[x.dtype], self.h1, self.h2[x.dtype], y, x.stride(0), y.stride(0), self.scale,
                    self.r1, self.r2, self.cols, trigger)
            _launch(_rotate_two, plan, (m, nb, self.r2 // self.cols), args, 4, 1)


KERNELS = (_rotate_one, _rotate_two)  # a bound chained call starts with one of these (x its first argument)
