"""GPTQ's column steps on a GPU in one Triton launch per block of columns and family (pure tensor math).

:func:`lqkit.core.gptq._sweep` in torch runs a few dozen small operations per column: on a GPU each is
a launch that costs more than its work, so a sweep over 4096-11008 columns was bound by launches (a
1 ms column step on an H200). Here one program holds a tile of stacked rows × one block of columns
in registers and does every column step of that block: group parameters (min-max, the clip search
over CLIP_SHRINK, in the stored scale dtype), rounding, the error feedback inside the block, and
writes codes, the reconstruction and the scaled errors; the lazy update of the columns after the
block stays one matmul in torch. Rows are independent given H except for groups along "out",
which a program holds whole (its tile is one group of ``group_size`` rows).

Two modes: groups along "in" with parameters fixed before the sweep (act-order's static groups:
the program reads them), and groups along "out" (the program computes each column's parameters).
Numerics follow the torch path: round half to even, correctly rounded divisions, the scale and
offset rounded to their stored dtype before use; sums may be ordered differently.

Imported only where triton is (:func:`lqkit.core.gptq._fused_sweep_ok`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCALE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _to_stored(v, SDT: tl.constexpr):
    if SDT == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif SDT == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v

@triton.jit
def _rne(t):  # 1.5·2^23: rounds |t| < 2^22 half to even in fp32, as torch.round
    return (t + 12582912.0) - 12582912.0

@triton.jit
def gptq_block(w_ptr, keep_ptr, codes_ptr, q_ptr, err_ptr, u_ptr, cols_ptr, qmax_ptr,
               sc_ptr, of_ptr, shrink_ptr,
               row0, nrows, b0, nb, n, ng, n_shrink, err_stride, err_col0,
               OUT: tl.constexpr, GS: tl.constexpr, ROWS: tl.constexpr, BB: tl.constexpr,
               HAS_KEEP: tl.constexpr, CLIP: tl.constexpr, SDT: tl.constexpr):
    pid = tl.program_id(0)
    local = pid * ROWS + tl.arange(0, ROWS)
    rmask = local < nrows
    rows = row0 + local  # stacked rows of this tile
    cidx = tl.arange(0, BB)
    cmask = cidx < nb
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * n + (b0 + cidx)[None, :]
    w = tl.load(w_ptr + offs, mask=m2, other=0.0)
    if HAS_KEEP:
        kp = tl.load(keep_ptr + offs, mask=m2, other=0).to(tl.int32)
    qmax = tl.load(qmax_ptr + rows, mask=rmask, other=1.0)  # (ROWS,)
    tiny = 1.1754943508222875e-38
    ct = tl.zeros([ROWS, BB], dtype=tl.float32)
    qt = tl.zeros([ROWS, BB], dtype=tl.float32)
    et = tl.zeros([ROWS, BB], dtype=tl.float32)
    for i in range(nb):
        sel = cidx[None, :] == i
        x = tl.sum(tl.where(sel, w, 0.0), axis=1)  # column i of the block, (ROWS,)
        if HAS_KEEP:
            kx = tl.sum(tl.where(sel, kp, 0), axis=1) != 0
        col = tl.load(cols_ptr + b0 + i).to(tl.int64)  # the original column of this sweep step
        if OUT:  # one group along "out": its parameters from this column
            xm = x
            if HAS_KEEP:
                xm = tl.where(kx, 0.0, x)
            qm = tl.max(qmax, axis=0)  # one member, one qmax
            lo = tl.minimum(tl.min(xm, axis=0), 0.0)
            hi = tl.maximum(tl.max(xm, axis=0), 0.0)
            best_e = tl.full((), float("inf"), tl.float32)
            best_s = tl.full((), 0.0, tl.float32)
            best_o = tl.full((), 0.0, tl.float32)
            n_p = 1
            if CLIP:
                n_p = n_shrink
            for k in range(n_p):
                p = tl.load(shrink_ptr + k)
                lp = lo * p
                sc = _to_stored(tl.math.div_rn(hi * p - lp, qm), SDT)
                s = tl.maximum(sc, tiny)
                z = tl.minimum(tl.maximum(_rne(tl.math.div_rn(-lp, s)), 0.0), qm)
                of = _to_stored(-z * sc, SDT)
                t = tl.math.div_rn(xm - of, s)
                d = (t - tl.minimum(tl.maximum(_rne(t), 0.0), qm)) * s
                e = tl.sum(d * d, axis=0)
                better = e < best_e
                best_e = tl.where(better, e, best_e)
                best_s = tl.where(better, sc, best_s)
                best_o = tl.where(better, of, best_o)
            tl.store(sc_ptr + col * ng + pid, best_s)
            tl.store(of_ptr + col * ng + pid, best_o)
            s = tl.maximum(best_s, tiny)
            o = best_o
        else:  # groups along "in", fixed before the sweep: read this column's
            g = col // GS
            poff = (rows - row0).to(tl.int64) * ng + g
            s = tl.maximum(tl.load(sc_ptr + poff, mask=rmask, other=1.0).to(tl.float32), tiny)
            o = tl.load(of_ptr + poff, mask=rmask, other=0.0).to(tl.float32)
        c = tl.minimum(tl.maximum(_rne(tl.math.div_rn(x - o, s)), 0.0), qmax)
        q = o + c * s
        if HAS_KEEP:
            q = tl.where(kx, x, q)
        dinv = tl.math.div_rn(1.0, tl.load(u_ptr + (b0 + i).to(tl.int64) * n + b0 + i))
        e = (x - q) * dinv
        urow = tl.load(u_ptr + (b0 + i).to(tl.int64) * n + b0 + cidx, mask=cmask & (cidx > i), other=0.0)
        w = w - e[:, None] * urow[None, :]
        ct = tl.where(sel, c[:, None], ct)
        qt = tl.where(sel, q[:, None], qt)
        et = tl.where(sel, e[:, None], et)
    tl.store(codes_ptr + offs, ct.to(tl.uint8), mask=m2)
    tl.store(q_ptr + offs, qt, mask=m2)
    eoffs = rows[:, None].to(tl.int64) * err_stride + err_col0 + cidx[None, :]
    tl.store(err_ptr + eoffs, et, mask=m2)



def supports_out_group(group_size: int) -> bool:
    """Groups along "out" this path holds in one tile: powers of two from 16 to 128 rows."""
    return 16 <= group_size <= 128 and group_size & (group_size - 1) == 0


def block_columns() -> int:
    """Columns per block on this path (the tile's width)."""
    return 32


def run_block(w: torch.Tensor, keep: torch.Tensor | None, codes: torch.Tensor, q: torch.Tensor,
              err: torch.Tensor, u: torch.Tensor, cols: torch.Tensor, qmax: torch.Tensor,
              scale: torch.Tensor, offset: torch.Tensor, shrink: torch.Tensor, *, row0: int, rows: int,
              b0: int, nb: int, out_groups: bool, group_size: int, clip: bool, err_col0: int = 0) -> None:
    """Column steps b0 .. b0+nb of one family's stacked rows [row0, row0 + rows) (in place).

    w, keep (uint8 or None), codes (uint8), q: (R, n) of the whole stack; err: (R, E) receives the
    scaled errors of this block at columns err_col0 .. err_col0+nb; u: (n, n) the upper Cholesky factor
    of H⁻¹ in sweep
    order; cols: (n,) int32 the original column of each sweep step; qmax: (R,) float.
    ``out_groups``: scale, offset (n, rows / group_size) are written, one per column and group;
    else they are the family's (rows, groups along "in") parameters, read at cols[j] // group_size."""
    bb = block_columns()
    if out_groups:
        tile, warps = group_size, 8 if group_size >= 128 else 4
        assert rows % group_size == 0 and supports_out_group(group_size)
    else:
        tile, warps = 32, 4
    ng = scale.shape[1]
    gptq_block[(-(-rows // tile),)](
        w, keep if keep is not None else w, codes, q, err, u, cols, qmax, scale, offset, shrink,
        row0, rows, b0, nb, w.shape[1], ng, shrink.numel(), err.stride(0), err_col0,
        OUT=out_groups, GS=group_size, ROWS=tile, BB=bb, HAS_KEEP=keep is not None, CLIP=clip,
        SDT=SCALE_DTYPES[scale.dtype], num_warps=warps)
