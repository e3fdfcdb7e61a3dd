"""The input rotation of a rotated layer (:mod:`lqkit.core.rotation`) as one Triton launch.

x' = R·x with R = blockdiag((1/√b)·H_b·diag(s)). A program rotates one block of b elements: for
b = r1·r2 ≥ 256 the block is an (r1, r2) tile X and X' = H_r1·(S⊙X)·H_r2 / √b (H_b = H_r1 ⊗ H_r2,
the core transform's two stages), both products on the tensor cores: the first exact (±1 times 16-bit
values, fp32 sums), the second on the fp32 result as three TF32 products ("tf32x3": about fp32's
accuracy; the output is rounded to 16 bits after). For 16 ≤ b ≤ 128 a program rotates one block of 16
tokens with one product by H_b. The core transform takes everything else (fp32 inputs, b < 16 or
b > 4096, 2³¹ elements or more): it is the reference, and the path of the CPU. Replaces that transform's four or five
launches (signs, one matmul per stage, the cast) in a prepared layer's call.

At one token the fragment GEMV (:mod:`._frag`) rotates inside its own launch instead
(:func:`rot_range`): each program computes the tiles of x' that its k range reads and stores them
into a scratch row, which every program that covers those k's writes with the same values.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..core.rotation import Rotation, hadamard, signs, transform
from ..errors import SpecError

TOKENS = 16  # tokens per program of the one-stage kernel (a tensor-core tile's rows)
# experiment (GPU only: triton's interpreter misreads bf16): the GEMV's second rotation product in two
# bf16 products instead of tf32x3
SECOND_BF16X2 = tl.constexpr(os.environ.get("LQKIT_ROT_SECOND") == "bf16x2")


@triton.jit
def _rotate_two(x_ptr, s_ptr, h1_ptr, h2_ptr, y_ptr, stride_x, stride_y, scale,
                R1: tl.constexpr, R2: tl.constexpr):
    """Token program_id(0), block program_id(1): X' = H1·(S⊙X)·H2·scale for X the (R1, R2) tile."""
    m = tl.program_id(0)
    i = tl.arange(0, R1)
    j = tl.arange(0, R2)
    off = tl.program_id(1) * (R1 * R2) + i[:, None] * R2 + j[None, :]
    x = tl.load(x_ptr + m * stride_x + off)
    xs = x * tl.load(s_ptr + off)  # ±1: exact in x's dtype
    h2 = tl.load(h2_ptr + j[:, None] * R2 + j[None, :])  # x's dtype, ±1
    y = tl.dot(xs, h2)  # (R1, R2) fp32, exact products
    h1 = tl.load(h1_ptr + i[:, None] * R1 + i[None, :])  # fp32, ±1
    z = tl.dot(h1, y, input_precision="tf32x3")  # fp32 accuracy from three TF32 products
    tl.store(y_ptr + m * stride_y + off, (z * scale).to(y_ptr.dtype.element_ty))


