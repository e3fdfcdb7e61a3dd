"""Triton kernels: fused dequantize + matmul over the interleaved layout of :mod:`.layout`.

Imported lazily (it imports triton). Two kernels share the decoding helpers:

- ``_gemv_kernel`` (few tokens): one program = a block of BN output rows × one K-split × one token.
  It streams (BN × 32)-word tiles; slice j of a tile is ``(w >> j·b) & mask``, a (BN × 32) block of
  codes for 32 consecutive k, turned into floats by the exponent trick
  ``bits(1.0) | code << (23 − b)`` = 1 + code·2⁻ᵇ (no int→float conversion), multiplied by x and
  summed in fp32. Group scales are applied once per ``P`` slices (group_dim "in") or folded into x
  (group_dim "out"); the offsets' contribution Σ_g b_g·Σ_{k∈g} x_k is added after the loop.
  K-splits write fp32 partials; the last program to finish a block (an atomic counter per block)
  sums them and runs the epilogue: bias, and the low-rank path L·(R·x). R·x is computed in the
  same launch by the first programs of the grid, whose results the epilogues wait for (this relies
  on blocks being dispatched in launch order, as NVIDIA GPUs do); counters reset themselves, so a
  call is one launch and CUDA-graph safe. Calls that share a prepared weight must run on one stream.
- ``_mma_kernel`` (2–16 tokens, affine formats with groups along ``in``): the tensor-core path. One
  shift and one ``lop3`` of a word decode a *pair* of codes (its two 16-bit halves, see
  :func:`.layout.slot`) straight into two fp16/bf16 values v = 1 + code·2⁻ᵇ (exact); ``tl.dot``
  multiplies them with the tokens (padded to 16) in fp32, the group scale is applied to the dot
  products once per group and half-word, and the offsets enter as Σ_g b[n, g]·xs[m, g], with the
  group sums xs of x computed by the first programs of the same launch (as R·x is).
- ``_dequant_kernel`` (many tokens): decode W to the activation dtype once, then cuBLAS.
- ``_gemm_kernel`` (many tokens): (BM × BN) output tiles, the (32 × BN) slice of codes dequantized
  to the activation dtype and fed to ``tl.dot``; optional split-K with the same last-arriver
  reduction; the low-rank path as one more ``tl.dot`` in the epilogue on t = x·Rᵀ.

Every affine format decodes as w = a·v + b with v = 1 + code·2⁻ᵇ: rtn a = s·2ᵇ, b = o − a;
rtn_sym a = s·2ᵇ, b = −a − 2ᵇ⁻¹·s; nf v = table[code], a = absmax, b = 0.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import _frag, _rotate
from ._jit import _rx_partial, _wait
from .layout import LANES, KernelWeight, SparseFix, half_codes, k_tile

GB = tl.constexpr(16)  # 32-wide chunks per step of the offset loop
KC = 512  # k's per program of the R·x work (one load each)
N_COUNTERS = 3  # (unused), finished R·x programs, finished programs; then one per output block


# ----------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _decode(w, j: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr, lut, ASM: tl.constexpr = False,
            AX: tl.constexpr = 1):
    """Slice j of a tile of words -> fp32 values v (1 + code·2⁻ᵇ, or table[code] for nf/nuq, where
    ``lut`` is the block's tables in registers from _tables, indexed along axis AX)."""
    D: tl.constexpr = 32 // BITS - 2 * (16 // BITS)  # 0: the codes split evenly between the halves
    HW: tl.constexpr = (1 - D) * (16 // BITS) + D * (32 // BITS)  # layout.half_codes
    POS: tl.constexpr = 16 * (j // HW) + BITS * (j % HW)  # layout.slot(b, j)
    if MODE == 2:
        v = tl.gather(lut, (w >> POS) & ((1 << BITS) - 1), AX)
    else:  # one shift puts the code at mantissa bits [23 - b, 23), one and-or adds the exponent of 1.0
        SH: tl.constexpr = POS - (23 - BITS)
        if SH >= 0:
            t = w >> SH
        else:
            t = w << (-SH)
        MASK: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
        if ASM:  # (t & MASK) | bits(1.0) as a single lop3 (ptxas splits it in two otherwise)
            bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                             [t, tl.full(t.shape, MASK, tl.int32),
                                              tl.full(t.shape, 0x3F800000, tl.int32)],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            bits = (t & MASK) | 0x3F800000
        v = bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _tables(lut_ptr, idx, BITS: tl.constexpr, LS: tl.constexpr, AX: tl.constexpr):
    """The tables of the rows (or columns) idx, loaded into registers: (len(idx), 2ᵇ) for AX 1, (2ᵇ,
    len(idx)) for AX 0. Table i starts at lut_ptr + i·LS (nuq: a table per output row, or per input
    column; nf: LS 0, one shared table). The kernels load the rows' tables once per block and the
    columns' tables once per 32-column slice. A gather from registers per code ran 1.8–2.2× faster
    than a load per code from the tables in memory (bench/KERNELS.md)."""
    e = tl.arange(0, 1 << BITS)
    if AX == 1:
        return tl.load(lut_ptr + idx[:, None] * LS + e[None, :])
    else:
        return tl.load(lut_ptr + idx[None, :] * LS + e[:, None])


@triton.jit
def _affine(sv, o_ptr, oidx, MODE: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr):
    """Raw stored scale -> (a, b) with w = a·v + b."""
    if MODE == 2:
        a = sv
        b = sv * 0.0
    elif MODE == 1:
        a = sv * VS
        b = -a - HALF * sv
    else:
        a = sv * VS
        b = tl.load(o_ptr + oidx).to(tl.float32) - a
    return a, b


@triton.jit
def _t_work(tid, x_ptr, r_ptr, tp_ptr, cnt_ptr, M, K, RANK, stride_xm,
            RP: tl.constexpr, KC_: tl.constexpr):
    """Partial t[m, :] = R[:, chunk]·x[m, chunk] for one (chunk, token); then count it done."""
    _rx_partial(tid, x_ptr, r_ptr, tp_ptr, M, K, RANK, stride_xm, RP, KC_)
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr + 1, 1)


@triton.jit
def _lr_t(m, tp_ptr, cnt_ptr, M, NTC, RP: tl.constexpr):
    """Wait until every R·x program has finished, then t[m, :] = Σ of their partials."""
    need = NTC * M
    done = tl.atomic_add(cnt_ptr + 1, 0)
    while done < need:  # the R·x programs come first in launch order: they are running or done
        done = tl.atomic_add(cnt_ptr + 1, 0)
    r_off = tl.arange(0, RP)
    c_off = tl.arange(0, 16)
    tv = tl.zeros([RP], dtype=tl.float32)
    for c0 in range(0, NTC, 16):  # 16 partials per round trip
        c = c0 + c_off
        tv += tl.sum(tl.load(tp_ptr + (c[:, None] * M + m) * RP + r_off[None, :], mask=(c < NTC)[:, None],
                             other=0.0, cache_modifier=".cg"), axis=0)
    return tv


@triton.jit
def _gemv_finish(acc, m, n_off, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, cnt_ptr, M, NTC, RANK, stride_ym,
                 RP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_off, mask=nmask, other=0.0).to(tl.float32)
    if HAS_LR:
        r_off = tl.arange(0, RP)
        lv = tl.load(l_ptr + n_off[:, None] * RANK + r_off[None, :],
                     mask=nmask[:, None] & (r_off[None, :] < RANK), other=0.0).to(tl.float32)
        tv = _lr_t(m, tp_ptr, cnt_ptr, M, NTC, RP)
        acc += tl.sum(lv * tv[None, :], axis=1)
    tl.store(y_ptr + m * stride_ym + n_off, acc.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _split_sum(ws_ptr, row0, row_stride, cols, cmask, SPLIT, BC: tl.constexpr):
    """Σ_s ws[row0 + s·row_stride + cols] over s < SPLIT, 8 partials per round trip (L2 reads)."""
    s_off = tl.arange(0, 8)
    tot = tl.zeros([BC], dtype=tl.float32)
    for s0 in range(0, SPLIT, 8):
        sp = s0 + s_off
        tot += tl.sum(tl.load(ws_ptr + row0 + sp[:, None] * row_stride + cols[None, :],
                              mask=(sp < SPLIT)[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg"),
                      axis=0)
    return tot


@triton.jit
def _gemv_work(wid, x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, ws_ptr, tp_ptr, cnt_ptr,
               M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm, stride_ym,
               BITS: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr, GROUP_N: tl.constexpr,
               FAST: tl.constexpr, G: tl.constexpr, P: tl.constexpr, VS: tl.constexpr,
               HALF: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_LR: tl.constexpr, SPLITK: tl.constexpr, ASM: tl.constexpr, PF: tl.constexpr,
               LS: tl.constexpr):
    KT: tl.constexpr = S * 32
    NB = tl.cdiv(N, BN)
    nb = wid % NB
    rest = wid // NB
    ks = rest % SPLIT
    m = rest // SPLIT
    n_off = nb * BN + tl.arange(0, BN)  # (BN,)
    i_off = tl.arange(0, 32)  # (32,)
    x_row = x_ptr + m * stride_xm
    q_ptrs = q_ptr + n_off[:, None] * KW + i_off[None, :]  # (BN, 32)
    if MODE == 2 and LS >= 0:  # nf/nuq: the block's tables in registers (LS < 0: per column, below)
        tables = _tables(lut_ptr, n_off, BITS, LS, 1)
    else:
        tables = lut_ptr
    t0 = ks * TPS
    t1 = tl.minimum(t0 + TPS, NTILES)
    acc = tl.zeros([BN, 32], dtype=tl.float32)
    acc1 = tl.zeros([BN], dtype=tl.float32)  # group_dim "in": Σ_g b[n, g]·Σ_{k∈g} x_k
    accx = tl.zeros([32], dtype=tl.float32)  # group_dim "out": Σ x·b per lane
    gn = (nb * BN) // G  # group_dim "out", FAST: the block's group of rows
    w = tl.load(q_ptrs + t0 * 32)  # (BN, 32) int32, first tile
    if PF == 2:
        w1 = tl.load(q_ptrs + (t0 + 1) * 32, mask=t0 + 1 < t1, other=0)
    for t in range(t0, t1):
        if PF == 2:  # two tiles in flight: the next but one is requested now
            w_next = w1
            w1 = tl.load(q_ptrs + (t + 2) * 32, mask=t + 2 < t1, other=0)
        else:
            w_next = tl.load(q_ptrs + (t + 1) * 32, mask=t + 1 < t1, other=0)  # prefetch the next tile
        kb = t * KT
        for j in tl.static_range(S):
            k = kb + j * 32 + i_off
            if MODE == 2 and LS < 0:  # nuq, a table per input column: this slice's 32 columns
                v = _decode(w, j, BITS, MODE, _tables(lut_ptr, k, BITS, -LS, 0), ASM, 0)  # (BN, 32)
            else:
                v = _decode(w, j, BITS, MODE, tables, ASM, 1)  # (BN, 32)
            xj = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)  # (32,)
            if FAST:
                if GROUP_N:  # scale varies along k only: fold it into x
                    sidx = gn * SROW + k
                    sv = tl.load(s_ptr + sidx).to(tl.float32)
                    a, b = _affine(sv, o_ptr, sidx, MODE, VS, HALF)
                    acc += v * (xj * a)[None, :]
                    if MODE != 2:
                        accx += xj * b
                else:  # scale varies along n only: apply once per P slices (one group)
                    if j % P == 0:
                        p = v * xj[None, :]
                        px = xj
                    else:
                        p += v * xj[None, :]
                        px += xj
                    if (j + 1) % P == 0:
                        sidx = n_off * SROW + (kb + j * 32) // G
                        sv = tl.load(s_ptr + sidx).to(tl.float32)
                        if MODE == 2:
                            acc += sv[:, None] * p
                        else:
                            a = sv * VS
                            acc += a[:, None] * p
                            if MODE == 0:
                                b = tl.load(o_ptr + sidx).to(tl.float32) - a
                            else:
                                b = -sv * (VS + HALF)
                            acc1 += b * tl.sum(px, axis=0)
            else:  # any group size: per-element scales
                if GROUP_N:
                    sidx = (n_off[:, None] // G) * SROW + k[None, :]
                else:
                    sidx = n_off[:, None] * SROW + k[None, :] // G
                sv = tl.load(s_ptr + sidx).to(tl.float32)
                a, b = _affine(sv, o_ptr, sidx, MODE, VS, HALF)
                acc += (v * a + b) * xj[None, :]
        w = w_next
    res = tl.sum(acc, axis=1) + acc1  # (BN,)
    if FAST and GROUP_N and MODE != 2:
        res += tl.sum(accx, axis=0)
    nmask = n_off < N
    if SPLITK:
        tl.store(ws_ptr + (ks * M + m) * N + n_off, res, mask=nmask)
        tl.debug_barrier()
        cidx = cnt_ptr + 3 + m * NB + nb
        if tl.atomic_add(cidx, 1) == SPLIT - 1:  # last split of this block: reduce and finish
            tot = _split_sum(ws_ptr, m * N, M * N, n_off, nmask, SPLIT, BN)
            _gemv_finish(tot, m, n_off, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, cnt_ptr, M, NTC, RANK,
                         stride_ym, RP, HAS_BIAS, HAS_LR)
            tl.store(cidx, 0)
    else:
        _gemv_finish(res, m, n_off, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, cnt_ptr, M, NTC, RANK,
                     stride_ym, RP, HAS_BIAS, HAS_LR)


@triton.jit(do_not_specialize=["M", "N", "SROW", "NTILES", "TPS", "SPLIT", "NTC", "RANK", "stride_ym"])
def _gemv_kernel(x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, r_ptr, ws_ptr, tp_ptr, cnt_ptr,
                 M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm, stride_ym,
                 BITS: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr, GROUP_N: tl.constexpr,
                 FAST: tl.constexpr, G: tl.constexpr, P: tl.constexpr, VS: tl.constexpr,
                 HALF: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, KC_: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, SPLITK: tl.constexpr, ASM: tl.constexpr,
                 PF: tl.constexpr = 1, LS: tl.constexpr = 0):
    pid = tl.program_id(0)
    if HAS_LR:  # the first NTC·M programs compute t = R·x, the rest the quantized product
        n_t = NTC * M
        if pid < n_t:
            _t_work(pid, x_ptr, r_ptr, tp_ptr, cnt_ptr, M, K, RANK, stride_xm, RP, KC_)
        else:
            _gemv_work(pid - n_t, x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, ws_ptr,
                       tp_ptr, cnt_ptr, M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm,
                       stride_ym, BITS, S, MODE, GROUP_N, FAST, G, P, VS, HALF, BN, RP, HAS_BIAS,
                       HAS_LR, SPLITK, ASM, PF, LS)
        total = n_t + tl.cdiv(N, BN) * SPLIT * M
        if tl.atomic_add(cnt_ptr + 2, 1) == total - 1:  # last program: reset the R·x counter
            tl.store(cnt_ptr + 1, 0)
            tl.store(cnt_ptr + 2, 0)
    else:
        _gemv_work(pid, x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, ws_ptr,
                   tp_ptr, cnt_ptr, M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm,
                   stride_ym, BITS, S, MODE, GROUP_N, FAST, G, P, VS, HALF, BN, RP, HAS_BIAS,
                   HAS_LR, SPLITK, ASM, PF, LS)


@triton.jit(do_not_specialize=["M", "N", "K", "SROW", "NTILES", "TPS", "SPLIT", "RANK", "stride_ym",
                              "stride_tm"])
def _gemm_kernel(x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, t_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KW, SROW, NTILES, TPS, SPLIT, RANK, stride_xm, stride_ym, stride_tm,
                 BITS: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr, GROUP_N: tl.constexpr,
                 FAST: tl.constexpr, G: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_LR: tl.constexpr, SPLITK: tl.constexpr, ASM: tl.constexpr, LS: tl.constexpr = 0):
    KT: tl.constexpr = S * 32
    pid = tl.program_id(0)
    MB = tl.cdiv(M, BM)
    NB = tl.cdiv(N, BN)
    mb = pid % MB  # token tiles fastest: programs that share a weight tile run together
    nb = (pid // MB) % NB
    ks = pid // (MB * NB)
    m_off = mb * BM + tl.arange(0, BM)
    n_off = nb * BN + tl.arange(0, BN)
    i_off = tl.arange(0, 32)
    mmask = m_off < M
    nmask = n_off < N
    q_ptrs = q_ptr + n_off[None, :] * KW + i_off[:, None]  # (32, BN)
    x_ptrs = x_ptr + m_off[:, None] * stride_xm
    t0 = ks * TPS
    t1 = tl.minimum(t0 + TPS, NTILES)
    gn = (nb * BN) // G
    if MODE == 2 and LS >= 0:  # nf/nuq: the block's tables in registers (LS < 0: per column, below)
        tables = _tables(lut_ptr, n_off, BITS, LS, 0)
    else:
        tables = lut_ptr
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    w = tl.load(q_ptrs + t0 * 32)  # (32, BN) int32, first tile
    for t in range(t0, t1):
        w_next = tl.load(q_ptrs + (t + 1) * 32, mask=t + 1 < t1, other=0)  # prefetch the next tile
        kb = t * KT
        for j in tl.static_range(S):
            k = kb + j * 32 + i_off
            if MODE == 2 and LS < 0:  # nuq, a table per input column: this slice's 32 columns
                v = _decode(w, j, BITS, MODE, _tables(lut_ptr, k, BITS, -LS, 1), ASM, 1)  # (32, BN)
            else:
                v = _decode(w, j, BITS, MODE, tables, ASM, 0)  # (32, BN): rows k, cols n
            if FAST:
                if GROUP_N:
                    sidx = gn * SROW + k
                    a, b = _affine(tl.load(s_ptr + sidx).to(tl.float32), o_ptr, sidx, MODE, VS, HALF)
                    wv = v * a[:, None] + b[:, None]
                else:
                    sidx = n_off * SROW + (kb + j * 32) // G
                    a, b = _affine(tl.load(s_ptr + sidx).to(tl.float32), o_ptr, sidx, MODE, VS, HALF)
                    wv = v * a[None, :] + b[None, :]
            else:
                if GROUP_N:
                    sidx = (n_off[None, :] // G) * SROW + k[:, None]
                else:
                    sidx = n_off[None, :] * SROW + k[:, None] // G
                a, b = _affine(tl.load(s_ptr + sidx).to(tl.float32), o_ptr, sidx, MODE, VS, HALF)
                wv = v * a + b
            xj = tl.load(x_ptrs + k[None, :], mask=mmask[:, None] & (k[None, :] < K), other=0.0)
            acc += tl.dot(xj, wv.to(xj.dtype))
        w = w_next
    if SPLITK:
        wmask = mmask[:, None] & nmask[None, :]
        wptr = ws_ptr + (ks * M + m_off[:, None]) * N + n_off[None, :]
        tl.store(wptr, acc, mask=wmask)
        tl.debug_barrier()
        cidx = cnt_ptr + 3 + mb * NB + nb
        if tl.atomic_add(cidx, 1) == SPLIT - 1:
            tot = tl.zeros([BM, BN], dtype=tl.float32)
            for s0 in range(0, SPLIT, 4):  # 4 independent partial loads per round trip
                for i in tl.static_range(4):
                    tot += tl.load(ws_ptr + ((s0 + i) * M + m_off[:, None]) * N + n_off[None, :],
                                   mask=wmask & (s0 + i < SPLIT), other=0.0, cache_modifier=".cg")
            _gemm_finish(tot, m_off, n_off, mmask, nmask, y_ptr, b_ptr, l_ptr, t_ptr, RANK, stride_ym,
                         stride_tm, RP, HAS_BIAS, HAS_LR)
            tl.store(cidx, 0)
    else:
        _gemm_finish(acc, m_off, n_off, mmask, nmask, y_ptr, b_ptr, l_ptr, t_ptr, RANK, stride_ym,
                     stride_tm, RP, HAS_BIAS, HAS_LR)


@triton.jit
def _gemm_finish(acc, m_off, n_off, mmask, nmask, y_ptr, b_ptr, l_ptr, t_ptr, RANK, stride_ym, stride_tm,
                 RP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_off, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_LR:
        r_off = tl.arange(0, RP)
        tv = tl.load(t_ptr + m_off[:, None] * stride_tm + r_off[None, :],
                     mask=mmask[:, None] & (r_off[None, :] < RANK), other=0.0)
        lv = tl.load(l_ptr + n_off[None, :] * RANK + r_off[:, None],
                     mask=nmask[None, :] & (r_off[:, None] < RANK), other=0.0)
        acc += tl.dot(tv, lv.to(tv.dtype))
    tl.store(y_ptr + m_off[:, None] * stride_ym + n_off[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _decode_pair(w, jj: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Slices jj and jj + H of a tile of words (codes in the low and high 16-bit halves) -> two
    (rows × 32) tensors v = 1 + code·2⁻ᵇ in the activation dtype (DT 1: fp16, 2: bf16, 0: fp32).
    For fp16/bf16 one shift and one lop3 decode both: the pair of codes lands in the mantissas of
    the two halves at once (two weights per instruction pair, no conversion)."""
    if DT == 0:
        H: tl.constexpr = 16 // BITS
        lo = _decode(w, jj, BITS, 0, w, False)
        hi = _decode(w, jj + H, BITS, 0, w, False)
    else:
        MB: tl.constexpr = 10 if DT == 1 else 7  # mantissa bits of the half type
        SH: tl.constexpr = BITS * jj - (MB - BITS)
        if SH >= 0:
            t = w >> SH
        else:
            t = w << (-SH)
        M1: tl.constexpr = ((1 << BITS) - 1) << (MB - BITS)
        MASK: tl.constexpr = M1 | (M1 << 16)
        ONE: tl.constexpr = 0x3C003C00 if DT == 1 else 0x3F803F80  # 1.0 in both halves
        if ASM:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 r; lop3.b32 r, $2, $3, $4, 0xEA; mov.b32 {$0, $1}, r; }", "=h,=h,r,r,r",
                [t, tl.full(t.shape, MASK, tl.int32), tl.full(t.shape, ONE, tl.int32)],
                dtype=(tl.int16, tl.int16), is_pure=True, pack=1)
        else:
            bits = (t & MASK) | ONE
            lo = (bits & 0xFFFF).to(tl.int16)
            hi = (bits >> 16).to(tl.int16)
        ty = tl.float16 if DT == 1 else tl.bfloat16
        lo = lo.to(ty, bitcast=True)
        hi = hi.to(ty, bitcast=True)
    return lo, hi


@triton.jit
def _mma_flush(acc, d, s_ptr, n_off, g, SROW, VS: tl.constexpr):
    """acc += a[n, g]·d: one group's (rows × tokens) dot products of raw v, scaled (a = s·2ᵇ for
    rtn and rtn_sym alike)."""
    sv = tl.load(s_ptr + n_off * SROW + g, mask=g < SROW, other=0.0).to(tl.float32)
    return acc + (sv * VS)[:, None] * d


@triton.jit
def _prologue_work(pid, x_ptr, r_ptr, xs_ptr, tp_ptr, cnt_ptr, M, K, RANK, NXC, NGX, stride_xm,
                   G: tl.constexpr, RP: tl.constexpr, KC_: tl.constexpr):
    """The first programs of the tensor-core kernel: group sums xs[m, g] = Σ_{k∈g} x[m, k]
    (16 groups a program), then the R·x partials; each counts itself done."""
    if pid < NXC * M:
        m = pid % M
        c = pid // M
        g = c * 16 + tl.arange(0, 16)
        i = tl.arange(0, 32)
        tot = tl.zeros([16, 32], dtype=tl.float32)
        for k0 in range(0, G, 32):
            k = g[:, None] * G + k0 + i[None, :]
            tot += tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(xs_ptr + m * NGX + g, tl.sum(tot, axis=1))
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr + 1, 1)
    else:
        _t_work(pid - NXC * M, x_ptr, r_ptr, tp_ptr, cnt_ptr, M, K, RANK, stride_xm, RP, KC_)


@triton.jit
def _mma_finish(acc, m_off, n_off, mmask, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, M, NTC, RANK, stride_ym,
                BM: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr):
    """acc (rows × tokens) + bias + L·t -> y[m, n] (t = R·x summed from the prologue's partials)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_off, mask=nmask, other=0.0).to(tl.float32)[:, None]
    if HAS_LR:
        r_off = tl.arange(0, RP)
        tv = tl.zeros([RP, BM], dtype=tl.float32)
        for c in range(0, NTC):
            tv += tl.load(tp_ptr + (c * M + m_off[None, :]) * RP + r_off[:, None], mask=mmask[None, :],
                          other=0.0, cache_modifier=".cg")
        lv = tl.load(l_ptr + n_off[:, None] * RANK + r_off[None, :],
                     mask=nmask[:, None] & (r_off[None, :] < RANK), other=0.0)
        acc += tl.dot(lv.to(y_ptr.dtype.element_ty), tv.to(y_ptr.dtype.element_ty))
    tl.store(y_ptr + m_off[None, :] * stride_ym + n_off[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


@triton.jit(do_not_specialize=["M", "N", "SROW", "NTILES", "IPS", "SPLIT", "NTC", "NXC", "NGX", "RANK",
                              "stride_ym"])
def _mma_kernel(x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, b_ptr, l_ptr, r_ptr, ws_ptr, tp_ptr, xs_ptr, cnt_ptr,
                M, N, K, KW, SROW, NTILES, IPS, SPLIT, NTC, NXC, NGX, RANK, stride_xm, stride_ym,
                BITS: tl.constexpr, MODE: tl.constexpr, G: tl.constexpr, U: tl.constexpr, VS: tl.constexpr,
                HALF: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr, KC_: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, SPLITK: tl.constexpr, DT: tl.constexpr,
                ASM: tl.constexpr):
    """Few tokens on the tensor cores: acc[n, m] = Σ_g a[n, g]·(V_g·X_gᵀ)[n, m] + Σ_g b[n, g]·xs[m, g].
    V is decoded two codes per instruction pair straight into the activation dtype (exact), the
    group scale a is applied to the fp32 dot products once per group (and half-word), the offsets
    b through the group sums xs of x, which the first programs of the grid compute (as R·x)."""
    S: tl.constexpr = 32 // BITS
    H: tl.constexpr = 16 // BITS
    KT: tl.constexpr = S * 32
    P: tl.constexpr = G // 32  # slices per group
    pid = tl.program_id(0)
    n_pre = (NXC + NTC) * M
    if pid < n_pre:
        _prologue_work(pid, x_ptr, r_ptr, xs_ptr, tp_ptr, cnt_ptr, M, K, RANK, NXC, NGX, stride_xm, G, RP, KC_)
    else:
        wid = pid - n_pre
        NB = tl.cdiv(N, BN)
        nb = wid % NB
        rest = wid // NB
        ks = rest % SPLIT
        mb = rest // SPLIT
        n_off = nb * BN + tl.arange(0, BN)
        m_off = mb * BM + tl.arange(0, BM)
        i_off = tl.arange(0, 32)
        nmask = n_off < N
        mmask = m_off < M
        q_ptrs = q_ptr + n_off[:, None] * KW + i_off[None, :]  # (BN, 32)
        x_ptrs = x_ptr + m_off[:, None] * stride_xm + i_off[None, :]  # (BM, 32)
        NIT = tl.cdiv(NTILES, U)
        i0 = ks * IPS
        i1 = tl.minimum(i0 + IPS, NIT)
        acc = tl.zeros([BN, BM], dtype=tl.float32)
        for it in range(i0, i1):
            kb = it * (U * KT)
            for u in tl.static_range(U):
                if U == 1:
                    w = tl.load(q_ptrs + it * 32)
                else:
                    w = tl.load(q_ptrs + (it * U + u) * 32, mask=it * U + u < NTILES, other=0)
                d_lo = tl.zeros([BN, BM], dtype=tl.float32)
                d_hi = tl.zeros([BN, BM], dtype=tl.float32)
                for jj in tl.static_range(H):
                    lo, hi = _decode_pair(w, jj, BITS, DT, ASM)
                    q_lo = u * S + jj  # slice index inside the iteration (constexpr)
                    q_hi = u * S + H + jj
                    xl = tl.load(x_ptrs + kb + q_lo * 32, mask=mmask[:, None] & (kb + q_lo * 32 + i_off < K)[None, :],
                                 other=0.0)  # (BM, 32), k contiguous
                    xh = tl.load(x_ptrs + kb + q_hi * 32, mask=mmask[:, None] & (kb + q_hi * 32 + i_off < K)[None, :],
                                 other=0.0)
                    d_lo = tl.dot(lo, tl.trans(xl), d_lo)
                    d_hi = tl.dot(hi, tl.trans(xh), d_hi)
                    if (q_lo + 1) % P == 0 or jj == H - 1:  # group or half-word ends: scale and add
                        acc = _mma_flush(acc, d_lo, s_ptr, n_off, (kb + q_lo * 32) // G, SROW, VS)
                        d_lo = tl.zeros([BN, BM], dtype=tl.float32)
                    if (q_hi + 1) % P == 0 or jj == H - 1:
                        acc = _mma_flush(acc, d_hi, s_ptr, n_off, (kb + q_hi * 32) // G, SROW, VS)
                        d_hi = tl.zeros([BN, BM], dtype=tl.float32)
        # offsets: Σ_g b[n, g]·xs[m, g] over this program's groups (xs from the prologue)
        _wait(cnt_ptr + 1, n_pre)
        g0 = (i0 * (U * KT)) // G
        g1 = tl.minimum((i1 * (U * KT)) // G, SROW)
        for g in range(g0, g1):
            sv = tl.load(s_ptr + n_off * SROW + g).to(tl.float32)
            if MODE == 0:
                b = tl.load(o_ptr + n_off * SROW + g).to(tl.float32) - sv * VS
            else:
                b = -sv * (VS + HALF)
            xs = tl.load(xs_ptr + m_off * NGX + g, mask=mmask, other=0.0, cache_modifier=".cg")
            acc += b[:, None] * xs[None, :]
        if SPLITK:
            wmask = nmask[:, None] & mmask[None, :]
            tl.store(ws_ptr + (ks * M + m_off[None, :]) * N + n_off[:, None], acc, mask=wmask)
            tl.debug_barrier()
            cidx = cnt_ptr + 3 + mb * NB + nb
            if tl.atomic_add(cidx, 1) == SPLIT - 1:  # last split of this block: reduce and finish
                tot = tl.zeros([BN, BM], dtype=tl.float32)
                for s0 in range(0, SPLIT):
                    tot += tl.load(ws_ptr + (s0 * M + m_off[None, :]) * N + n_off[:, None], mask=wmask,
                                   other=0.0, cache_modifier=".cg")
                _mma_finish(tot, m_off, n_off, mmask, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, M, NTC, RANK,
                            stride_ym, BM, RP, HAS_BIAS, HAS_LR)
                tl.store(cidx, 0)
        else:
            _mma_finish(acc, m_off, n_off, mmask, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, M, NTC, RANK, stride_ym,
                        BM, RP, HAS_BIAS, HAS_LR)
    total = n_pre + tl.cdiv(N, BN) * SPLIT * tl.cdiv(M, BM)
    if tl.atomic_add(cnt_ptr + 2, 1) == total - 1:  # last program: reset the prologue counter
        tl.store(cnt_ptr + 1, 0)
        tl.store(cnt_ptr + 2, 0)


@triton.jit(do_not_specialize=["N", "K", "SROW", "NTILES"])
def _dequant_kernel(w_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, N, K, KW, SROW, NTILES,
                    BITS: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr, GROUP_N: tl.constexpr,
                    FAST: tl.constexpr, G: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr,
                    BN: tl.constexpr, ASM: tl.constexpr, LS: tl.constexpr = 0):
    """W[n, k] (the activation dtype, row-major (N, K)) for one (BN rows × K-tile) block."""
    KT: tl.constexpr = S * 32
    nb = tl.program_id(0)
    t = tl.program_id(1)
    n_off = nb * BN + tl.arange(0, BN)
    i_off = tl.arange(0, 32)
    nmask = n_off < N
    if MODE == 2 and LS >= 0:  # nf/nuq: the block's tables in registers (LS < 0: per column, below)
        tables = _tables(lut_ptr, n_off, BITS, LS, 1)
    else:
        tables = lut_ptr
    w = tl.load(q_ptr + n_off[:, None] * KW + t * 32 + i_off[None, :])  # (BN, 32)
    kb = t * KT
    for j in tl.static_range(S):
        k = kb + j * 32 + i_off
        if MODE == 2 and LS < 0:  # nuq, a table per input column
            v = _decode(w, j, BITS, MODE, _tables(lut_ptr, k, BITS, -LS, 0), ASM, 0)
        else:
            v = _decode(w, j, BITS, MODE, tables, ASM, 1)
        if GROUP_N:
            sidx = (n_off[:, None] // G) * SROW + k[None, :]
        else:
            sidx = n_off[:, None] * SROW + k[None, :] // G
        a, b = _affine(tl.load(s_ptr + sidx).to(tl.float32), o_ptr, sidx, MODE, VS, HALF)
        tl.store(w_ptr + n_off[:, None] * K + k[None, :], (v * a + b).to(w_ptr.dtype.element_ty),
                 mask=nmask[:, None] & (k[None, :] < K))


@triton.jit(do_not_specialize=["M", "N", "stride_xm", "stride_ym"])
def _sparse_add_kernel(x_ptr, y_ptr, rowptr_ptr, col_ptr, val_ptr, M, N, stride_xm, stride_ym,
                       BR: tl.constexpr, BJ: tl.constexpr):
    """y[m, n] += Σ_j val[j]·x[m, col[j]] over row n's CSR entries (exactly kept outliers), for a
    block of BR rows and one token; fp32 sums, y rounded once."""
    rb = tl.program_id(0)
    m = tl.program_id(1)
    r = rb * BR + tl.arange(0, BR)
    rmask = r < N
    start = tl.load(rowptr_ptr + r, mask=rmask, other=0)
    cnt = tl.load(rowptr_ptr + r + 1, mask=rmask, other=0) - start
    jj = tl.arange(0, BJ)
    acc = tl.zeros([BR], dtype=tl.float32)
    for j0 in range(0, tl.max(cnt, axis=0), BJ):
        jm = (j0 + jj)[None, :] < cnt[:, None]
        e = start[:, None] + j0 + jj[None, :]
        c = tl.load(col_ptr + e, mask=jm, other=0)
        v = tl.load(val_ptr + e, mask=jm, other=0.0)
        xv = tl.load(x_ptr + m * stride_xm + c, mask=jm, other=0.0).to(tl.float32)
        acc += tl.sum(v * xv, axis=1)
    yp = y_ptr + m * stride_ym + r
    tl.store(yp, (tl.load(yp, mask=rmask, other=0.0).to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=rmask)


def sparse_add(x: torch.Tensor, y: torch.Tensor, fix: SparseFix) -> None:
    """y += x·Cᵀ in place for the CSR correction C of :class:`.layout.SparseFix`; x (M, K), y (M, N),
    rows contiguous. One launch."""
    m, n = y.shape
    if m == 0 or fix.nnz == 0:
        return
    br = 16
    _sparse_add_kernel[(-(-n // br), m)](x, y, fix.rowptr, fix.col, fix.val, m, n, x.stride(0), y.stride(0),
                                         BR=br, BJ=32, num_warps=4)


def dequantize(kw: KernelWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The (N, K) weight in ``dtype``, decoded on the GPU by one kernel launch."""
    if kw.layout == "frag":
        return _with_fix(_frag.dequantize(kw, dtype), kw)
    n, k = kw.shape
    w = torch.empty(n, k, dtype=dtype, device=kw.device)
    bn = 64
    _dequant_kernel[(-(-n // bn), kw.n_tiles)](
        w, kw.qweight, kw.scale, kw.offset if kw.offset is not None else kw.scale,
        kw.lut if kw.lut is not None else kw.scale, n, k, kw.qweight.shape[1], kw.scale.shape[1], kw.n_tiles,
        BITS=kw.bits, S=32 // kw.bits, MODE=kw.mode, GROUP_N=kw.spec.group_dim == "out", FAST=False,
        G=kw.spec.group_size, VS=float(2 ** kw.bits), HALF=float(2 ** (kw.bits - 1)), BN=bn, ASM=_asm(),
        LS=kw.lut_stride, num_warps=4)
    return _with_fix(w, kw)


def _with_fix(w: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """The dense weight with the exactly kept outliers' correction added."""
    return kw.fix.add_to(w) if kw.fix is not None else w


# ----------------------------------------------------------------------------------------------
# host side


@dataclass(frozen=True)
class Config:
    """One launch configuration. kind: "frag" (1-16 tokens on the fragment layout), "gemv", "mma"
    (few tokens, tensor cores), "gemm" or "dequant"; occ: target programs per SM (sets split-K)."""

    kind: str = "gemv"
    bn: int = 64
    bm: int = 16
    warps: int = 4
    stages: int = 2
    occ: float = 4.0
    split: int = 0  # 0: from occ
    maxnreg: int = 0  # register cap per thread (0: the compiler's choice); more programs fit per SM
    pf: int = 1  # gemv: weight tiles requested ahead of the one being decoded (1 or 2); frag: blocks per step (U)
    unroll: int = 1  # frag: steps per main-loop iteration (2: two register sets, unmasked loads)
    xs: int = 0  # frag at one token: 1 = x's words loaded once per step and shuffled into the B fragments
    kwarps: int = 0  # frag: 1 = a program's warps share one block of 16 rows and split its K (_frag.kwarps_fit)


_KINDS = {"frag": ("frag", "dequant"), "interleaved": ("gemv", "mma", "gemm", "dequant")}
GEMV_MAX_M = 4  # default: GEMV kernel up to this many tokens, GEMM kernel above
MMA_MAX_M = 16  # default: the tensor-core kernel up to this many tokens, where the format allows
DEQUANT_MIN_M = 32  # default: above this many tokens, dequantize and use cuBLAS
_TUNED: dict[tuple, Config] = {}
_SMS: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _fast(kw: KernelWeight, bn: int) -> bool:
    g = kw.spec.group_size
    return g % LANES == 0 and (kw.spec.group_dim == "in" or g % bn == 0)


def _flush_period(kw: KernelWeight) -> int:
    g = kw.spec.group_size
    return max(1, math.gcd(g, k_tile(kw.bits)) // LANES) if g % LANES == 0 else 1


def _rank_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _split(kw: KernelWeight, blocks: int, cfg: Config, device: torch.device, multiple: int = 1) -> tuple[int, int]:
    """(K-splits, K-tiles per split) for ``blocks`` programs per split; tiles per split rounded up to
    a multiple of ``multiple``."""
    n_tiles = kw.n_tiles
    split = cfg.split or max(1, min(n_tiles, round(cfg.occ * _sms(device) / max(blocks, 1))))
    tps = -(-(-(-n_tiles // split)) // multiple) * multiple
    return -(-n_tiles // tps), tps


def _counters(kw: KernelWeight, size: int, device: torch.device) -> torch.Tensor:
    c = kw.cache.get("counters")
    if c is None or c.numel() < size or c.device != device:
        c = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        kw.cache["counters"] = c
    return c


def _unroll(kw: KernelWeight) -> int:
    """K-tiles per iteration of the mma kernel: the fewest whose codes span whole groups."""
    g, kt = kw.spec.group_size, k_tile(kw.bits)
    return g // math.gcd(g, kt)


def mma_ok(kw: KernelWeight, dtype: torch.dtype) -> bool:
    """Formats and activation dtypes the tensor-core kernel reads: affine codes (rtn, rtn_sym) with
    groups of a multiple of 32 along ``in``, codes that split evenly between the 16-bit halves of a
    word and fit the half type's mantissa, fp16/bf16 activations (fp32 only in the interpreter)."""
    b, spec = kw.bits, kw.spec
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if not _asm() else ())
    return (kw.layout == "interleaved" and kw.mode in (0, 1) and spec.group_dim == "in"
            and spec.group_size % LANES == 0 and 2 * half_codes(b) == 32 // b and b <= 7 and _unroll(kw) <= 4
            and dtype in dtypes)


def default_config(kw: KernelWeight, m: int, dtype: torch.dtype | None = None, has_lr: bool = False) -> Config:
    if kw.layout == "frag":
        return _frag.default_config(kw, m, dtype, has_lr)
    if 1 < m <= MMA_MAX_M and dtype is not None and mma_ok(kw, dtype):
        return Config(kind="mma", bn=64, bm=16, warps=4, stages=3, occ=2.0)
    if m <= GEMV_MAX_M:
        bn = 64
        while not _fast(kw, bn) and bn > 16:
            bn //= 2
        return Config(kind="gemv", bn=bn, warps=4, occ=4.0, maxnreg=128)
    if m > DEQUANT_MIN_M:
        return Config(kind="dequant")
    bm = 16 if m <= 16 else 32
    bn = 128
    while not _fast(kw, bn) and bn > 32:
        bn //= 2
    return Config(kind="gemm", bm=bm, bn=bn, warps=4 if bm <= 32 else 8, stages=3, occ=2.0)


def _tune_key(kw: KernelWeight, m: int, has_lr: bool, dtype: torch.dtype) -> tuple:
    mb = 1 if m == 1 else triton.next_power_of_2(m)
    return (kw.shape, kw.spec, mb, has_lr, dtype)


def with_lr(L: torch.Tensor | None, R: torch.Tensor | None) -> bool:
    """Whether a call's low-rank factors add a term (both given, rank > 0): part of a call's tuning key
    and of its default launch."""
    return L is not None and R is not None and L.shape[1] > 0


def tuned_choice(kw: KernelWeight, m: int, has_lr: bool, dtype: torch.dtype) -> Config | None:
    """This process's tuned configuration for such calls (:func:`tune`, :func:`set_config`), if any."""
    return _TUNED.get(_tune_key(kw, m, has_lr, dtype))


def chosen_config(kw: KernelWeight, m: int, has_lr: bool, dtype: torch.dtype) -> Config:
    """The configuration such calls take when none is passed: the tuned one, else the default."""
    return tuned_choice(kw, m, has_lr, dtype) or default_config(kw, m, dtype, has_lr)


def plans_rotation(kw: KernelWeight, m: int, dtype: torch.dtype, rotation, config: Config | None = None,
                   has_lr: bool = False) -> bool:
    """Whether a call of m tokens applies the input rotation ``rotation`` (from ``kernels.rotation``)
    as part of its plan: the fragment kernel at one token (else x is rotated first by the rotation's
    general call)."""
    cfg = config or chosen_config(kw, m, has_lr, dtype)
    return cfg.kind == "frag" and _frag.plans_rotation(kw, m, dtype, rotation)


def linear(x: torch.Tensor, kw: KernelWeight, L: torch.Tensor | None = None, R: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, config: Config | None = None,
           out: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    """y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ + bias with the fused kernels; x (..., K) fp16/bf16/fp32.
    ``out``: optional contiguous (M, N) result buffer of x's dtype. ``rotation`` (a callable from
    ``kernels.rotation``): the layer's input rotation, x ← R·x first: planned with the kernel's
    launch where :func:`plans_rotation`, else by the rotation's general call."""
    n, k = kw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    has_lr = with_lr(L, R)
    cfg = config or chosen_config(kw, m, has_lr, x.dtype)
    if cfg.kind not in _KINDS[kw.layout]:
        raise ValueError(f"a {cfg.kind!r} config does not read the {kw.layout!r} layout "
                         f"(kinds for it: {', '.join(_KINDS[kw.layout])})")
    if rotation is not None and plans_rotation(kw, m, x.dtype, rotation, cfg, has_lr):
        _launch_frag(x2, y, kw, L, R, bias, has_lr, cfg, rotation)
        return y.view(*lead, n)
    if rotation is not None:
        x2 = rotation(x2)
    if cfg.kind != "dequant":
        _LAUNCH[cfg.kind](x2, y, kw, L, R, bias, has_lr, cfg)
        if kw.fix is not None:  # exactly kept outliers: one more pass, y += x·Cᵀ
            sparse_add(x2, y, kw.fix)
    else:  # many tokens are compute-bound: decode W once (outliers included), then cuBLAS
        w = dequantize(kw, x.dtype)
        b = bias.to(x.dtype) if bias is not None else None
        if out is None:
            y = torch.nn.functional.linear(x2, w, b)
        else:
            y.copy_(torch.nn.functional.linear(x2, w, b))
        if has_lr:
            y.addmm_(torch.nn.functional.linear(x2, R.to(x.dtype)), L.to(x.dtype).t())
    return y.view(*lead, n)


def _constexprs(kw: KernelWeight, bn: int) -> dict:
    b = kw.bits
    return dict(BITS=b, S=32 // b, MODE=kw.mode, GROUP_N=kw.spec.group_dim == "out", FAST=_fast(kw, bn),
                G=kw.spec.group_size, VS=float(2 ** b), HALF=float(2 ** (b - 1)))


def _gemv_constexprs(kw: KernelWeight, bn: int, rp: int, has_bias: bool, has_lr: bool, splitk: bool,
                     pf: int = 1) -> tuple:
    c = _constexprs(kw, bn)  # in the kernel's parameter order: BITS S MODE GROUP_N FAST G P VS HALF BN RP KC_ ...
    return (c["BITS"], c["S"], c["MODE"], c["GROUP_N"], c["FAST"], c["G"], _flush_period(kw), c["VS"], c["HALF"],
            bn, rp, KC, has_bias, has_lr, splitk, _asm(), pf, kw.lut_stride)


def _asm() -> bool:
    """Inline PTX only when compiling for a GPU (triton's CPU interpreter cannot run it)."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _aligned(*ts) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in ts)


_RECORD: list | None = None  # set by bind(): the launches of one call are recorded here as well as run


def _launch(fn, plan: dict | None, grid: tuple, args: tuple, warps: int, stages: int, maxnreg: int = 0,
            pdl: bool = False) -> None:
    """Launch ``fn``; with a plan, the compiled kernel is kept and later calls go straight to its
    launcher (skipping triton's argument binding, most of the host-side cost of a launch). ``pdl``: as
    a programmatic dependent launch (it may start before the previous launch ends; the kernel waits
    for its results itself)."""
    if _RECORD is not None:
        _RECORD.append((fn, plan, grid, args, warps, stages, maxnreg, pdl))
    k = plan.get("kernel") if plan is not None else None
    if k is None:
        opts = {"maxnreg": maxnreg} if maxnreg and _asm() else {}
        if pdl:
            opts["launch_pdl"] = True
        k = fn[grid](*args, num_warps=warps, num_stages=stages, **opts)
        if plan is not None and hasattr(k, "run") and hasattr(k, "function"):
            plan["kernel"] = k
        return
    _run_compiled(k, grid, args)


def _run_compiled(k, grid: tuple, args: tuple, stream: int | None = None) -> None:
    """One launch of the compiled kernel ``k`` over ``grid`` (1 to 3 dimensions) on ``stream`` (default:
    the current one), straight to its launcher."""
    enter, leave = _hooks()
    if stream is None:
        stream = _stream_getter(args[0].device)()
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    meta = k.launch_metadata((grid[0], g1, g2), stream, *args) if enter is not None or leave is not None else None
    k.run(grid[0], g1, g2, stream, k.function, k.packed_metadata, meta, enter, leave, *args)


def _hooks() -> tuple:
    """triton's launch hooks (profilers), None where there are none: triton 3.6 keeps them in chains that
    are always present and usually empty, for which it would still build the launch metadata and call
    into Python twice per launch."""
    rt = triton.knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    if enter is not None and getattr(enter, "calls", True) == []:
        enter = None
    if leave is not None and getattr(leave, "calls", True) == []:
        leave = None
    return enter, leave


def _stream_getter(device: torch.device):
    """A function returning the current CUDA stream of ``device`` as a raw handle (as triton's own
    launches get it)."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is None:
        return lambda: torch.cuda.current_stream(device).cuda_stream
    return functools.partial(get, device.index if device.index is not None else torch.cuda.current_device())


# leading kernel arguments that change from call to call (x, for frag also x as 32-bit pairs, then y);
# the rest of a bound call's arguments (weights, plan scratch, sizes, strides, constants) are fixed
_HEAD = {"frag": 3, "gemv": 2, "mma": 2}


class BoundLinear:
    """One weight's kernel call for a fixed token count and dtype, prepared by :func:`bind`: the
    launch configuration chosen, the plan's scratch allocated, the kernel compiled and its fixed
    arguments assembled once. A call allocates y and launches (plus the outliers' sparse pass where
    the weight has one; a rotated one-token call, ``pre``: the rotation's launch on x into the plan's
    x', then the GEMV's on x'); nothing is looked up, tuned or compiled.

    ``bound(x, shape)``: x holds the m tokens' rows back to back (any leading shape, contiguous, 16-byte
    aligned) on the bound device (not checked: compiled launches take bare addresses); y is allocated as
    ``shape`` (default (m, N)), e.g. x's leading shape and N: no reshapes."""

    def __init__(self, m: int, n: int, dtype: torch.dtype, device: torch.device, launch: tuple | None,
                 fix: SparseFix | None, general=None, pre: tuple | None = None):
        self.m, self.n, self.dtype, self.device, self.fix = m, n, dtype, device, fix
        self.general = general  # x -> y (x's leading shape) for calls that are not planned launches
        self.pre = None  # chained: the input rotation's launch on x, then the GEMV on its fixed output
        if launch is not None:
            fn, plan, grid, args, warps, stages, maxnreg, pdl = launch
            self.frag = fn is _frag._frag_kernel
            h = _HEAD["frag" if self.frag else "gemv"]
            self.kernel = plan.get("kernel")  # None in triton's interpreter: its own dispatch each call
            self.args = args[h:]  # the fixed arguments (their tensors live as long as this call)
            # compiled: the fixed tensors as device addresses (_addresses); the interpreter takes tensors
            self.tail = _addresses(self.args) if self.kernel is not None else self.args
            # the GEMV reads x' (plan scratch) where its own first programs rotate x into it
            self.x32 = args[1] if self.frag and args[1].data_ptr() != args[0].data_ptr() else None
            self.x32p = self.x32.data_ptr() if self.x32 is not None else None
            self.fn, self.grid, self.opts = fn, grid, (warps, stages, maxnreg, pdl)
            self.stream = _stream_getter(device) if self.kernel is not None else None
            if pre is not None:
                assert fix is None, "the outliers' pass reads x, not x'"  # (_frag.plans_rotation excludes them)
                pfn, pplan, pgrid, pargs, pw, ps, pm, ppdl = pre
                self.xin = args[:h - 1]  # the rotation's output (plan scratch) as the GEMV's x
                self.xinp = _addresses(self.xin)
                pk = pplan.get("kernel")
                self.pre = (pk, pfn, pgrid, _addresses(pargs[1:]) if pk is not None else pargs[1:],
                            (pw, ps, pm, ppdl))
                self.pre_args = pargs[1:]  # (kept: the tensors behind those addresses)

    def __call__(self, x: torch.Tensor, shape: tuple | None = None) -> torch.Tensor:
        if self.general is not None:
            y = self.general(x)
            return y.view(shape) if shape is not None else y
        y = torch.empty(shape or (self.m, self.n), dtype=self.dtype, device=self.device)
        if self.kernel is not None:  # compiled: every pointer as its address (_addresses)
            stream = self.stream()
            xp, yp = x.data_ptr(), y.data_ptr()
            if self.pre is not None:
                k, fn, grid, tail, opts = self.pre
                _fire(k, fn, grid, ((xp if k is not None else x),) + tail, opts, stream)
                head = self.xinp + (yp,)
            else:
                head = (xp, self.x32p or xp, yp) if self.frag else (xp, yp)
            _run_compiled(self.kernel, self.grid, head + self.tail, stream)
        else:
            if self.pre is not None:
                k, fn, grid, tail, opts = self.pre
                _fire(k, fn, grid, (x,) + tail, opts, None)
                head = self.xin + (y,)
            else:
                head = (x, self.x32 if self.x32 is not None else x.view(torch.int32), y) if self.frag else (x, y)
            _fire(None, self.fn, self.grid, head + self.tail, self.opts, None)
        if self.fix is not None:  # exactly kept outliers: y += x·Cᵀ
            sparse_add(x.view(self.m, -1), y.view(self.m, self.n), self.fix)
        return y


def _addresses(args: tuple) -> tuple:
    """A compiled launch's arguments with every tensor replaced by its device address. triton's
    launcher takes an int as the pointer itself, where for a tensor it calls data_ptr() and asks the
    driver to check the address (cuPointerGetAttribute): once per pointer argument and launch, a
    dozen and more for the fragment kernel. For tensors that the caller keeps alive."""
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)


def _fire(k, fn, grid: tuple, args: tuple, opts: tuple, stream) -> None:
    """A bound launch: straight to the compiled kernel ``k``'s launcher, or (None: triton's interpreter)
    ``fn``'s own dispatch with the launch options ``opts``."""
    if k is not None:
        _run_compiled(k, grid, args, stream)
    else:
        _launch(fn, None, grid, args, *opts)


def bind(x: torch.Tensor, kw: KernelWeight, L: torch.Tensor | None = None, R: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, config: Config | None = None,
         rotation=None) -> tuple[BoundLinear, torch.Tensor]:
    """Compute y = linear(x, kw, L, R, bias) for x (m, K) — contiguous rows, 16-byte aligned — and
    return it with a :class:`BoundLinear` for later calls of the same token count and dtype. The
    configuration (tuned, else default) is fixed now: call :func:`tune` before binding. Where the
    call is one planned launch (frag up to 16 tokens, gemv, mma), or a rotated one-token call's two
    (the rotation's, then the fragment kernel's on its output), the bound call goes straight to the
    compiled kernels' launchers; otherwise (dequantize + cuBLAS, gemm, more than 16 tokens) it calls
    :func:`linear` with the same configuration."""
    global _RECORD
    m, k = x.shape
    n = kw.shape[0]
    has_lr = with_lr(L, R)
    cfg = config or chosen_config(kw, m, has_lr, x.dtype)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _RECORD = rec = []
    try:
        linear(x, kw, L, R, bias, config=cfg, out=y, rotation=rotation)
    finally:
        _RECORD = None
    single = (cfg.kind in _HEAD and len(rec) == 1 and rec[0][1] is not None
              and rec[0][3][0].data_ptr() == x.data_ptr() and rec[0][3][_HEAD[cfg.kind] - 1].data_ptr() == y.data_ptr())
    if single:
        return BoundLinear(m, n, x.dtype, x.device, rec[0], kw.fix), y
    # a rotated one-token call (_frag.plans_rotation): the rotation's planned launch on x, then the fragment
    # kernel's on its output
    chained = (len(rec) == 2 and rec[0][0] in _rotate.KERNELS and rec[0][1] is not None
               and rec[0][3][0].data_ptr() == x.data_ptr() and rec[1][0] is _frag._frag_kernel
               and rec[1][1] is not None and rec[1][3][2].data_ptr() == y.data_ptr())
    if chained:
        return BoundLinear(m, n, x.dtype, x.device, rec[1], kw.fix, pre=rec[0]), y
    # not planned launches on x itself (e.g. unaligned factors, several launches)
    general = lambda x2: linear(x2, kw, L, R, bias, config=cfg, rotation=rotation)  # noqa: E731
    return BoundLinear(m, n, x.dtype, x.device, None, None, general), y


def _plan(kw: KernelWeight, key: tuple, make) -> dict:
    plans = kw.cache.setdefault("plans", {})
    p = plans.get(key)
    if p is None:
        p = plans[key] = make()
    return p


def _lowrank_operands(L, R, has_lr: bool) -> tuple:
    """(rank, contiguous L, contiguous R), or (0, None, None) without a low-rank term."""
    if not has_lr:
        return 0, None, None
    return L.shape[1], L.contiguous(), R.contiguous()


def split_workspace(split: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """fp32 partial sums of the K-splits (split × m × n), or a placeholder without split-K."""
    return torch.empty(split * m * n if split > 1 else 1, dtype=torch.float32, device=device)


def _launch_gemv(x, y, kw, L, R, bias, has_lr, cfg: Config) -> None:
    n, k = kw.shape
    m = x.shape[0]
    rank, Lc, Rc = _lowrank_operands(L, R, has_lr)
    key = ("gemv", cfg, m, rank, x.dtype, x.device, bias is not None and bias.dtype,
           has_lr and (Lc.dtype, Rc.dtype))

    def make():
        nb = -(-n // cfg.bn)
        split, tps = _split(kw, nb * m, cfg, x.device)
        ntc = -(-k // KC) if has_lr else 0
        rp = _rank_pad(rank)
        return dict(grid=(ntc * m + nb * split * m,), split=split, tps=tps, ntc=ntc,
                    cnt=_counters(kw, N_COUNTERS + m * nb, x.device),
                    ws=split_workspace(split, m, n, x.device),
                    tp=torch.empty(max(ntc * m * rp, 1), dtype=torch.float32, device=x.device),
                    const=_gemv_constexprs(kw, cfg.bn, rp, bias is not None, has_lr, split > 1, cfg.pf))

    plan = _plan(kw, key, make) if _aligned(x, y, bias, Lc, Rc) else None
    p = plan or make()
    dummy = kw.scale
    args = (x, y, kw.qweight, kw.scale, kw.offset if kw.offset is not None else dummy,
            kw.lut if kw.lut is not None else dummy, bias if bias is not None else dummy,
            Lc if has_lr else dummy, Rc if has_lr else dummy, p["ws"], p["tp"], p["cnt"],
            m, n, k, kw.qweight.shape[1], kw.scale.shape[1], kw.n_tiles, p["tps"], p["split"], p["ntc"], rank,
            x.stride(0), y.stride(0), *p["const"])
    _launch(_gemv_kernel, plan, p["grid"], args, cfg.warps, cfg.stages, cfg.maxnreg)


def _launch_mma(x, y, kw, L, R, bias, has_lr, cfg: Config) -> None:
    n, k = kw.shape
    m = x.shape[0]
    rank, Lc, Rc = _lowrank_operands(L, R, has_lr)
    key = ("mma", cfg, m, rank, x.dtype, x.device, x.stride(0), bias is not None and bias.dtype,
           has_lr and (Lc.dtype, Rc.dtype))

    def make():
        nb, mbk, u = -(-n // cfg.bn), -(-m // cfg.bm), _unroll(kw)
        nit = -(-kw.n_tiles // u)
        split = cfg.split or max(1, min(nit, round(cfg.occ * _sms(x.device) / (nb * mbk))))
        ips = -(-nit // split)
        split = -(-nit // ips)
        srow = kw.scale.shape[1]
        nxc = -(-srow // 16)
        ntc = -(-k // KC) if has_lr else 0
        rp = _rank_pad(rank)
        b = kw.bits
        return dict(grid=((nxc + ntc) * m + nb * split * mbk,), split=split, ips=ips, ntc=ntc, nxc=nxc,
                    cnt=_counters(kw, N_COUNTERS + mbk * nb, x.device),
                    ws=split_workspace(split, m, n, x.device),
                    tp=torch.empty(max(ntc * m * rp, 1), dtype=torch.float32, device=x.device),
                    xs=torch.empty(m * nxc * 16, dtype=torch.float32, device=x.device),
                    const=(b, kw.mode, kw.spec.group_size, u, float(2 ** b), float(2 ** (b - 1)), cfg.bn, cfg.bm,
                           rp, KC, bias is not None, has_lr, split > 1, _DT[x.dtype], _asm()))

    plan = _plan(kw, key, make) if _aligned(x, y, bias, Lc, Rc) else None
    p = plan or make()
    dummy = kw.scale
    args = (x, y, kw.qweight, kw.scale, kw.offset if kw.offset is not None else dummy,
            bias if bias is not None else dummy, Lc if has_lr else dummy, Rc if has_lr else dummy,
            p["ws"], p["tp"], p["xs"], p["cnt"], m, n, k, kw.qweight.shape[1], kw.scale.shape[1], kw.n_tiles,
            p["ips"], p["split"], p["ntc"], p["nxc"], p["nxc"] * 16, rank, x.stride(0), y.stride(0), *p["const"])
    _launch(_mma_kernel, plan, p["grid"], args, cfg.warps, cfg.stages, cfg.maxnreg)


_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _launch_gemm(x, y, kw, L, R, bias, has_lr, cfg: Config) -> None:
    n, k = kw.shape
    m = x.shape[0]
    rank = L.shape[1] if has_lr else 0
    if has_lr:
        t = torch.nn.functional.linear(x, R.to(x.dtype))  # (M, rank)
        Lc = L.contiguous()
    else:
        t = Lc = None
    key = ("gemm", cfg, m, rank, x.dtype, x.device, x.stride(0), bias is not None and bias.dtype,
           has_lr and Lc.dtype)

    def make():
        mbk, nbk = -(-m // cfg.bm), -(-n // cfg.bn)
        split, tps = _split(kw, mbk * nbk, cfg, x.device)
        return dict(grid=(mbk * nbk * split,), split=split, tps=tps,
                    cnt=_counters(kw, N_COUNTERS + mbk * nbk, x.device),
                    ws=split_workspace(split, m, n, x.device),
                    const=(*_constexprs(kw, cfg.bn).values(), cfg.bm, cfg.bn, _rank_pad(rank), bias is not None,
                           has_lr, split > 1, _asm(), kw.lut_stride))

    plan = _plan(kw, key, make) if _aligned(x, y, bias, Lc, t) else None
    p = plan or make()
    dummy = kw.scale
    args = (x, y, kw.qweight, kw.scale, kw.offset if kw.offset is not None else dummy,
            kw.lut if kw.lut is not None else dummy, bias if bias is not None else dummy,
            Lc if has_lr else dummy, t if has_lr else dummy, p["ws"], p["cnt"],
            m, n, k, kw.qweight.shape[1], kw.scale.shape[1], kw.n_tiles, p["tps"], p["split"], rank,
            x.stride(0), y.stride(0), t.stride(0) if has_lr else 0, *p["const"])
    # nf: triton would software-pipeline the table gathers through shared memory (and overflow it)
    _launch(_gemm_kernel, plan, p["grid"], args, cfg.warps, 1 if kw.mode == 2 else cfg.stages)


def _launch_frag(x, y, kw, L, R, bias, has_lr, cfg: Config, rot=None) -> None:
    if not _frag.ok(kw, x.shape[0], x.dtype):
        raise ValueError(f"the fragment kernel takes fp16/bf16 tokens, got {x.dtype}")
    _frag.launch(x, y, kw, L, R, bias, has_lr, cfg, rot)


_LAUNCH = {"frag": _launch_frag, "mma": _launch_mma, "gemv": _launch_gemv, "gemm": _launch_gemm}


def candidates(kw: KernelWeight, m: int, dtype: torch.dtype | None = None, has_lr: bool = False) -> list[Config]:
    """Configurations :func:`tune` tries for ``m`` tokens (of ``dtype``; ``has_lr``: with a low-rank
    term). Where the tensor-core
    kernel reads the format it replaces the GEMV from 3 tokens on (measured 2× faster at 4 tokens
    on an H200, 6× at 16)."""
    if kw.layout == "frag":
        return _frag.candidates(kw, m, dtype, has_lr)
    out: list[Config] = []
    mma = m <= 16 and dtype is not None and mma_ok(kw, dtype)
    if mma:
        for bn, warps in ((64, 4), (128, 4), (128, 8)):
            for stages in (2, 3):
                for occ in (2.0, 4.0):
                    out.append(Config(kind="mma", bn=bn, bm=16, warps=warps, stages=stages, occ=occ))
    if m <= 2 or (m <= 16 and not mma):
        shapes = ((32, 4, 0), (32, 8, 0), (64, 4, 128), (64, 8, 0), (128, 4, 168), (128, 8, 0)) if mma else \
            ((32, 4, 0), (64, 4, 96), (64, 4, 128), (128, 4, 128), (128, 4, 168), (128, 8, 0))
        for bn, warps, regs in shapes:
            if not _fast(kw, bn) and _fast(kw, 16):
                continue
            for occ in ((4.0, 8.0) if mma else (2.0, 4.0, 8.0)):
                for pf in ((1, 2) if m == 1 else (1,)):
                    out.append(Config(kind="gemv", bn=bn, warps=warps, occ=occ, maxnreg=regs, pf=pf))
    if m > 16:
        out.append(Config(kind="dequant"))
    if (8 if mma else 2) <= m <= 128:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        for bn, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3)):
            if bm >= 128 and bn == 256:
                continue
            if not _fast(kw, bn) and _fast(kw, 32):
                continue
            for occ in (1.0, 2.0, 4.0):
                out.append(Config(kind="gemm", bm=bm, bn=bn, warps=warps if bm < 128 else 8,
                                  stages=stages, occ=occ))
    return out


def quick_candidates(kw: KernelWeight, m: int, dtype: torch.dtype | None = None,
                     has_lr: bool = False) -> list[Config]:
    """What a model's load times (``kernels.tuned_config``): a few configurations of the fragment
    layout at one token; none elsewhere (the default stays)."""
    return _frag.quick_candidates(kw, m, dtype, has_lr) if kw.layout == "frag" else []


def time_call(fn, rep_ms: int = 20, graph: bool = True) -> float:
    """Median milliseconds of ``fn`` (CUDA events, L2 flushed before each call). With ``graph``,
    ``fn`` is captured once in a CUDA graph and the replays are timed: the device-side time,
    without the host's launch overhead."""
    from triton.testing import do_bench

    fn()
    if graph:
        fn = _graph([fn]).replay
    return do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")


def _graph(fns) -> torch.cuda.CUDAGraph:
    """``fns`` called in order, warmed up on a side stream and then captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def time_calls(fns, reps: int = 60) -> float:
    """Median milliseconds per call of ``fns`` run back to back, captured in one CUDA graph (CUDA
    events around each replay, divided by ``len(fns)``). With each call on its own copy of the
    weights and the copies together larger than the L2 cache, this is what a decoder sees layer
    after layer: cold weights, no host launch cost, no flush between calls."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = _graph(fns)
    for _ in range(3):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in ev)
    return times[len(times) // 2] / len(fns)


def cold_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of an ``nbytes`` operand together exceed 2.5× the L2 cache (2 to 64), so that
    back-to-back calls on them read every byte from memory."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    return int(min(64, max(2, -(-int(2.5 * l2) // max(nbytes, 1)))))


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def clone_weight(kw: KernelWeight) -> KernelWeight:
    """A copy of a prepared weight in new memory (its own scratch counters)."""
    fix = kw.fix and SparseFix(rowptr=kw.fix.rowptr.clone(), col=kw.fix.col.clone(), val=kw.fix.val.clone())
    return replace(kw, qweight=kw.qweight.clone(), scale=kw.scale.clone(), offset=_clone(kw.offset),
                   lut=_clone(kw.lut), fix=fix, cache={})


_FAILED: set[tuple] = set()  # (config, format, layout, tokens, dtype, low-rank) that raised: not retried


def tune(x: torch.Tensor, kw: KernelWeight, L=None, R=None, bias=None,
         configs: list[Config] | None = None, rep_ms: int = 20, cold: bool = True,
         report=None) -> tuple[Config, float]:
    """Time candidate configs for this input shape and remember the best for this shape, format and
    token count. Returns it and its milliseconds per call. ``cold`` (the default): back-to-back
    calls on rotating copies of the weight and L, R (:func:`time_calls`), as layers run in a decoder;
    else isolated calls with the L2 flushed before each (:func:`time_call`). The two can rank
    configurations differently (an H200, 4096×14336 4-bit rank 32: the isolated choice took 17.38
    µs back to back where other candidates took 16.86; bench/KERNELS.md).

    A config that raises (does not compile or fit for this format) is skipped, and not tried again in
    this process for the same format, token count and dtype: its compile attempt (up to tens of
    seconds for the unrolled fragment kernels) would fail the same way for every other shape.
    ``report(cfg, ms or None, seconds)``: called after each candidate (ms None: it failed), e.g. to
    show progress; seconds include compiling it."""
    m = x.reshape(-1, kw.shape[1]).shape[0]
    has_lr = with_lr(L, R)
    ops = [(kw, L, R)]
    if cold and x.is_cuda:
        lr = sum(t.numel() * t.element_size() for t in (L, R) if t is not None)
        ops += [(clone_weight(kw), _clone(L), _clone(R)) for _ in range(cold_copies(kw.nbytes() + lr, x.device) - 1)]
    reps = max(10, rep_ms * 3)
    best = (None, float("inf"))
    for cfg in configs or candidates(kw, m, x.dtype, has_lr):
        fail_key = (cfg, kw.spec, kw.layout, m, x.dtype, has_lr)
        if fail_key in _FAILED:
            continue
        t0 = time.time()
        try:
            if len(ops) > 1:
                ms = time_calls([lambda o=o, c=cfg: linear(x, o[0], o[1], o[2], bias, config=c) for o in ops], reps)
            else:
                ms = time_call(lambda: linear(x, kw, L, R, bias, config=cfg), rep_ms)
        except Exception:  # a config that does not compile/fit on this device (e.g. shared memory)
            if x.is_cuda:
                torch.cuda.synchronize()
            _FAILED.add(fail_key)
            ms = None
        if report is not None:
            report(cfg, ms, time.time() - t0)
        if ms is not None and ms < best[1]:
            best = (cfg, ms)
    if best[0] is not None:
        _TUNED[_tune_key(kw, m, has_lr, x.dtype)] = best[0]
    return best


def set_config(kw: KernelWeight, m: int, has_lr: bool, dtype: torch.dtype, cfg: Config) -> None:
    _TUNED[_tune_key(kw, m, has_lr, dtype)] = cfg


def forget_tuned() -> None:
    """Drop every tuned configuration of this process: calls take the defaults again."""
    _TUNED.clear()


# raise when the kernels, Config or the tuning candidates change: configurations kept under older keys are not read
KERNELS_REVISION = 3


def config_key(x: torch.Tensor, kw: KernelWeight, L=None, R=None) -> str:
    """A text key under which a tuned configuration for this call can be kept across processes: the
    kernels' revision, triton's version, the GPU (name, SMs, compute capability), and what the
    per-process choice is keyed by (shape, layout, format, token bucket, dtype), with the rank."""
    m = x.reshape(-1, kw.shape[1]).shape[0]
    rank = L.shape[1] if L is not None and R is not None else 0
    shape, spec, mb, _, dt = _tune_key(kw, m, rank > 0, x.dtype)
    if x.is_cuda:
        p = torch.cuda.get_device_properties(x.device)
        gpu = f"{p.name}/{p.multi_processor_count}sm/sm{p.major}{p.minor}"
    else:
        gpu = x.device.type
    fmt = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    return "|".join(map(str, (f"r{KERNELS_REVISION}", triton.__version__, gpu, f"{shape[0]}x{shape[1]}", kw.layout,
                              fmt, mb, f"rank{rank}", str(dt).removeprefix("torch."))))


__all__ = ["Config", "linear", "bind", "BoundLinear", "dequantize", "tune", "time_call", "time_calls", "cold_copies", "clone_weight",
           "candidates", "default_config", "set_config", "config_key", "mma_ok"]
