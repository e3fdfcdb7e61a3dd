"""Tensor-core GEMV for 1–16 tokens over the fragment layout (:func:`.layout.frag_pack`).

Imported lazily (it imports triton). One program = ``NW`` warps × 16 output rows each × a range of
k blocks (split-K). Every tensor is 1-D with one element per thread, so element r *is* lane r % 32
of warp r // 32, and each 32-bit word a lane loads is, after one shift and one ``lop3``, one
register of its ``mma.m16n8k16`` A fragment: two bf16/fp16 values v = 2ᵇ + code (exact). The
B fragment is x itself, read as 32-bit pairs (lane 4g + q reads token g's x at k = 4q … 4q + 3 of
each 16-k chunk); tokens 8–15 take a second ``mma`` on the same A registers. So a weight costs
about one instruction (decode) where a CUDA-core GEMV spends three to six, and batch 8 costs what
batch 1 does.

The fp32 accumulators of a group's chunks are scaled once per group: y[n] = Σ_g a[n, g]·(V·x)_g +
b[n, g]·xs[g] with a = s and b = o − s·2ᵇ (rtn) or b = −s·(2ᵇ + 2ᵇ⁻¹) (rtn_sym), xs[g] the group
sums of x, which a second ``mma`` with A = ones accumulates alongside (each program adds the
offsets' share of its own part of a group: no prologue, no wait). A step of U k blocks issues all
the next step's loads (16-byte word loads, the B fragments, the raw parameter words of every group
that can end in it: one 8-byte load per lane and group, decoded only where used) before it uses its
own. At one token, ``Config(xs=1)`` requests x's words of a step once instead (one 8-byte load per
lane and 64 words: 2 registers in flight where the B fragments take 2 per 16-k chunk) and hands each
chunk its B fragment by two warp shuffles (a tuning candidate at one token, with U = 4 or 6 programs
per SM: bench/KERNELS.md). The first programs of the grid compute t = R·x (as bf16/fp16, like the
torch path) and the last of them raises a ready flag per block of rows; K-splits write fp32
partials and the last program of a block to finish (atomic counter) reads its flag with the partials
(8 per round trip), sums them, adds the bias and the low-rank term L·t (one more ``mma`` chunk per
16 of rank, L read as the A fragment, its loads issued before the handshake) and lowers the flag.
Counters and flags reset themselves: a call is one launch and CUDA-graph safe. More than 16 tokens:
one launch per 16 (the default up to SLICED_MAX_M), else the weight decoded to dense
(_frag_dequant_kernel) and cuBLAS.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._jit import _rx_partial
from ._rotate import _tile_two, gdc_wait
from .layout import KernelWeight, frag_kblock

# R·x partials done; then a split-K counter per block of rows; then (with a low-rank term) a t-ready flag per block
_NC = 1
# inline PTX on GPUs; triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported)
# cannot run it and takes the emulations below
ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
N_COUNTERS = tl.constexpr(_NC)
KC = 256  # k's per program of the R·x prologue
# one thread (the first) reads a count at $1 until it reaches $2, pausing between reads, then acquires
_SPIN = tl.constexpr("""{
    .reg .pred p;
    .reg .b32 t;
    mov.u32 t, %tid.x;
    setp.ne.u32 p, t, 0;
    @p bra DONE;
    WAIT:
    ld.relaxed.gpu.global.b32 t, [$1];
    setp.lt.s32 p, t, $2;
    @!p bra READY;
    nanosleep.u32 32;
    bra WAIT;
    READY:
    fence.acq_rel.gpu;
    DONE:
    mov.b32 $0, 0;
}""")
PSUM_UNROLL = 8  # split-K partials per round trip of a block's final program (masked beyond SPLIT: one
# compiled kernel for every split > 1, so that precompiling on a small matrix covers every shape)


@triton.jit
def _lop3(t, MASK: tl.constexpr, ONE: tl.constexpr):
    """(t & MASK) | ONE in one instruction (ptxas splits it in two otherwise)."""
    if not ASM:  # triton's CPU interpreter
        return (t & MASK) | ONE
    return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                     [t, tl.full(t.shape, MASK, tl.int32), tl.full(t.shape, ONE, tl.int32)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _pair(w, p: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Slot p of both halves of w -> one register of two fp16 (DT 1) / bf16 (DT 2) values 2ᵇ + code."""
    MB: tl.constexpr = 10 if DT == 1 else 7  # mantissa bits
    EB: tl.constexpr = 15 if DT == 1 else 127  # exponent bias
    SH: tl.constexpr = BITS * p - (MB - BITS)
    if SH > 0:
        t = w >> SH
    elif SH < 0:
        t = w << (-SH)
    else:
        t = w
    M1: tl.constexpr = ((1 << BITS) - 1) << (MB - BITS)
    O1: tl.constexpr = (EB + BITS) << MB
    return _lop3(t, M1 | (M1 << 16), O1 | (O1 << 16))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, DT: tl.constexpr):
    """One warp-wide mma.m16n8k16 (fp32 accumulate); each argument is one register per lane."""
    if not ASM:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, DT)
    if DT == 1:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
            "{$8, $9}, {$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
            [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
            "{$8, $9}, {$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
            [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)


@triton.jit
def _half(v, HI: tl.constexpr, DT: tl.constexpr):
    """The low (HI false) or high 16-bit half of each int32 as an fp16 (DT 1) / bf16 value, in fp32."""
    h = v >> 16 if HI else v
    h = (h & 0xFFFF).to(tl.int16)
    if DT == 1:
        return h.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return h.to(tl.bfloat16, bitcast=True).to(tl.float32)


@triton.jit
def _kmat(lo, hi, DT: tl.constexpr):
    """(For _mma_emulated.) A warp's 8 groups of 4 lanes as (warps, 8, 16) fp32: lane 4g + q's two
    registers (both halves each) at [g, 4q … 4q + 3]: one fixed order of the 16 k's, the same for A
    rows (registers a0, a2 or a1, a3) and B columns (b0, b1)."""
    v = tl.join(tl.join(_half(lo, False, DT), _half(lo, True, DT)), tl.join(_half(hi, False, DT), _half(hi, True, DT)))
    return tl.reshape(v, [lo.shape[0] // 32, 8, 16])


@triton.jit
def _cfrag(c0, c1, p):
    """(For _mma_emulated.) c0 + p[g, 2q], c1 + p[g, 2q + 1] for lane 4g + q of each warp (p: warps × 8 × 8)."""
    even, odd = tl.split(tl.reshape(p, [p.shape[0], 8, 4, 2]))
    return c0 + tl.reshape(even, [c0.shape[0]]), c1 + tl.reshape(odd, [c0.shape[0]])


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, DT: tl.constexpr):
    """mma.m16n8k16 computed from the PTX fragment layouts (for triton's CPU interpreter, which cannot
    run the inline PTX): lane 4g + q holds A rows g / g + 8 at k 2q, 2q + 1 (a0, a1) and 2q + 8,
    2q + 9 (a2, a3), B column g at the same k's (b0, b1), and C rows g / g + 8 at columns 2q, 2q + 1.
    Each warp's A and B as small matrices, one broadcast product each for rows 0-7 and 8-15 (fp32 sums
    of exact products, in another order than the tensor cores': equal to rounding)."""
    b = _kmat(b0, b1, DT)[:, None, :, :]  # (warps, 1, n, k)
    top = tl.sum(_kmat(a0, a2, DT)[:, :, None, :] * b, axis=3)  # (warps, row g, column n)
    bot = tl.sum(_kmat(a1, a3, DT)[:, :, None, :] * b, axis=3)  # rows g + 8
    c0, c1 = _cfrag(c0, c1, top)
    c2, c3 = _cfrag(c2, c3, bot)
    return c0, c1, c2, c3


@triton.jit
def _xpair(xrow, xo, K2, MASKED: tl.constexpr):
    """The lane's B-fragment registers: x's 32-bit pairs xo and xo + 1 of its token's row (one 8-byte
    load; zero past K in the masked tail block)."""
    j = tl.arange(0, 2)
    ptr = xrow[:, None] + xo[:, None] + j[None, :]
    if MASKED:
        v = tl.load(ptr, mask=(xo[:, None] + j[None, :]) < K2, other=0)
    else:
        v = tl.load(ptr)
    return tl.split(v)


@triton.jit
def _shfl(v, src):
    """Each lane's value of v from lane src of its warp (one warp shuffle)."""
    if not ASM:
        r = tl.arange(0, v.shape[0])
        return tl.gather(v, r - r % 32 + src, 0)
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [v, src],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _zeros(n: tl.constexpr, c: tl.constexpr):
    z = tl.zeros([n], dtype=tl.float32)
    out = ()
    for _ in tl.static_range(c):
        out = out + (z,)
    return out


@triton.jit
def _chunk(W, X, xrow0, xrow1, xo, K2, C, c: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
           MT: tl.constexpr, XP: tl.constexpr, MASKED: tl.constexpr):
    """One 16-k chunk: decode the lane's four A registers (pairs 4c … 4c + 3 of its words W), take
    the B fragment (prefetched in X with XP, else loaded here), mma into C[0:4] [and C[4:8] for
    tokens 8-15, on the same A registers]; one more mma with A = ones adds the chunk's sums of x
    (the offsets' share needs them) into C[8:12] [C[12:16]]: every row of that product is the same,
    so C[8], C[9] hold the sums for tokens 2q, 2q + 1 (C[10], C[11] repeat them)."""
    PW: tl.constexpr = 16 // BITS
    a0 = _pair(W[(4 * c) // PW], (4 * c) % PW, BITS, DT)
    a1 = _pair(W[(4 * c + 1) // PW], (4 * c + 1) % PW, BITS, DT)
    a2 = _pair(W[(4 * c + 2) // PW], (4 * c + 2) % PW, BITS, DT)
    a3 = _pair(W[(4 * c + 3) // PW], (4 * c + 3) % PW, BITS, DT)
    ONE: tl.constexpr = 0x3C003C00 if DT == 1 else 0x3F803F80  # two 1.0 in fp16 / bf16
    one = tl.full(a0.shape, ONE, tl.int32)
    if XP:
        b0, b1 = X[2 * c], X[2 * c + 1]
    else:
        b0, b1 = _xpair(xrow0, xo, K2, MASKED)
    c0, c1, c2, c3 = _mma(a0, a1, a2, a3, b0, b1, C[0], C[1], C[2], C[3], DT)
    s0, s1, s2, s3 = _mma(one, one, one, one, b0, b1, C[8], C[9], C[10], C[11], DT)
    d0, d1, d2, d3, t0, t1, t2, t3 = C[4], C[5], C[6], C[7], C[12], C[13], C[14], C[15]
    if MT == 2:
        e0, e1 = _xpair(xrow1, xo, K2, MASKED)
        d0, d1, d2, d3 = _mma(a0, a1, a2, a3, e0, e1, d0, d1, d2, d3, DT)
        t0, t1, t2, t3 = _mma(one, one, one, one, e0, e1, t0, t1, t2, t3, DT)
    return (c0, c1, c2, c3, d0, d1, d2, d3, s0, s1, s2, s3, t0, t1, t2, t3)


@triton.jit
def _words(qp, kb, ok, MASKED: tl.constexpr = True):
    """The lane's 4 words of k block kb, one 16-byte load (MASKED: none where ok is false, those
    registers are never used), as a tuple of the A-fragment words."""
    if MASKED:
        v = tl.load(qp[:, None] + kb * 128 + tl.arange(0, 4)[None, :], mask=ok)
    else:
        v = tl.load(qp[:, None] + kb * 128 + tl.arange(0, 4)[None, :])
    v02, v13 = tl.split(v.reshape([qp.shape[0], 2, 2]))
    w0, w2 = tl.split(v02)
    w1, w3 = tl.split(v13)
    return w0, w1, w2, w3


@triton.jit
def _load_group(qp, xrow0, q, kb, kend, R, SROW, U: tl.constexpr, NCH: tl.constexpr, XP: tl.constexpr,
                G: tl.constexpr, NGI: tl.constexpr, MODE: tl.constexpr, PDT: tl.constexpr, CLAMP: tl.constexpr,
                X1: tl.constexpr = False):
    """One step's loads, all issued here, a step before their use: the lane's 4 words of each of
    blocks kb … kb + U − 1 (one 16-byte load each), with XP the B-fragment registers of their
    chunks, and the parameter words of the NGI groups from the one holding k = kb·KB (every group
    that can end in the step); as three tuples. Blocks from kend on are never used: masked off (their
    registers are zeroed before each load), or with CLAMP (needs kend ≥ 1) block kend − 1 and group
    SROW − 1 are read again instead, unmasked. X1 (one token): the step's x words once, lane l holding
    pairs 2l, 2l + 1 of each 64 (one 8-byte load per 64 words), for _step to shuffle into B fragments."""
    KB: tl.constexpr = 16 * NCH
    KW: tl.constexpr = KB // 2  # x's 32-bit words per block
    ws = ()
    xs = ()
    if X1:
        lane2 = 2 * (tl.arange(0, qp.shape[0]) % 32)
        for j in tl.static_range((U * KW + 63) // 64):
            w = 64 * j + lane2  # the lane's pair of words within the step
            ok = (w < U * KW) & (kb + w // KW < kend)
            v = tl.load(xrow0[:, None] + (kb * KW + w)[:, None] + tl.arange(0, 2)[None, :], mask=ok[:, None])
            b0, b1 = tl.split(v)
            xs = xs + (b0, b1)
    for u in tl.static_range(U):
        if CLAMP:
            kc = tl.minimum(kb + u, kend - 1)
            w0, w1, w2, w3 = _words(qp, kc, True, False)
        else:
            kc = kb + u
            ok = kc < kend
            w0, w1, w2, w3 = _words(qp, kc, ok, True)
        ws = ws + (w0, w1, w2, w3)
        if XP and not X1:
            for c in tl.static_range(NCH):
                xo = kc * KW + 8 * c + 2 * q
                xp = xrow0[:, None] + xo[:, None] + tl.arange(0, 2)[None, :]
                if CLAMP:
                    b0, b1 = tl.split(tl.load(xp))
                else:
                    b0, b1 = tl.split(tl.load(xp, mask=ok))
                xs = xs + (b0, b1)
    ps = ()
    for i in tl.static_range(NGI):
        ps = ps + (_params(R[0], R[1], (kb * KB) // G + i, SROW, MODE, PDT, CLAMP),)
    return ws, xs, ps


@triton.jit
def _params(p_ptr, pbase, gi, SROW, MODE: tl.constexpr, PDT: tl.constexpr, CLAMP: tl.constexpr = False):
    """Group gi's parameters of the lane's two rows, one load of the fragment-ordered tensor: (s_g,
    s_g+8, o_g, o_g+8) (rtn) or (s_g, s_g+8) (rtn_sym), as raw 32-bit words (decoded by _ab where
    used, so that nothing waits for the load before then). Groups from SROW on are never used:
    masked off, or with CLAMP group SROW − 1 is read instead."""
    NWD: tl.constexpr = (4 if MODE == 0 else 2) // (2 if PDT < 3 else 1)  # words per lane and group
    j = tl.arange(0, NWD)
    wp = p_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + j[None, :]
    if CLAMP:
        w = tl.load(wp + (pbase[:, None] + tl.minimum(gi, SROW - 1) * 8) * NWD)
    else:
        w = tl.load(wp + (pbase[:, None] + gi * 8) * NWD, mask=gi < SROW)
    if NWD == 1:
        w = w.reshape([pbase.shape[0]])
    return w


@triton.jit
def _pval(w, HI: tl.constexpr, PDT: tl.constexpr):
    """A parameter as fp32 from its 32-bit word (PDT 1 fp16 / 2 bf16: the low or high half; 3 fp32)."""
    if PDT == 3:
        return w.to(tl.float32, bitcast=True)
    return _half(w, HI, PDT)


@triton.jit
def _ab(v, MODE: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr, PDT: tl.constexpr):
    """(a0, a1, b0, b1) of both rows from _params' words: y += a·(mma sum) + b·(sum of x) with a = s
    and b = o − s·2ᵇ (rtn) or −s·(2ᵇ + 2ᵇ⁻¹) (rtn_sym)."""
    if PDT == 3:
        if MODE == 0:
            ss, oo = tl.split(v.reshape([v.shape[0], 2, 2]))  # (s_g, s_g+8), (o_g, o_g+8)
            w0, w1 = tl.split(ss)
            w2, w3 = tl.split(oo)
            s0, s1, o0, o1 = _pval(w0, False, 3), _pval(w1, False, 3), _pval(w2, False, 3), _pval(w3, False, 3)
        else:
            w0, w1 = tl.split(v)
            s0, s1 = _pval(w0, False, 3), _pval(w1, False, 3)
    else:
        if MODE == 0:
            w0, w1 = tl.split(v)
            s0, s1, o0, o1 = _pval(w0, False, PDT), _pval(w0, True, PDT), _pval(w1, False, PDT), _pval(w1, True, PDT)
        else:
            s0, s1 = _pval(v, False, PDT), _pval(v, True, PDT)
    if MODE == 0:
        return s0, s1, o0 - s0 * VS, o1 - s1 * VS
    else:
        return s0, s1, -s0 * (VS + HALF), -s1 * (VS + HALF)


@triton.jit
def _flush(A, C, Pw, MODE: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr, PDT: tl.constexpr):
    """A group ends (or this program's part of it): A += a·C + b·(C's sums of x) with the group's
    parameter words Pw (_params); C = 0."""
    sa, sb, ba, bb = _ab(Pw, MODE, VS, HALF, PDT)
    a0 = A[0] + sa * C[0] + ba * C[8]
    a1 = A[1] + sa * C[1] + ba * C[9]
    a2 = A[2] + sb * C[2] + bb * C[8]
    a3 = A[3] + sb * C[3] + bb * C[9]
    a4 = A[4] + sa * C[4] + ba * C[12]
    a5 = A[5] + sa * C[5] + ba * C[13]
    a6 = A[6] + sb * C[6] + bb * C[12]
    a7 = A[7] + sb * C[7] + bb * C[13]
    return (a0, a1, a2, a3, a4, a5, a6, a7), _zeros(C[0].shape[0], 16)


@triton.jit
def _group_words(PS, gq, gi, R, SROW, NGI: tl.constexpr, MODE: tl.constexpr, PDT: tl.constexpr,
                 CLAMP: tl.constexpr):
    """Group gi's parameter words: PS[gi − gq] of the NGI requested with this step's words, or (NGI
    0: the tail block) loaded now."""
    if NGI == 0:
        v = _params(R[0], R[1], gi, SROW, MODE, PDT, CLAMP)
    else:
        d = gi - gq
        v = PS[NGI - 1]
        for i in tl.static_range(NGI - 1):
            v = tl.where(d == NGI - 2 - i, PS[NGI - 2 - i], v)
    return v


@triton.jit
def _block(kb, W, X, PS, gq, xrow0, xrow1, q, K2, A, C, R, SROW, BITS: tl.constexpr, MODE: tl.constexpr,
           G: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr, DT: tl.constexpr, MT: tl.constexpr,
           XP: tl.constexpr, MASKED: tl.constexpr, NGI: tl.constexpr, PDT: tl.constexpr,
           CLAMP: tl.constexpr = False, US: tl.constexpr = -1, G0: tl.constexpr = 0):
    """All chunks of k block kb (the lane's words W, B fragments X), with the group flushes that
    fall inside it (parameters PS of groups gq … gq + NGI − 1, see _group_words). US ≥ 0: kb is
    block US from a group boundary, and PS's first group is group G0 from there (see _step), so where
    groups end and which of PS each one takes are known at compile time (no runtime test, no select)."""
    NCH: tl.constexpr = 16 // BITS  # 16-k chunks per block (4 words × P pairs / 4 registers)
    KB: tl.constexpr = 16 * NCH
    CPG: tl.constexpr = G // 16  # chunks per group
    for c in tl.static_range(NCH):
        xo = kb * (KB // 2) + 8 * c + 2 * q  # x's 32-bit pair index of k = kb·KB + 16c + 4q
        C = _chunk(W, X, xrow0, xrow1, xo, K2, C, c, BITS, DT, MT, XP, MASKED)
        gc = kb * NCH + c
        if US >= 0:  # chunk US·NCH + c counted from the boundary: a group ends after every CPG-th
            if (US * NCH + c + 1) % CPG == 0:
                A, C = _flush(A, C, PS[(US * NCH + c) // CPG - G0], MODE, VS, HALF, PDT)
        elif NCH % CPG == 0:  # groups end at fixed chunks of every block
            if (c + 1) % CPG == 0:
                pw = _group_words(PS, gq, gc // CPG, R, SROW, NGI, MODE, PDT, CLAMP)
                A, C = _flush(A, C, pw, MODE, VS, HALF, PDT)
        elif CPG % NCH == 0:  # a group spans whole blocks
            if c == NCH - 1:
                if (kb + 1) % (CPG // NCH) == 0:
                    pw = _group_words(PS, gq, gc // CPG, R, SROW, NGI, MODE, PDT, CLAMP)
                    A, C = _flush(A, C, pw, MODE, VS, HALF, PDT)
        else:
            if (gc + 1) % CPG == 0:
                pw = _group_words(PS, gq, gc // CPG, R, SROW, NGI, MODE, PDT, CLAMP)
                A, C = _flush(A, C, pw, MODE, VS, HALF, PDT)
    return A, C


@triton.jit
def _xfrag(xs, q, W0: tl.constexpr):
    """The B fragment of the chunk whose x words start at W0 within the step (lane q takes words
    W0 + 2q, W0 + 2q + 1: pair (W0 % 64) / 2 + q of load W0 / 64 in _load_group's X1 layout)."""
    src = (W0 % 64) // 2 + q
    return _shfl(xs[2 * (W0 // 64)], src), _shfl(xs[2 * (W0 // 64) + 1], src)


@triton.jit
def _step(kb, kf, ws, xs, ps, xrow0, xrow1, q, K2, A, C, R, SROW, BITS: tl.constexpr, MODE: tl.constexpr,
          G: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr, DT: tl.constexpr, MT: tl.constexpr,
          XP: tl.constexpr, NGI: tl.constexpr, PDT: tl.constexpr, U: tl.constexpr, X1: tl.constexpr = False,
          OFF: tl.constexpr = -1):
    """Blocks kb … kb + U − 1 (those before kf) from one step's loads (_load_group); X1: each chunk's
    B fragment (x's words 8c + 2q, 8c + 2q + 1 of its block) shuffled from the lane that loaded it.
    OFF ≥ 0: kb is OFF blocks past a group boundary (group ends known at compile time); −1: unknown."""
    NCH: tl.constexpr = 16 // BITS
    KB: tl.constexpr = 16 * NCH
    CPG: tl.constexpr = G // 16
    G0: tl.constexpr = (OFF * NCH) // CPG if OFF >= 0 else 0  # ps[0]'s group, counted from the boundary
    for u in tl.static_range(U):
        if kb + u < kf:
            X = ()
            if X1:
                for c in tl.static_range(NCH):
                    X = X + _xfrag(xs, q, (KB // 2) * u + 8 * c)
            elif XP:
                for c in tl.static_range(2 * NCH):
                    X = X + (xs[2 * NCH * u + c],)
            A, C = _block(kb + u, (ws[4 * u], ws[4 * u + 1], ws[4 * u + 2], ws[4 * u + 3]), X, ps, (kb * KB) // G,
                          xrow0, xrow1, q, K2, A, C, R, SROW, BITS, MODE, G, VS, HALF, DT, MT, XP, False, NGI, PDT,
                          False, OFF + u if OFF >= 0 else -1, G0)
    return A, C


@triton.jit
def _rx_work(tid, x_ptr, r_ptr, tp_ptr, t_ptr, cnt_ptr, M, K, NTC, RANK, NB, stride_xm, RP: tl.constexpr,
             KC_: tl.constexpr, NW: tl.constexpr):
    """Partial t = R[:, chunk]·x[m, chunk] over KC_ k's; the last partial to finish sums them all
    (fixed order: the same t on every call) into t (M, RP) in x's dtype, resets the partials'
    counter and raises every block's ready flag."""
    _rx_partial(tid, x_ptr, r_ptr, tp_ptr, M, K, RANK, stride_xm, RP, KC_)
    tl.debug_barrier()
    r_off = tl.arange(0, RP)
    if tl.atomic_add(cnt_ptr, 1) == NTC * M - 1:
        c_off = tl.arange(0, 64)
        for mm in range(0, M):
            tv = tl.zeros([64, RP], dtype=tl.float32)
            for c0 in range(0, NTC, 64):  # 64 partials per round trip
                cc = c0 + c_off
                tv += tl.load(tp_ptr + (cc[:, None] * M + mm) * RP + r_off[None, :], mask=(cc < NTC)[:, None],
                              other=0.0, cache_modifier=".cg")
            tl.store(t_ptr + mm * RP + r_off, tl.sum(tv, axis=0).to(t_ptr.dtype.element_ty))
        tl.store(cnt_ptr, 0)  # every partial has arrived
        tl.debug_barrier()
        f_off = tl.arange(0, 32 * NW)
        for f0 in range(0, NB, 32 * NW):  # release: t is written before any flag reads 1
            tl.atomic_xchg(cnt_ptr + N_COUNTERS + NB + f0 + f_off, 1, mask=f0 + f_off < NB)


@triton.jit
def _prefetch_l2(p):
    """Bring the line of each lane's address p into the L2 (no registers loaded)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_first(qp, kb0, kb1, N: tl.constexpr):
    """Bring a program's first N blocks of words (of kb0 .. kb1 - 1) into the L2 before it waits for x."""
    for u in tl.static_range(N):
        _prefetch_l2(qp + tl.maximum(tl.minimum(kb0 + u, kb1 - 1), 0) * 128)


@triton.jit
def _t_ready(flag_ptr, rdy):
    """Wait for this block's t-ready flag (``rdy``: a relaxed read issued earlier, so its round trip
    overlapped other loads), acquire, then lower the flag for the next call (only this program reads it)."""
    while rdy < 1:
        rdy = _flag_read(flag_ptr)
    if ASM:  # acquire: t's loads below see what the R·x program wrote before it raised the flag
        rdy = tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [rdy], dtype=tl.int32,
                                        is_pure=False, pack=1)
    tl.debug_barrier()  # every lane has seen it
    tl.store(flag_ptr, rdy - rdy)


@triton.jit
def _finish(v, row, tok, N, M, y_ptr, b_ptr, sy, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        v += tl.load(b_ptr + row, mask=row < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + tok * sy + row, v.to(y_ptr.dtype.element_ty), mask=(row < N) & (tok < M))


@triton.jit
def _part(ws_ptr, v, row, tok, ks, N, M):
    tl.store(ws_ptr + (ks * M + tok) * N + row, v, mask=(row < N) & (tok < M))


@triton.jit
def _psum(ws_ptr, row0, row1, tokA, tokB, N, M, SPLIT, SU: tl.constexpr):
    """Σ of the SPLIT partials of a thread's four (row, token) results, SU partials per round trip:
    the 4·SU loads are all issued before the first is used (a loop per result over SPLIT waited once
    per few partials and result)."""
    t0 = tl.zeros(row0.shape, dtype=tl.float32)
    t1 = tl.zeros(row0.shape, dtype=tl.float32)
    t2 = tl.zeros(row0.shape, dtype=tl.float32)
    t3 = tl.zeros(row0.shape, dtype=tl.float32)
    m0 = (row0 < N) & (tokA < M)
    m1 = (row0 < N) & (tokB < M)
    m2 = (row1 < N) & (tokA < M)
    m3 = (row1 < N) & (tokB < M)
    for s0 in range(0, SPLIT, SU):
        for j in tl.static_range(SU):
            s = s0 + j
            t0 += tl.load(ws_ptr + (s * M + tokA) * N + row0, mask=m0 & (s < SPLIT), other=0.0, cache_modifier=".cg")
            t1 += tl.load(ws_ptr + (s * M + tokB) * N + row0, mask=m1 & (s < SPLIT), other=0.0, cache_modifier=".cg")
            t2 += tl.load(ws_ptr + (s * M + tokA) * N + row1, mask=m2 & (s < SPLIT), other=0.0, cache_modifier=".cg")
            t3 += tl.load(ws_ptr + (s * M + tokB) * N + row1, mask=m3 & (s < SPLIT), other=0.0, cache_modifier=".cg")
    return t0, t1, t2, t3


@triton.jit
def _flag_read(flag_ptr):
    """A relaxed read of a flag, issued where it stands (inline PTX: not sunk past later loads)."""
    if ASM:
        return tl.inline_asm_elementwise("ld.relaxed.gpu.global.b32 $0, [$1];", "=r,l", [flag_ptr], dtype=tl.int32,
                                         is_pure=False, pack=1)
    else:
        return tl.atomic_add(flag_ptr, 0, sem="relaxed")


@triton.jit
def _lfrag(row0, row1, l32_ptr, N, RANK, RP: tl.constexpr):
    """L (N, RANK) as the A fragments of the low-rank term (32-bit pairs, one tuple entry per register
    of each 16-rank chunk): loaded before a program knows whether it finishes its block of rows, so
    their latency hides behind the split-K handshake."""
    q = tl.arange(0, row0.shape[0]) % 4
    r2 = RANK // 2  # 32-bit pairs per row of L
    out = ()
    for c in tl.static_range(RP // 16):
        p = 8 * c + 2 * q  # pair index of rank 16c + 4q
        out = out + (tl.load(l32_ptr + row0 * r2 + p, mask=(row0 < N) & (p < r2), other=0),
                     tl.load(l32_ptr + row1 * r2 + p, mask=(row1 < N) & (p < r2), other=0),
                     tl.load(l32_ptr + row0 * r2 + p + 1, mask=(row0 < N) & (p + 1 < r2), other=0),
                     tl.load(l32_ptr + row1 * r2 + p + 1, mask=(row1 < N) & (p + 1 < r2), other=0))
    return out


@triton.jit
def _lowrank(v0, v1, v2, v3, lf, tb, t32_ptr, M, RP: tl.constexpr, DT: tl.constexpr):
    """+ L·t for one token group (tokens tb + 0..7): L's A fragments ``lf`` (:func:`_lfrag`), t (M, RP)
    in x's dtype (zero-padded to RP) as the B fragment."""
    lane = tl.arange(0, v0.shape[0]) % 32
    q = lane % 4
    tk = tb + lane // 4
    c0 = tl.zeros(v0.shape, dtype=tl.float32)
    c1 = tl.zeros(v0.shape, dtype=tl.float32)
    c2 = tl.zeros(v0.shape, dtype=tl.float32)
    c3 = tl.zeros(v0.shape, dtype=tl.float32)
    for c in tl.static_range(RP // 16):
        p = 8 * c + 2 * q
        b0 = tl.load(t32_ptr + tk * (RP // 2) + p, mask=tk < M, other=0, cache_modifier=".cg")
        b1 = tl.load(t32_ptr + tk * (RP // 2) + p + 1, mask=tk < M, other=0, cache_modifier=".cg")
        c0, c1, c2, c3 = _mma(lf[4 * c], lf[4 * c + 1], lf[4 * c + 2], lf[4 * c + 3], b0, b1, c0, c1, c2, c3, DT)
    return v0 + c0, v1 + c1, v2 + c2, v3 + c3


@triton.jit
def _final(v0, v1, v2, v3, row0, row1, tb, tok0, y_ptr, b_ptr, lf, t32_ptr, N, M, sy,
           RP: tl.constexpr, DT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr):
    if HAS_LR:
        v0, v1, v2, v3 = _lowrank(v0, v1, v2, v3, lf, tb, t32_ptr, M, RP, DT)
    _finish(v0, row0, tok0, N, M, y_ptr, b_ptr, sy, HAS_BIAS)
    _finish(v1, row0, tok0 + 1, N, M, y_ptr, b_ptr, sy, HAS_BIAS)
    _finish(v2, row1, tok0, N, M, y_ptr, b_ptr, sy, HAS_BIAS)
    _finish(v3, row1, tok0 + 1, N, M, y_ptr, b_ptr, sy, HAS_BIAS)


@triton.jit
def _warp_sums(A, nb, NW: tl.constexpr, MT: tl.constexpr):
    """KWS: the NW warps' sums of the same 16 rows added (through shared memory), as one warp's results
    (lane l: rows nb·16 + l / 4 and + 8, tokens 2(l % 4) and + 1), with those rows and that first token
    (the fragment layout's row0, row1, tokA of a single warp), for :func:`_final`."""
    s = ()
    for i in tl.static_range(4 * MT):
        s = s + (tl.sum(tl.reshape(A[i], [NW, 32]), axis=0),)
    if MT == 1:  # the second token group's, never read
        s = s + s
    lane = tl.arange(0, 32)
    row0 = nb * 16 + lane // 4
    return s, row0, row0 + 8, 2 * (lane % 4)


@triton.jit
def _rot_ready(rc, n):
    """Wait until the rotation's ``n`` programs have counted themselves in at ``rc`` (x' written), then
    acquire: this program's loads of x' see what they stored. On a GPU one thread polls (relaxed reads,
    a short sleep between them: hundreds of programs polling with every thread slowed the rotation's
    own programs), then the program's barrier releases the rest."""
    if ASM:
        tl.inline_asm_elementwise(_SPIN, "=r,l,r", [rc, n], dtype=tl.int32, is_pure=False, pack=1)
    else:
        rdy = _flag_read(rc)
        while rdy < n:
            rdy = _flag_read(rc)
    tl.debug_barrier()  # every thread waits for the polling one


@triton.jit(do_not_specialize=["M", "N", "SROW", "NKB", "BPS", "SPLIT", "NTC", "RANK", "sy", "NROT"])
def _frag_kernel(x_ptr, x32_ptr, y_ptr, q_ptr, p_ptr, b_ptr, l32_ptr, r_ptr, ws_ptr, tp_ptr, t_ptr,
                 t32_ptr, cnt_ptr, xr_ptr, s_ptr, h1_ptr, h2_ptr, M, N, K, K2, SROW, NKB, BPS,
                 SPLIT, NTC, RANK, stride_xm, sx32, sy, NROT, rscale,
                 BITS: tl.constexpr, MODE: tl.constexpr, G: tl.constexpr, VS: tl.constexpr,
                 HALF: tl.constexpr, NW: tl.constexpr, MT: tl.constexpr, DT: tl.constexpr, RP: tl.constexpr,
                 KC_: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                 SPLITK: tl.constexpr, U: tl.constexpr, PDT: tl.constexpr,
                 SU: tl.constexpr, UNR: tl.constexpr, X1: tl.constexpr, WAIT: tl.constexpr,
                 ROT: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, BC: tl.constexpr,
                 OFF1: tl.constexpr, OFF2: tl.constexpr, KWS: tl.constexpr = False):
    # WAIT (a programmatic dependent launch after the input rotation's, which wrote x): wait for that
    # launch before x is read; the main programs first prefetch their first 2U blocks of words into the L2.
    # ROT (one token, the input rotation in this launch): the first NROT programs rotate x (x_ptr) into
    # x' (xr_ptr, read by the main programs as x32_ptr), block by block (:func:`._rotate._tile_two`, R2 //
    # BC programs a block), and count themselves in; the main programs prefetch as with WAIT, wait for
    # that count, and count themselves as readers: the last reader sets both counters back to 0. (No
    # deadlock only because GPUs start a grid's programs in order, so the NROT come first: what CUDA does
    # in practice, not what it promises)
    # KWS (Config(kwarps=1); no K-split, low rank or ROT): the program's NW warps share one block of
    # 16 rows and split its K, BPS blocks each (whole groups), their sums added through shared memory
    NCH: tl.constexpr = 16 // BITS  # 16-k chunks per block
    KB: tl.constexpr = 16 * NCH
    CPG: tl.constexpr = G // 16  # chunks per group
    WB: tl.constexpr = 4 * 32  # words per warp and block
    XP: tl.constexpr = MT == 1  # B fragments requested with the words (one token group only: registers)
    # X1 (one token, Config(xs=1)): the step's x words requested once (2 registers per 64 words instead
    # of 2 per 16-k chunk) and handed to the B fragments by warp shuffles
    NGI: tl.constexpr = (U * KB) // G + 1  # the most groups that can end within one step
    # OFF1, OFF2 (step_offsets): blocks from a group boundary to the start of a step (of the second
    # step of an iteration), −1 where group ends are tested at run time
    OFF0: tl.constexpr = 0 if OFF2 >= 0 else -1  # the first step of an iteration (unroll 2)
    pid = tl.program_id(0)
    if ROT:
        pid -= NROT
    n_pre = NTC * M
    NB = tl.cdiv(N, 16 if KWS else 16 * NW)
    rc = cnt_ptr + N_COUNTERS + 2 * NB  # ROT: counters of the rotation's programs done and of x' readers
    if pid < 0:  # x' = R·x (ROT)
        if ROT:
            tid = pid + NROT
            _tile_two(x_ptr, s_ptr, h1_ptr, h2_ptr, xr_ptr, tid // (R2 // BC), tid % (R2 // BC), rscale, R1, R2, BC)
            tl.debug_barrier()  # every lane's stores issued before the count (release)
            tl.atomic_add(rc, 1, sem="release")
    elif pid < n_pre:  # t = R·x
        if WAIT:
            gdc_wait()
        _rx_work(pid, x_ptr, r_ptr, tp_ptr, t_ptr, cnt_ptr, M, K, NTC, RANK, NB, stride_xm, RP, KC_, NW)
    else:
        wid = pid - n_pre
        nb = wid % NB
        ks = wid // NB
        r = tl.arange(0, 32 * NW)
        lane = r % 32
        g = lane // 4
        q = lane % 4
        rb = nb + 0 * r if KWS else nb * NW + r // 32
        row0 = rb * 16 + g
        row1 = row0 + 8
        tokA = 2 * q  # C-fragment tokens: 2q, 2q + 1 (+ 8 for the second token group)
        tokB = tokA + 1
        qp = q_ptr + rb * (NKB * WB) + 4 * lane
        kb0 = ks * BPS
        kb1 = tl.minimum(kb0 + BPS, NKB)
        wk = (r // 32) * BPS if KWS else 0 * r  # KWS: the warp's first block (its pointers start there)
        qp += wk * WB
        SG = (BPS * KB) // G if KWS else SROW  # groups the (warp's) parameter pointer may read: masks, clamps
        if WAIT:
            _prefetch_first(qp, kb0, kb1, 2 * U)
            gdc_wait()
        seen = 0
        if ROT:
            _prefetch_first(qp, kb0, kb1, 2 * U if ASM else 0)  # (no prefetch in triton's interpreter)
            _rot_ready(rc, NROT)
            seen = tl.atomic_add(rc + 1, 1, sem="relaxed")  # its result is first needed at the end
        # B-fragment rows: token g (and g + 8); lanes past the last token read its row again (their
        # products land in output columns that are never stored)
        xrow0 = x32_ptr + tl.minimum(g, M - 1) * sx32 + wk * (KB // 2)
        xrow1 = x32_ptr + tl.minimum(g + 8, M - 1) * sx32 + wk * (KB // 2)
        R = (p_ptr, rb * (SROW * 8) + g + (wk * KB) // G * 8)
        # fp32 results (row0, tokA), (row0, tokB), (row1, tokA), (row1, tokB), then the same + 8 tokens;
        # C: the current group's mma accumulators in the same order, then its sums of x (_chunk)
        A = _zeros(32 * NW, 8)
        C = _zeros(32 * NW, 16)
        kf = tl.minimum(kb1, K2 // (KB // 2))  # blocks before kf have their x wholly inside K: no masks
        # U blocks per step; the next step's loads (words, B fragments, parameters) are all issued
        # before this step's are used, so a warp has U to 2U blocks (U·512 to 2U·512 bytes of words)
        # in flight
        if UNR == 1:
            ws, xs, ps = _load_group(qp, xrow0, q, kb0, kf, R, SG, U, NCH, XP, G, NGI, MODE, PDT, False, X1)
            for kb in range(kb0, kf, U):
                nw_, nx_, np_ = _load_group(qp, xrow0, q, kb + U, kf, R, SG, U, NCH, XP, G, NGI, MODE, PDT, False, X1)
                A, C = _step(kb, kf, ws, xs, ps, xrow0, xrow1, q, K2, A, C, R, SG, BITS, MODE, G, VS, HALF, DT,
                             MT, XP, NGI, PDT, U, X1, OFF1)
                ws = nw_
                xs = nx_
                ps = np_
        elif kb0 < kf:
            # two steps per iteration on two register sets: a set is loaded after its previous contents
            # were used, so nothing is copied from one iteration to the next (the loop above moves every
            # prefetched register once per step), and unmasked loads (CLAMP) zero no registers first
            ws, xs, ps = _load_group(qp, xrow0, q, kb0, kf, R, SG, U, NCH, XP, G, NGI, MODE, PDT, True, X1)
            for kb in range(kb0, kf, 2 * U):
                w2, x2, p2 = _load_group(qp, xrow0, q, kb + U, kf, R, SG, U, NCH, XP, G, NGI, MODE, PDT, True, X1)
                A, C = _step(kb, kf, ws, xs, ps, xrow0, xrow1, q, K2, A, C, R, SG, BITS, MODE, G, VS, HALF, DT,
                             MT, XP, NGI, PDT, U, X1, OFF0)
                ws, xs, ps = _load_group(qp, xrow0, q, kb + 2 * U, kf, R, SG, U, NCH, XP, G, NGI, MODE, PDT, True, X1)
                A, C = _step(kb + U, kf, w2, x2, p2, xrow0, xrow1, q, K2, A, C, R, SG, BITS, MODE, G, VS, HALF,
                             DT, MT, XP, NGI, PDT, U, X1, OFF2)
        for kb in range(tl.maximum(kb0, kf), kb1):  # the tail block (end of K): x masked
            A, C = _block(kb, _words(qp, kb, kb < kb1), (), (), 0, xrow0, xrow1, q, K2, A, C, R, SG, BITS, MODE, G,
                          VS, HALF, DT, MT, False, True, 0, PDT, UNR == 2)
        # a split (or K) that ends inside a group: scale this program's part of that group (its
        # offsets' share too: the sums of x in C are this program's part of the group's)
        gl = kb1 * NCH - 1
        if (gl + 1) % CPG != 0:
            A, C = _flush(A, C, _params(p_ptr, R[1], gl // CPG, SG, MODE, PDT, UNR == 2), MODE, VS, HALF, PDT)
        lf = ()
        if HAS_LR:  # L's A fragments: in flight during the split-K handshake
            lf = _lfrag(row0, row1, l32_ptr, N, RANK, RP)
        flag = cnt_ptr + N_COUNTERS + NB + nb
        if KWS:
            A, row0, row1, tokA = _warp_sums(A, nb, NW, MT)
        if SPLITK:
            _part(ws_ptr, A[0], row0, tokA, ks, N, M)
            _part(ws_ptr, A[1], row0, tokB, ks, N, M)
            _part(ws_ptr, A[2], row1, tokA, ks, N, M)
            _part(ws_ptr, A[3], row1, tokB, ks, N, M)
            if MT == 2:
                _part(ws_ptr, A[4], row0, tokA + 8, ks, N, M)
                _part(ws_ptr, A[5], row0, tokB + 8, ks, N, M)
                _part(ws_ptr, A[6], row1, tokA + 8, ks, N, M)
                _part(ws_ptr, A[7], row1, tokB + 8, ks, N, M)
            tl.debug_barrier()
            cidx = cnt_ptr + N_COUNTERS + nb
            if tl.atomic_add(cidx, 1) == SPLIT - 1:  # last split of this block of rows: reduce and finish
                # the flag read and the partial sums are in flight together (one round trip)
                rdy = 0
                if HAS_LR:
                    rdy = _flag_read(flag)
                v = _psum(ws_ptr, row0, row1, tokA, tokB, N, M, SPLIT, SU)
                if MT == 2:
                    v = v + _psum(ws_ptr, row0, row1, tokA + 8, tokB + 8, N, M, SPLIT, SU)
                tl.store(cidx, 0)
                if HAS_LR:
                    _t_ready(flag, rdy)
                _final(v[0], v[1], v[2], v[3], row0, row1, 0, tokA, y_ptr, b_ptr, lf, t32_ptr, N, M, sy, RP, DT,
                       HAS_BIAS, HAS_LR)
                if MT == 2:
                    _final(v[4], v[5], v[6], v[7], row0, row1, 8, tokA + 8, y_ptr, b_ptr, lf, t32_ptr, N, M, sy,
                           RP, DT, HAS_BIAS, HAS_LR)
        else:
            if HAS_LR:
                _t_ready(flag, _flag_read(flag))
            _final(A[0], A[1], A[2], A[3], row0, row1, 0, tokA, y_ptr, b_ptr, lf, t32_ptr, N, M, sy, RP, DT,
                   HAS_BIAS, HAS_LR)
            if MT == 2:
                _final(A[4], A[5], A[6], A[7], row0, row1, 8, tokA + 8, y_ptr, b_ptr, lf, t32_ptr, N, M, sy, RP,
                       DT, HAS_BIAS, HAS_LR)
        if ROT:
            if seen == NB * SPLIT - 1:  # the last reader: every main program is past its wait
                tl.store(rc, 0)
                tl.store(rc + 1, 0)


@triton.jit(do_not_specialize=["N", "SROW", "NKB"])  # K specialized (16 | K: rows start aligned, 16-byte stores)
def _frag_dequant_kernel(w_ptr, q_ptr, p_ptr, N, K, SROW, NKB, BITS: tl.constexpr, MODE: tl.constexpr,
                         G: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr):
    """W (row-major (N, K), w_ptr's dtype) for one (BN × BK) tile, BK a divisor of the group size and
    of the k block: each element gathers its code from the fragment layout (a lane's word serves 32/b
    codes, so the gathers hit L1), becomes 2ᵇ + code by the exponent trick and then a·v + b; rows are
    stored contiguously. The word index and shift are split into a row part and a column part (computed
    once per row / column of the tile), so an element costs a few adds; tiles inside W take no masks."""
    PW: tl.constexpr = 16 // BITS  # pairs per word
    KB: tl.constexpr = 16 * PW  # k's per block
    NP: tl.constexpr = 4 if MODE == 0 else 2  # parameters per (row block, group, g)
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    n = (pn * BN + tl.arange(0, BN))[:, None]
    j = tl.arange(0, BK)[None, :]
    k = pk * BK + j
    gi = (pk * BK) // G
    kb = (pk * BK) // KB  # the tile's k block (BK divides KB)
    # rows n = 16·rb + 8·h8 + g; k = KB·kb + 16·chunk + 4·q + 2·kk + e; pair u = 4·chunk + 2·kk + h8 is
    # slot u % PW of word u // PW of lane 4g + q, half e. With cu = u − h8 (even, columns only):
    rb = n // 16
    h8 = (n // 8) % 2
    g = n % 8
    kk = (pk * BK) % KB + j
    cu = 4 * (kk // 16) + 2 * ((kk % 4) // 2)
    word = rb * (NKB * 128) + 16 * g + (kb * 128 + 4 * ((kk % 16) // 4) + cu // PW)
    shift = (16 * (kk % 2) + BITS * (cu % PW)) + BITS * h8
    if PW % 2 == 1:  # odd PW (3 and 5 bits): cu % PW + h8 can reach the next word
        carry = ((cu % PW) + h8 >= PW).to(tl.int32)
        word += carry
        shift -= (BITS * PW) * carry
    full = ((pn + 1) * BN <= N) & ((pk + 1) * BK <= K)
    ok = (n < N) & (k < K)
    if full:
        w = tl.load(q_ptr + word)
    else:
        w = tl.load(q_ptr + word, mask=ok, other=0)
    v = (((w >> shift) << (23 - BITS)) & (((1 << BITS) - 1) << (23 - BITS))) | ((127 + BITS) << 23)
    v = v.to(tl.float32, bitcast=True)  # 2ᵇ + code, exact
    pp = p_ptr + ((rb * SROW + gi) * 8 + g) * NP + h8
    s = tl.load(pp, mask=n < N, other=0.0).to(tl.float32)
    if MODE == 0:
        b = tl.load(pp + 2, mask=n < N, other=0.0).to(tl.float32) - s * VS
    else:
        b = -s * (VS + HALF)
    out = (v * s + b).to(w_ptr.dtype.element_ty)
    if full:
        tl.store(w_ptr + n * K + k, out)
    else:
        tl.store(w_ptr + n * K + k, out, mask=ok)


# ----------------------------------------------------------------------------------------------
# host side

_DT = {torch.float16: 1, torch.bfloat16: 2}
_PDT = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}  # the parameters' (scales') dtype
MAX_M = 16  # tokens per launch of the fragment kernel (two mma token groups); more: one launch per 16
SLICED_MAX_M = 32  # default: the fragment kernel (in launches of 16 tokens) up to this many, dequantize + cuBLAS above


def ok(kw: KernelWeight, m: int, dtype: torch.dtype | None) -> bool:
    """The fragment kernel can run this call (more than MAX_M tokens: one launch per MAX_M); fp16
    only in triton's CPU interpreter (numpy has no bf16)."""
    dts = _DT if ASM else (torch.float16,)
    return kw.layout == "frag" and m >= 1 and dtype in dts


def dequantize(kw: KernelWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The (N, K) weight in ``dtype``, decoded on the GPU by one launch."""
    n, k = kw.shape
    w = torch.empty(n, k, dtype=dtype, device=kw.device)
    bk = 64
    while kw.spec.group_size % bk or frag_kblock(kw.bits) % bk:  # one group and one k block per tile
        bk //= 2
    bn = 4096 // bk
    _frag_dequant_kernel[(-(-n // bn), -(-k // bk))](
        w, kw.qweight, kw.scale, n, k, kw.scale.shape[1], kw.n_tiles, BITS=kw.bits, MODE=kw.mode,
        G=kw.spec.group_size, VS=float(2 ** kw.bits), HALF=float(2 ** (kw.bits - 1)), BN=bn, BK=bk, num_warps=4)
    return w


def _even(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) with rows readable as 32-bit pairs: K even, row stride even, 4-byte aligned (else a
    zero-padded copy)."""
    if x.shape[1] % 2 == 0 and x.stride(0) % 2 == 0 and x.stride(1) == 1 and x.data_ptr() % 4 == 0:
        return x
    xp = torch.zeros(x.shape[0], x.shape[1] + x.shape[1] % 2, dtype=x.dtype, device=x.device)
    xp[:, : x.shape[1]] = x
    return xp


def plans_rotation(kw: KernelWeight, m: int, dtype: torch.dtype | None, rot) -> bool:
    """This kernel's call takes the input rotation ``rot`` (a ``_rotate.TritonRotation``) as one
    planned unit (:func:`launch` with ``rot``): one token, no exactly kept outliers (their pass reads
    x')."""
    from ._rotate import TritonRotation

    return (isinstance(rot, TritonRotation) and m == 1 and ok(kw, m, dtype) and kw.fix is None
            and dtype in rot.s and rot.n == kw.shape[1])


def rotates_inside(rot, has_lr: bool, kwarps: bool = False) -> bool:
    """Whether a planned rotated call (:func:`plans_rotation`) rotates x in the GEMV's own launch (its
    first programs, the rest waiting on a counter; :func:`_frag_kernel`'s ROT) rather than in a launch
    before it: only when asked for (LQKIT_ROT_LAUNCH=one), for blocks of two products (256 to 4096)
    and without a low-rank term (its R·x programs would read x before x' exists), nor for the warps
    splitting K (``kwarps``: Config(kwarps=1) takes the chained launches). It relies on the GPU
    starting the grid's programs in order (the rotation's first), as GPUs do though CUDA does not
    promise it. Not the default: on an H100 in a CUDA graph it added 2.7–4.1 µs to a call against
    1.5–2.1 µs for the chained launches (rotation-onelaunch-h100-*.json); with the wait removed (wrong
    results, timing only) −0.05 to +0.7 µs, so the time is the wait (whether the rotation runs slower
    inside this launch or the hand-over is slow is not profiled)."""
    one = os.environ.get("LQKIT_ROT_LAUNCH", "chain").strip().lower() == "one"
    return one and rot.r1 > 1 and not has_lr and not kwarps


def pdl_ok(device: torch.device) -> bool:
    """Whether a rotated call's GEMV is launched as a programmatic dependent launch: a Hopper or later
    GPU, triton with griddepcontrol, not its interpreter, not turned off (LQKIT_PDL=0, off, false or
    no). On an H100, in a CUDA graph, the rotation's added cost at one token went from +3.5 to +2.2 µs
    on 14336×4096 (one block of 4096 in 4 programs; mean of 7 runs) and from +2.2 to +1.1 µs on
    4096×14336 (7 blocks of 2048, a program each; mean of 3): rotation-chain-h100.json and
    rotation-chain-onestage-h100.json against rotation-pdl-variants-h100.json."""
    off = os.environ.get("LQKIT_PDL", "1").strip().lower() in ("0", "off", "false", "no")
    return (not off and bool(ASM) and gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch(x, y, kw, L, R, bias, has_lr, cfg, rot=None) -> None:
    """y (M, N) = the fragment kernel on x (M, K), fp16/bf16: one launch per MAX_M tokens. ``rot``:
    the layer's input rotation (callers check :func:`plans_rotation` first): its launch into the plan's
    scratch x' = R·x, then this kernel's on x' (with :func:`pdl_ok`, as a programmatic dependent
    launch: its programs start during the rotation, prefetch their first words into the L2 and wait
    for x')."""
    if cfg.unroll not in (1, 2):
        raise ValueError(f"Config(unroll={cfg.unroll}): the fragment kernel runs 1 or 2 steps per loop iteration")
    if cfg.xs not in (0, 1):
        raise ValueError(f"Config(xs={cfg.xs}): expected 0 (B fragments loaded per chunk) or 1 (one token: x's words "
                         "loaded once per step and shuffled)")
    for i in range(0, x.shape[0], MAX_M):
        _launch16(x[i:i + MAX_M], y[i:i + MAX_M], kw, L, R, bias, has_lr, cfg, rot)


def _launch16(x, y, kw, L, R, bias, has_lr, cfg, rot=None) -> None:
    from . import _triton as T

    n, k = kw.shape
    m = x.shape[0]
    xe = _even(x)
    rank, Lc, Rc = T._lowrank_operands(L, R, has_lr)
    if has_lr:
        Lc = Lc.to(x.dtype)  # L is read as 32-bit pairs of x's dtype (the A fragment)
        if rank % 2:  # pad to an even rank with a zero column / row
            Lc = torch.nn.functional.pad(Lc, (0, 1))
            Rc = torch.nn.functional.pad(Rc, (0, 0, 0, 1))
            rank += 1
    rp = T._rank_pad(rank)
    inside = rot is not None and rotates_inside(rot, has_lr, bool(cfg.kwarps))
    pdl = rot is not None and not inside and pdl_ok(x.device)
    key = ("frag", cfg, m, rank, x.dtype, x.device, x.stride(0), bias is not None and bias.dtype,
           has_lr and (Lc.dtype, Rc.dtype), rot is not None and rot.key, pdl, inside)

    def make():
        nw = cfg.warps
        nb = -(-n // (16 * nw))
        if cfg.kwarps:  # one block of 16 rows a program, its warps splitting K
            if not kwarps_fit(kw, cfg, has_lr):  # (a rotation is never inside its launch: rotates_inside)
                raise ValueError(f"kwarps=1 does not fit {kw.shape} at {kw.bits} bits, groups of "
                                 f"{kw.spec.group_size}, with {cfg}: see _frag.kwarps_fit")
            nb, split, bps = -(-n // 16), 1, kw.n_tiles // nw
        else:  # blocks per split: a multiple of U (2U), so that every step (iteration) starts where
            # _frag_kernel's OFF1 / OFF2 assume (at a group boundary when they are ≥ 0)
            split, bps = T._split(kw, nb, cfg, x.device, multiple=step_multiple(kw.bits, kw.spec.group_size, cfg))
        ntc = -(-k // KC) if has_lr else 0
        t = torch.zeros(m, rp, dtype=x.dtype, device=x.device)
        # x' = R·x, written by the rotation's launch (k: a multiple of its block, 16 or more: even)
        xr = torch.empty(m, k, dtype=x.dtype, device=x.device) if rot is not None else None
        nrot = (k // rot.block) * (rot.r2 // rot.cols) if inside else 0  # the rotation's programs (m = 1)
        return dict(grid=(nrot + ntc * m + nb * split,), split=split, bps=bps, ntc=ntc, xr=xr, rot={}, nrot=nrot,
                    cnt=T._counters(kw, _NC + 2 * nb + 2, x.device),
                    ws=T.split_workspace(split, m, n, x.device),
                    tp=torch.empty(max(ntc * m * rp, 1), dtype=torch.float32, device=x.device),
                    t=t, t32=t.view(torch.int32),
                    const=(kw.bits, kw.mode, kw.spec.group_size, float(2 ** kw.bits), float(2 ** (kw.bits - 1)),
                           nw, 1 if m <= 8 else 2, _DT[x.dtype], rp, KC, bias is not None, has_lr, split > 1,
                           cfg.pf, _PDT[kw.scale.dtype], PSUM_UNROLL if split > 1 else 1, cfg.unroll,
                           cfg.xs == 1 and m == 1, pdl, inside,
                           *((rot.r1, rot.r2, rot.cols) if inside else (1, 16, 16)),
                           *step_offsets(kw.bits, kw.spec.group_size, cfg), bool(cfg.kwarps)))

    plan = T._plan(kw, key, make) if T._aligned(xe, y, bias, Lc, Rc) and xe is x else None
    p = plan or make()
    dummy = kw.scale
    rops = (dummy, dummy, dummy, dummy)
    if inside:  # this launch's first programs rotate x into xr, the GEMV reads xr
        x32 = p["xr"].view(torch.int32)
        rops = (p["xr"], rot.s[x.dtype], rot.h1, rot.h2[x.dtype])
    else:
        if rot is not None:  # the rotation's launch into xr (with pdl: letting this one start at once)
            rot.launch(x, p["xr"], p["rot"] if plan is not None else None, trigger=pdl)
            xe = p["xr"]
        x32 = xe.view(torch.int32)  # 32-bit pairs of x's row (the B fragment)
    args = (xe, x32, y, kw.qweight, kw.scale, bias if bias is not None else dummy,
            Lc.view(torch.int32) if has_lr else dummy, Rc if has_lr else dummy,
            p["ws"], p["tp"], p["t"], p["t32"], p["cnt"], *rops, m, n, k, x32.shape[1], kw.scale.shape[1],
            kw.n_tiles, p["bps"], p["split"], p["ntc"], rank, xe.stride(0), x32.stride(0), y.stride(0), p["nrot"],
            rot.scale if inside else 1.0, *p["const"])
    T._launch(_frag_kernel, plan, p["grid"], args, cfg.warps, 1, cfg.maxnreg, pdl)


def kwarps_fit(kw: KernelWeight, cfg, extra: bool) -> bool:
    """Whether Config(kwarps=1) can run ``kw``: no low rank or rotation inside the launch (``extra``; a
    rotation's own launch before it is fine: :func:`rotates_inside` false), no K-split, and K
    in whole blocks that the warps share evenly, each warp's part whole steps (iterations) and whole
    groups (its pointers start at a group boundary)."""
    kb, nw = frag_kblock(kw.bits), cfg.warps
    bpw = kw.n_tiles // nw
    return (not extra and cfg.split in (0, 1) and kw.shape[1] == kw.n_tiles * kb and kw.n_tiles % nw == 0
            and bpw % step_multiple(kw.bits, kw.spec.group_size, cfg) == 0 and (bpw * kb) % kw.spec.group_size == 0)


def step_offsets(bits: int, group: int, cfg) -> tuple[int, int]:
    """Where _frag_kernel's group ends are known at compile time: (OFF1, OFF2), the blocks from a group
    boundary to the start of a step (OFF1; of an iteration's second step with ``unroll=2``: OFF2),
    −1 where they are tested at run time (each chunk, then a select of the step's parameters). 0, 0:
    every block alike or every step of U blocks spans whole groups (4 bits: 64-k blocks); −1, U: only
    an iteration of two steps does (3 bits, groups of 128: 80-k blocks, 8 span 5 groups); −1, −1:
    neither. Splits then start at multiples of :func:`step_multiple` blocks."""
    nch, cpg, u = 16 // bits, group // 16, cfg.pf
    if nch % cpg == 0 or (u * nch) % cpg == 0:
        return 0, 0
    return -1, (u if cfg.unroll == 2 and (2 * u * nch) % cpg == 0 else -1)


def step_multiple(bits: int, group: int, cfg) -> int:
    """Blocks per split are a multiple of this: U, or 2U where only an iteration of two steps starts at
    a group boundary (:func:`step_offsets` (−1, U))."""
    return 2 * cfg.pf if step_offsets(bits, group, cfg)[1] > 0 else cfg.pf


def candidates(kw: KernelWeight, m: int, dtype: torch.dtype | None = None, has_lr: bool = False) -> list:
    """What :func:`.tune` tries: the fragment kernel (up to 64 tokens, in launches of 16) and, above
    16 tokens, dequantize + cuBLAS. At one token also the two-steps-per-iteration loop
    (``unroll=2``: measured 2–10% faster on the 14336-long layers of an H200 at one token, 4–8% slower on
    small layers and at 8–16 tokens) and x's words loaded once per step (``xs=1``: with U = 4 up to 3%
    faster on 4096-row layers, with 6 programs per SM 10% faster at rank 32 on 4096×14336; bench/KERNELS.md),
    and without a low-rank term the warps splitting K where that fits (:func:`_kwarps`)."""
    from ._triton import Config

    out = []
    if ok(kw, m, dtype) and m <= 64:
        for warps in (4, 8):
            for u in (2, 4):
                for occ in (2.0, 4.0):
                    out.append(Config(kind="frag", bn=16 * warps, warps=warps, occ=occ, pf=u))
            if m == 1:
                for occ in (2.0, 4.0):
                    out.append(Config(kind="frag", bn=16 * warps, warps=warps, occ=occ, pf=2, unroll=2))
        if m == 1:  # x's words once per step (xs=1): the registers it frees go to U = 4 or to more programs
            out += [Config(kind="frag", bn=64, warps=4, occ=4.0, pf=4, xs=1),
                    Config(kind="frag", bn=64, warps=4, occ=4.0, pf=4, xs=1, unroll=2),
                    Config(kind="frag", bn=64, warps=4, occ=6.0, pf=2, xs=1),
                    # one warp per program, for the small layers: 4096×1024 without split-K (U = 8) and
                    # 1024×4096 in 8 splits took 4.40 / 4.93 µs on an H100 against 4.9 / 5.3 for the
                    # candidates above (bench/results/kernels-small-probe-h100.json)
                    _one_warp(),
                    Config(kind="frag", bn=16, warps=1, occ=4.0, pf=4, xs=1)]
            out += [c for c in (_kwarps(kw, has_lr),) if c is not None]
    if m > MAX_M or not out:
        out.append(Config(kind="dequant"))
    return out


def quick_candidates(kw: KernelWeight, m: int, dtype: torch.dtype | None = None, has_lr: bool = False) -> list:
    """The few one-token configurations worth timing when a model is loaded (each costs a compile):
    the default, plain U = 2 (where the default is another), and those that won :func:`candidates` on
    7B-sized layers (bench/results/kernels-h200-1token.json: an H200, 2–4 bits, rank 0 and 32;
    kernels-h100-1token-groupends.json: an H100, 3 and 4 bits), and the warps splitting K where that fits
    (:func:`_kwarps`). None at other token counts."""
    from ._triton import Config

    if m != 1 or not ok(kw, m, dtype):
        return []
    out = [default_config(kw, m, dtype, has_lr), _plain(),
           Config(kind="frag", bn=64, warps=4, occ=4.0, pf=4, xs=1), _iter_aligned(),
           Config(kind="frag", bn=64, warps=4, occ=4.0, pf=2, unroll=2),
           Config(kind="frag", bn=64, warps=4, occ=6.0, pf=2, xs=1),
           _one_warp()]
    out += [c for c in (_kwarps(kw, has_lr),) if c is not None]
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=None)
def _only_iterations_align(bits: int, group: int) -> bool:
    """:func:`_iter_aligned`'s iterations of two steps, but not its single steps of 4 blocks, span whole
    groups (:func:`step_offsets` (−1, U)); then neither do :func:`_plain`'s steps of 2 (their group ends
    are tested at run time)."""
    return step_offsets(bits, group, _iter_aligned())[1] > 0


def _plain():
    """The default launch up to SLICED_MAX_M tokens: U = 2, one step per iteration."""
    from ._triton import Config

    return Config(kind="frag", bn=64, warps=4, occ=4.0, pf=2)


def _iter_aligned():
    """U = 4, two steps per iteration, x's words once per step: at 3 bits with groups of 128 its
    iterations span whole groups (:func:`step_offsets`), where the default's steps do not."""
    from ._triton import Config

    return Config(kind="frag", bn=64, warps=4, occ=4.0, pf=4, xs=1, unroll=2)


def _one_warp():
    """One warp per program (16 rows), U = 8, x's words once per step, 2 programs per SM: every step
    spans whole groups up to groups of 128 at 2-7 bits (:func:`step_offsets`)."""
    from ._triton import Config

    return Config(kind="frag", bn=16, warps=1, occ=2.0, pf=8, xs=1)


KWARPS_MAX_PROGRAMS = 2.0  # 16-row blocks per SM up to which a 4-bit one-token call takes _kwarps by default
KWARPS_MAX_IN = 4096  # ... on layers up to this wide
ONE_WARP_MIN_PROGRAMS = 6.5  # one-warp programs (rows / 16) per SM from which the one-token default is _one_warp
ONE_WARP_MAX_PROGRAMS = 12.0  # ... and up to which it is
WIDE_ITER_MAX_IN = 4096  # past that, layers up to this width take _iter_aligned at one token


def _programs_per_sm(kw: KernelWeight) -> float:
    from ._triton import _sms

    return kw.shape[0] / 16 / _sms(kw.qweight.device)


def _one_warp_wins(kw: KernelWeight, has_lr: bool) -> bool:
    """Whether a one-token call without low rank takes :func:`_one_warp` by default: 3 bits and more,
    ONE_WARP_MIN_PROGRAMS to ONE_WARP_MAX_PROGRAMS programs of 16 rows per SM (they fill the GPU
    without a K-split). One H100 (132 SMs), rtn g128, in = 4096, µs against the default it replaced
    (kernels-h100-wide-default.json): 4 bits 15.5 / 18.1 (14336 rows, 6.8 a SM), 21.1 / 21.3 (18432),
    23.8 / 26.5 (22016), 25.7 / 35.0 (24576, 11.6 a SM); 3 bits 16.0 / 17.7, 20.9 / 23.6, 22.0 / 27.7,
    23.4 / 24.8. Past the cap see :func:`_wide_iter_wins`. The stacked q/k/v 12288×4096 (5.8 a SM)
    keeps the default: one warp took 14.9–17.3 against 14.2–14.8 on two other hosts (kernels-h100-7b-
    shapes-launches.json, kernels-h100-7b-stacked-split.json; load(tune=True) did take it there at 6
    bits, groups of 64). load(tune=True) took it for 22016×4096 at 3, 4 and 6 bits but not at 2
    (generate-h100-32layers-budget3-gpu.json); at rank 32 a four-warp launch (kernels-h100-1token-
    groupends.json): each program also forms its share of R·x. Rows only: timed at in = 4096 and 3-4
    bits; other widths and 5-7 bits take the rule untimed."""
    if has_lr or kw.bits < 3:
        return False
    return ONE_WARP_MIN_PROGRAMS <= _programs_per_sm(kw) <= ONE_WARP_MAX_PROGRAMS


def _wide_iter_wins(kw: KernelWeight, has_lr: bool) -> bool:
    """Past ONE_WARP_MAX_PROGRAMS one-warp programs per SM, layers up to WIDE_ITER_MAX_IN wide take
    :func:`_iter_aligned` (U = 4, two steps an iteration) at one token, at 3 bits and more without low
    rank (3 bits with groups of 128 take it anyway). One H100, rtn g128, µs, one warp / U = 4 unroll 2 /
    plain U = 2 (kernels-h100-wide-past-cap.json): 28672×4096 (13.6 a SM) 4 bits 34.6 / **29.7** /
    34.2, 3 bits 32.9 / **27.6** / 34.6; 36864×4096 4 bits 40.9 / **36.6** / 42.8, 3 bits **38.4** /
    40.2 / 48.2; 57344×8192 (a 70B's stacked gate/up) 4 bits 108.8 / 117.7 / **106.7**, 3 bits 95.1 /
    **92.2** / 107.1: hence the width limit, past which 4 bits take the plain launch (widths between 4096 and 8192
    untimed)."""
    if has_lr or kw.bits < 3:
        return False
    return _programs_per_sm(kw) > ONE_WARP_MAX_PROGRAMS and kw.shape[1] <= WIDE_ITER_MAX_IN


def _kwarps(kw: KernelWeight, has_lr: bool = False):
    """The in-program K split (Config(kwarps=1)) for one token: U = 4, x's words once per step, the most
    warps of 8, 4, 2 that each get at least one step and fit (:func:`kwarps_fit`); None where none fits."""
    from ._triton import Config

    for w in (8, 4, 2):
        cfg = Config(kind="frag", bn=16 * w, warps=w, occ=4.0, pf=4, xs=1, kwarps=1)
        if kwarps_fit(kw, cfg, has_lr):  # (each warp then has whole steps: at least one)
            return cfg
    return None


def _kwarps_default(kw: KernelWeight, has_lr: bool):
    """The one-token default :func:`_kwarps`, or None where it is not: it is for 4 bits, no low rank, at most
    KWARPS_MAX_PROGRAMS blocks of 16 rows per SM (too few one-warp programs to fill the GPU without a K
    split), at most KWARPS_MAX_IN wide, and a launch that fits. One H100, rtn g128, µs, in-program split
    / the default it replaced (a split across programs) / tinygemm int4 (kernels-h100-kwarps-small.json):
    4096×1024 (4 warps, one step each) **3.81** / 4.82 / 3.26; 1024×4096 (8 warps) **4.41** / 6.05 /
    4.81; 4096×4096 (8 warps) **6.91** / 7.67 / 6.85. On 2048×2048 (kernels-h100-kwarps-probe2.json) the
    8 warps it takes 4.05, 4 warps 3.98, tinygemm 3.80. Not the default at other bit widths: 2 bits fits
    and was 12 % faster on one shape (4096×4096, 5.90 against 6.74), too little to set it by; 3 bits with
    groups of 128 does not fit at these widths (80-k blocks)."""
    if has_lr or kw.bits != 4 or kw.shape[1] > KWARPS_MAX_IN or _programs_per_sm(kw) > KWARPS_MAX_PROGRAMS:
        return None
    return _kwarps(kw)


def default_config(kw: KernelWeight, m: int, dtype: torch.dtype | None, has_lr: bool = False):
    """Up to SLICED_MAX_M tokens the fragment kernel, else (or fp32) dequantize + cuBLAS (measured on
    an H200, 4096×14336: at 32 tokens 58.5 vs 87.9 µs (4-bit) and 85.3 vs 106.1 µs (3-bit); at 48
    tokens the launches of 16 take 87 / 131 µs, dequantize + cuBLAS 87.9–90.8 / 106.1–108.8 µs
    between 32 and 64 tokens; bench/KERNELS.md). At one token: the program's warps splitting K on the
    few-row 4-bit layers (:func:`_kwarps_default`), one warp per program on layers with
    many rows (:func:`_one_warp_wins`), U = 4 with two steps an iteration on those with more rows, up
    to 4096 wide (:func:`_wide_iter_wins`); else, where only an iteration of two steps spans whole groups
    (:func:`_only_iterations_align`: 3 bits with groups of 128, and 5 bits with groups of 128, not
    timed), :func:`_iter_aligned`: 16.1 against 18.1–18.6 µs for the plain U = 2 on an H100's
    4096×14336 at 3 bits (kernels-3bit-groupends-ab-h100.json)."""
    from ._triton import Config

    if not ok(kw, m, dtype) or m > SLICED_MAX_M:
        return Config(kind="dequant")
    if m == 1 and (split_k := _kwarps_default(kw, has_lr)) is not None:
        return split_k
    if m == 1 and _one_warp_wins(kw, has_lr):
        return _one_warp()
    if m == 1 and (_only_iterations_align(kw.bits, kw.spec.group_size) or _wide_iter_wins(kw, has_lr)):
        return _iter_aligned()
    return _plain()
