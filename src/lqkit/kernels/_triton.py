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
  same launch by the first programs to start (tickets from an atomic counter), whose results the
  epilogues wait for; counters reset themselves, so a call is one launch and CUDA-graph safe.
- ``_gemm_kernel`` (many tokens): (BM × BN) output tiles, the (32 × BN) slice of codes dequantized
  to the activation dtype and fed to ``tl.dot``; optional split-K with the same last-arriver
  reduction; the low-rank path as one more ``tl.dot`` in the epilogue on t = x·Rᵀ.

Every affine format decodes as w = a·v + b with v = 1 + code·2⁻ᵇ: rtn a = s·2ᵇ, b = o − a;
rtn_sym a = s·2ᵇ, b = −a − 2ᵇ⁻¹·s; nf v = table[code], a = absmax, b = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .layout import LANES, KernelWeight, k_tile

GB = tl.constexpr(16)  # 32-wide chunks per step of the offset loop
KC = 1024  # k's per program of the R·x work
N_COUNTERS = 3  # ticket, finished R·x programs, finished programs; then one per output block


# ----------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _decode(w, j: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr, lut_ptr):
    """Slice j of a tile of words -> fp32 values v (1 + code·2⁻ᵇ, or table[code] for nf)."""
    c = (w >> (j * BITS)) & ((1 << BITS) - 1)
    if MODE == 2:
        v = tl.load(lut_ptr + c)
    else:
        v = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    return v


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
    m = tid % M
    c = tid // M
    r_off = tl.arange(0, RP)
    kk = tl.arange(0, 128)
    acc = tl.zeros([RP, 128], dtype=tl.float32)
    for k0 in range(c * KC_, tl.minimum((c + 1) * KC_, K), 128):
        k = k0 + kk
        xv = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        rv = tl.load(r_ptr + r_off[:, None] * K + k[None, :],
                     mask=(r_off[:, None] < RANK) & (k[None, :] < K), other=0.0).to(tl.float32)
        acc += rv * xv[None, :]
    tl.store(tp_ptr + (c * M + m) * RP + r_off, tl.sum(acc, axis=1))
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr + 1, 1)