@triton.jit
def _rotate_one(x_ptr, s_ptr, h_ptr, y_ptr, M, stride_x, stride_y, scale, B: tl.constexpr, BM: tl.constexpr):
    """Tokens [program_id(0)·BM, +BM), block program_id(1): x' = (s⊙x)·H_B·scale."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.arange(0, B)
    off = tl.program_id(1) * B + c
    mask = rows[:, None] < M
    x = tl.load(x_ptr + rows[:, None] * stride_x + off[None, :], mask=mask, other=0.0)
    xs = x * tl.load(s_ptr + off)[None, :]
    z = tl.dot(xs, tl.load(h_ptr + c[:, None] * B + c[None, :]))
    tl.store(y_ptr + rows[:, None] * stride_y + off[None, :], (z * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rot_tile(x_ptr, s_ptr, h1_ptr, h2_ptr, xr_ptr, t, K, scale, R1: tl.constexpr, R2: tl.constexpr):
    """Tile t of x' = R·x for one token: the 16·R2 elements from k = 16·R2·t as 16 rows of R2, stored
    into xr. R1 == 1 (blocks b = R2 ≤ 128): the rows are 16 blocks, x' = (s⊙x)·H_b, one product
    (h2_ptr: H_b in x's dtype). R1 > 1 (b = R1·R2): the rows are rows i0 … i0 + 15 of one block's
    (R1, R2) tile X, X'[rows] = (H_R1[rows, :]·(S⊙X))·H_R2, the first product exact on the tensor cores
    (h1_ptr: H_R1 in x's dtype), the second in tf32x3 (h2_ptr: H_R2 in fp32), as :func:`_rotate_two`."""
    TS: tl.constexpr = 16 * R2
    r = tl.arange(0, 16)
    j = tl.arange(0, R2)
    k = t * TS + r[:, None] * R2 + j[None, :]
    if R1 == 1:
        ok = k < K
        xs = tl.load(x_ptr + k, mask=ok, other=0.0) * tl.load(s_ptr + k, mask=ok, other=0.0)
        z = tl.dot(xs, tl.load(h2_ptr + j[:, None] * R2 + j[None, :]))
        tl.store(xr_ptr + k, (z * scale).to(xr_ptr.dtype.element_ty), mask=ok)
    else:
        B: tl.constexpr = R1 * R2
        base = ((t * TS) // B) * B
        i0 = ((t * TS) % B) // R2
        a = tl.arange(0, R1)
        kx = base + a[:, None] * R2 + j[None, :]
        xs = tl.load(x_ptr + kx) * tl.load(s_ptr + kx)  # (R1, R2), ±1: exact
        h1 = tl.load(h1_ptr + (i0 + r)[:, None] * R1 + a[None, :])  # (16, R1) of H_R1, x's dtype
        u = tl.dot(h1, xs)  # (16, R2) fp32, exact products
        h2 = tl.load(h2_ptr + j[:, None] * R2 + j[None, :])
        if SECOND_BF16X2:  # u as bf16 high + low parts (16 bits of mantissa), two exact bf16 products
            hi = u.to(tl.bfloat16)
            lo = (u - hi.to(tl.float32)).to(tl.bfloat16)
            h2b = h2.to(tl.bfloat16)
            z = tl.dot(hi, h2b) + tl.dot(lo, h2b)
        else:
            z = tl.dot(u, h2, input_precision="tf32x3")
        tl.store(xr_ptr + k, (z * scale).to(xr_ptr.dtype.element_ty))


@triton.jit
def rot_range(x_ptr, s_ptr, h1_ptr, h2_ptr, xr_ptr, k_lo, k_hi, K, scale, R1: tl.constexpr, R2: tl.constexpr):
    """x'[k] = (R·x)[k] for one token, for every k in the tiles (of :func:`_rot_tile`) that meet
    [k_lo, k_hi), stored into xr; nothing for an empty range. The tiles are the same whoever computes
    them, so programs whose ranges share a tile store the same values."""
    TS: tl.constexpr = 16 * R2
    for t in range(k_lo // TS, (k_hi + TS - 1) // TS):
        _rot_tile(x_ptr, s_ptr, h1_ptr, h2_ptr, xr_ptr, t, K, scale, R1, R2)


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
        # for the GEMV's own rotation (rot_range): H_r1 in x's dtype, H_r2 in fp32 (r1 > 1)
        self.h1_16 = {dt: hadamard(self.r1).to(dev, dt) for dt in self.DTYPES} if self.r1 > 1 else None
        self.h2_32 = hadamard(self.r2).to(dev, torch.float32) if self.r1 > 1 else None

    def fused_operands(self, dtype: torch.dtype) -> tuple:
        """(signs, first factor, second factor, scale, r1, r2) for :func:`rot_range` on inputs of
        ``dtype`` (bf16 / fp16)."""
        if self.r1 == 1:
            return self.s[dtype], self.s[dtype], self.h2[dtype], self.scale, 1, self.r2
        return self.s[dtype], self.h1_16[dtype], self.h2_32, self.scale, self.r1, self.r2

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
        nb = self.n // self.block
        if self.r1 == 1:
            _rotate_one[(triton.cdiv(m, TOKENS), nb)](x2, s, self.h2[x.dtype], y, m, x2.stride(0), y.stride(0),
                                                       self.scale, B=self.r2, BM=TOKENS, num_warps=4)
        else:
            _rotate_two[(m, nb)](x2, s, self.h1, self.h2[x.dtype], y, x2.stride(0), y.stride(0),
                                 self.scale, R1=self.r1, R2=self.r2, num_warps=4)
        return y.view(x.shape)