@triton.jit
def _gemv_finish(acc, m, n_off, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, cnt_ptr, M, NTC, RANK, stride_ym,
                 RP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_off, mask=nmask, other=0.0).to(tl.float32)
    if HAS_LR:
        need = NTC * M
        done = tl.atomic_add(cnt_ptr + 1, 0)
        while done < need:  # R·x programs started before this one; wait for them to finish
            done = tl.atomic_add(cnt_ptr + 1, 0)
        r_off = tl.arange(0, RP)
        tv = tl.zeros([RP], dtype=tl.float32)
        for c in range(0, NTC):
            tv += tl.load(tp_ptr + (c * M + m) * RP + r_off, cache_modifier=".cg")
        lv = tl.load(l_ptr + n_off[:, None] * RANK + r_off[None, :],
                     mask=nmask[:, None] & (r_off[None, :] < RANK), other=0.0).to(tl.float32)
        acc += tl.sum(lv * tv[None, :], axis=1)
    tl.store(y_ptr + m * stride_ym + n_off, acc.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gemv_work(wid, x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, ws_ptr, tp_ptr, cnt_ptr,
               M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm, stride_ym,
               BITS: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr, GROUP_N: tl.constexpr,
               FAST: tl.constexpr, G: tl.constexpr, P: tl.constexpr, VS: tl.constexpr,
               HALF: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_LR: tl.constexpr, SPLITK: tl.constexpr):
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
    t0 = ks * TPS
    t1 = tl.minimum(t0 + TPS, NTILES)
    acc = tl.zeros([BN, 32], dtype=tl.float32)
    accx = tl.zeros([32], dtype=tl.float32)  # group_dim "out": Σ x·b per lane
    gn = (nb * BN) // G  # group_dim "out", FAST: the block's group of rows
    for t in range(t0, t1):
        w = tl.load(q_ptrs + t * 32)  # (BN, 32) int32
        kb = t * KT
        for j in tl.static_range(S):
            v = _decode(w, j, BITS, MODE, lut_ptr)  # (BN, 32)
            k = kb + j * 32 + i_off
            xj = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)  # (32,)
            if FAST:
                if GROUP_N:  # scale varies along k only: fold it into x
                    sidx = gn * SROW + k
                    sv = tl.load(s_ptr + sidx).to(tl.float32)
                    a, b = _affine(sv, o_ptr, sidx, MODE, VS, HALF)
                    acc += v * (xj * a)[None, :]
                    if MODE != 2:
                        accx += xj * b
                else:  # scale varies along n only: apply once per P slices
                    if j % P == 0:
                        p = v * xj[None, :]
                    else:
                        p += v * xj[None, :]
                    if (j + 1) % P == 0:
                        sv = tl.load(s_ptr + n_off * SROW + (kb + j * 32) // G).to(tl.float32)
                        if MODE == 2:
                            acc += sv[:, None] * p
                        else:
                            acc += (sv * VS)[:, None] * p
            else:  # any group size: per-element scales
                if GROUP_N:
                    sidx = (n_off[:, None] // G) * SROW + k[None, :]
                else:
                    sidx = n_off[:, None] * SROW + k[None, :] // G
                sv = tl.load(s_ptr + sidx).to(tl.float32)
                a, b = _affine(sv, o_ptr, sidx, MODE, VS, HALF)
                acc += (v * a + b) * xj[None, :]
    res = tl.sum(acc, axis=1)  # (BN,)
    if FAST and MODE != 2:
        if GROUP_N:
            res += tl.sum(accx, axis=0)
        else:  # Σ_g b[n, g]·Σ_{k∈g} x_k over this split's k range, 32 k's (one group) per chunk
            accb = tl.zeros([BN, GB], dtype=tl.float32)
            kend = tl.minimum(t1 * KT, K)
            for c0 in range(t0 * KT, kend, GB * 32):
                ch = c0 + tl.arange(0, GB) * 32  # (GB,)
                kk = ch[:, None] + i_off[None, :]
                sx = tl.sum(tl.load(x_row + kk, mask=kk < kend, other=0.0).to(tl.float32), axis=1)
                sidx = n_off[:, None] * SROW + ch[None, :] // G
                cm = (ch < kend)[None, :]
                sv = tl.load(s_ptr + sidx, mask=cm, other=0.0).to(tl.float32)
                if MODE == 0:
                    b = tl.load(o_ptr + sidx, mask=cm, other=0.0).to(tl.float32) - sv * VS
                else:
                    b = -sv * (VS + HALF)
                accb += b * sx[None, :]
            res += tl.sum(accb, axis=1)
    nmask = n_off < N
    if SPLITK:
        tl.store(ws_ptr + (ks * M + m) * N + n_off, res, mask=nmask)
        tl.debug_barrier()
        cidx = cnt_ptr + 3 + m * NB + nb
        if tl.atomic_add(cidx, 1) == SPLIT - 1:  # last split of this block: reduce and finish
            tot = tl.zeros([BN], dtype=tl.float32)
            for s in range(0, SPLIT):
                tot += tl.load(ws_ptr + (s * M + m) * N + n_off, mask=nmask, other=0.0, cache_modifier=".cg")
            _gemv_finish(tot, m, n_off, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, cnt_ptr, M, NTC, RANK,
                         stride_ym, RP, HAS_BIAS, HAS_LR)
            tl.store(cidx, 0)
    else:
        _gemv_finish(res, m, n_off, nmask, y_ptr, b_ptr, l_ptr, tp_ptr, cnt_ptr, M, NTC, RANK,
                     stride_ym, RP, HAS_BIAS, HAS_LR)


@triton.jit(do_not_specialize=["M", "N", "K", "SROW", "NTILES", "TPS", "SPLIT", "NTC", "RANK", "stride_xm",
                              "stride_ym"])
def _gemv_kernel(x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, r_ptr, ws_ptr, tp_ptr, cnt_ptr,
                 M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm, stride_ym,
                 BITS: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr, GROUP_N: tl.constexpr,
                 FAST: tl.constexpr, G: tl.constexpr, P: tl.constexpr, VS: tl.constexpr,
                 HALF: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, KC_: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, SPLITK: tl.constexpr):
    if HAS_LR:
        ticket = tl.atomic_add(cnt_ptr, 1)  # dynamic order: R·x work goes to the first programs
        n_t = NTC * M
        if ticket < n_t:
            _t_work(ticket, x_ptr, r_ptr, tp_ptr, cnt_ptr, M, K, RANK, stride_xm, RP, KC_)
        else:
            _gemv_work(ticket - n_t, x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, ws_ptr,
                       tp_ptr, cnt_ptr, M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm,
                       stride_ym, BITS, S, MODE, GROUP_N, FAST, G, P, VS, HALF, BN, RP, HAS_BIAS,
                       HAS_LR, SPLITK)
        total = n_t + tl.cdiv(N, BN) * SPLIT * M
        if tl.atomic_add(cnt_ptr + 2, 1) == total - 1:  # last program: reset the counters
            tl.store(cnt_ptr, 0)
            tl.store(cnt_ptr + 1, 0)
            tl.store(cnt_ptr + 2, 0)
    else:
        _gemv_work(tl.program_id(0), x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, ws_ptr,
                   tp_ptr, cnt_ptr, M, N, K, KW, SROW, NTILES, TPS, SPLIT, NTC, RANK, stride_xm,
                   stride_ym, BITS, S, MODE, GROUP_N, FAST, G, P, VS, HALF, BN, RP, HAS_BIAS,
                   HAS_LR, SPLITK)


@triton.jit(do_not_specialize=["M", "N", "K", "SROW", "NTILES", "TPS", "SPLIT", "RANK", "stride_ym",
                              "stride_tm"])
def _gemm_kernel(x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, l_ptr, t_ptr, ws_ptr, cnt_ptr,
                 M, N, K, KW, SROW, NTILES, TPS, SPLIT, RANK, stride_xm, stride_ym, stride_tm,
                 BITS: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr, GROUP_N: tl.constexpr,
                 FAST: tl.constexpr, G: tl.constexpr, VS: tl.constexpr, HALF: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_LR: tl.constexpr, SPLITK: tl.constexpr):
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
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in range(t0, t1):
        w = tl.load(q_ptrs + t * 32)  # (32, BN) int32
        kb = t * KT
        for j in tl.static_range(S):
            v = _decode(w, j, BITS, MODE, lut_ptr)  # (32, BN): rows k, cols n
            k = kb + j * 32 + i_off
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
    if SPLITK:
        wmask = mmask[:, None] & nmask[None, :]
        wptr = ws_ptr + (ks * M + m_off[:, None]) * N + n_off[None, :]
        tl.store(wptr, acc, mask=wmask)
        tl.debug_barrier()
        cidx = cnt_ptr + 3 + mb * NB + nb
        if tl.atomic_add(cidx, 1) == SPLIT - 1:
            tot = tl.zeros([BM, BN], dtype=tl.float32)
            for s in range(0, SPLIT):
                tot += tl.load(ws_ptr + (s * M + m_off[:, None]) * N + n_off[None, :], mask=wmask,
                               other=0.0, cache_modifier=".cg")
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


# ----------------------------------------------------------------------------------------------
# host side


@dataclass(frozen=True)
class Config:
    """One launch configuration. kind: "gemv" or "gemm"; occ: target programs per SM (sets split-K)."""

    kind: str = "gemv"
    bn: int = 64
    bm: int = 16
    warps: int = 4
    stages: int = 2
    occ: float = 4.0
    split: int = 0  # 0: from occ


GEMV_MAX_M = 4  # default: GEMV kernel up to this many tokens, GEMM kernel above
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


def _split(kw: KernelWeight, blocks: int, cfg: Config, device: torch.device) -> tuple[int, int]:
    n_tiles = kw.n_tiles
    split = cfg.split or max(1, min(n_tiles, round(cfg.occ * _sms(device) / max(blocks, 1))))
    tps = -(-n_tiles // split)
    return -(-n_tiles // tps), tps


def _counters(kw: KernelWeight, size: int, device: torch.device) -> torch.Tensor:
    c = kw.cache.get("counters")
    if c is None or c.numel() < size or c.device != device:
        c = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        kw.cache["counters"] = c
    return c


def default_config(kw: KernelWeight, m: int) -> Config:
    if m <= GEMV_MAX_M:
        bn = 64
        while not _fast(kw, bn) and bn > 16:
            bn //= 2
        return Config(kind="gemv", bn=bn, warps=4, occ=4.0)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 128 if m <= 64 else 128
    while not _fast(kw, bn) and bn > 32:
        bn //= 2
    return Config(kind="gemm", bm=bm, bn=bn, warps=4 if bm <= 32 else 8, stages=3, occ=2.0)


def _tune_key(kw: KernelWeight, m: int, has_lr: bool, dtype: torch.dtype) -> tuple:
    mb = 1 if m == 1 else triton.next_power_of_2(m)
    return (kw.shape, kw.spec, mb, has_lr, dtype)


def linear(x: torch.Tensor, kw: KernelWeight, L: torch.Tensor | None = None, R: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, config: Config | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ + bias with the fused kernels; x (..., K) fp16/bf16/fp32.
    ``out``: optional contiguous (M, N) result buffer of x's dtype."""
    n, k = kw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    has_lr = L is not None and R is not None and L.shape[1] > 0
    cfg = config or _TUNED.get(_tune_key(kw, m, has_lr, x.dtype)) or default_config(kw, m)
    if cfg.kind == "gemv":
        _launch_gemv(x2, y, kw, L, R, bias, has_lr, cfg)
    else:
        _launch_gemm(x2, y, kw, L, R, bias, has_lr, cfg)
    return y.view(*lead, n)


def _common(kw: KernelWeight, bn: int) -> dict:
    b = kw.bits
    fast = _fast(kw, bn)
    return dict(BITS=b, S=32 // b, MODE=kw.mode, GROUP_N=kw.spec.group_dim == "out", FAST=fast,
                G=kw.spec.group_size, VS=float(2 ** b), HALF=float(2 ** (b - 1)))


def _launch_gemv(x, y, kw, L, R, bias, has_lr, cfg: Config) -> None:
    n, k = kw.shape
    m = x.shape[0]
    nb = -(-n // cfg.bn)
    split, tps = _split(kw, nb * m, cfg, x.device)
    rank = L.shape[1] if has_lr else 0
    rp = _rank_pad(rank)
    ntc = -(-k // KC) if has_lr else 0
    cnt = _counters(kw, N_COUNTERS + m * nb, x.device)
    ws = torch.empty(split * m * n if split > 1 else 1, dtype=torch.float32, device=x.device)
    tp = torch.empty(max(ntc * m * rp, 1), dtype=torch.float32, device=x.device)
    Lc = L.contiguous() if has_lr else y
    Rc = R.contiguous() if has_lr else y
    grid = (ntc * m + nb * split * m,)
    _gemv_kernel[grid](
        x, y, kw.qweight, kw.scale, kw.offset if kw.offset is not None else kw.scale,
        kw.lut if kw.lut is not None else kw.scale, bias if bias is not None else y, Lc, Rc, ws, tp, cnt,
        m, n, k, kw.qweight.shape[1], kw.scale.shape[1], kw.n_tiles, tps, split, ntc, rank,
        x.stride(0), y.stride(0),
        P=_flush_period(kw), BN=cfg.bn, RP=rp, KC_=KC, HAS_BIAS=bias is not None, HAS_LR=has_lr,
        SPLITK=split > 1, num_warps=cfg.warps, num_stages=cfg.stages, **_common(kw, cfg.bn))


def _launch_gemm(x, y, kw, L, R, bias, has_lr, cfg: Config) -> None:
    n, k = kw.shape
    m = x.shape[0]
    mbk, nbk = -(-m // cfg.bm), -(-n // cfg.bn)
    split, tps = _split(kw, mbk * nbk, cfg, x.device)
    rank = L.shape[1] if has_lr else 0
    if has_lr:
        t = torch.nn.functional.linear(x, R.to(x.dtype))  # (M, rank)
        Lc = L.contiguous()
    else:
        t = Lc = y
    cnt = _counters(kw, N_COUNTERS + mbk * nbk, x.device)
    ws = torch.empty(split * m * n if split > 1 else 1, dtype=torch.float32, device=x.device)
    grid = (mbk * nbk * split,)
    _gemm_kernel[grid](
        x, y, kw.qweight, kw.scale, kw.offset if kw.offset is not None else kw.scale,
        kw.lut if kw.lut is not None else kw.scale, bias if bias is not None else y, Lc, t, ws, cnt,
        m, n, k, kw.qweight.shape[1], kw.scale.shape[1], kw.n_tiles, tps, split, rank,
        x.stride(0), y.stride(0), t.stride(0),
        BM=cfg.bm, BN=cfg.bn, RP=_rank_pad(rank), HAS_BIAS=bias is not None, HAS_LR=has_lr,
        SPLITK=split > 1, num_warps=cfg.warps, num_stages=cfg.stages, **_common(kw, cfg.bn))


def candidates(kw: KernelWeight, m: int) -> list[Config]:
    """Configurations :func:`tune` tries for ``m`` tokens."""
    out: list[Config] = []
    if m <= 16:
        for bn, warps in ((32, 4), (64, 4), (128, 4), (128, 8)):
            if not _fast(kw, bn) and _fast(kw, 16):
                continue
            for occ in (2.0, 4.0, 8.0):
                out.append(Config(kind="gemv", bn=bn, warps=warps, occ=occ))
    if m > 1:
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


def tune(x: torch.Tensor, kw: KernelWeight, L=None, R=None, bias=None,
         configs: list[Config] | None = None, rep_ms: int = 20) -> tuple[Config, float]:
    """Time candidate configs for this input shape (CUDA events, median) and remember the best."""
    from triton.testing import do_bench

    m = x.reshape(-1, kw.shape[1]).shape[0]
    has_lr = L is not None and R is not None and L.shape[1] > 0
    best = (None, float("inf"))
    for cfg in configs or candidates(kw, m):
        try:
            ms = do_bench(lambda: linear(x, kw, L, R, bias, config=cfg), warmup=5, rep=rep_ms,
                          return_mode="median")
        except Exception:  # a config that does not compile/fit on this device (e.g. shared memory)
            continue
        if ms < best[1]:
            best = (cfg, ms)
    if best[0] is not None:
        _TUNED[_tune_key(kw, m, has_lr, x.dtype)] = best[0]
    return best


def set_config(kw: KernelWeight, m: int, has_lr: bool, dtype: torch.dtype, cfg: Config) -> None:
    _TUNED[_tune_key(kw, m, has_lr, dtype)] = cfg


__all__ = ["Config", "linear", "tune", "candidates", "default_config", "set_config", "replace"]
