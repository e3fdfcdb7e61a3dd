"""GPTQ (Frantar et al., 2022): uniform asymmetric quantization with Hessian error feedback.

Minimises tr(E·H·Eᵀ), E = W − Q, H = E[xᵀx] the layer's input second moment, column by column
along the input dimension: each quantized column's error, scaled by the inverse-Hessian row, is
pushed onto the columns not yet quantized. Uses the upper Cholesky factor U of H⁻¹ (damped), lazy
updates in blocks of BLOCK columns, optional act-order (columns by decreasing diag H; group
parameters are then fixed from the original W before the sweep, "static groups"), and groups along
either dimension. Codes and aux are stored exactly as ``rtn``'s (scale, offset per group), so the
module, size accounting and fused kernels treat them alike.

Rows of W are independent given H, so several configurations (bits, group size, group dim,
outliers) of one matrix run as one sweep over a stack of copies of W (:func:`gptq_many`): the
Cholesky factor, the Python loop over columns and the lazy block updates are shared, which is what
makes a cost table over many candidates affordable. A single configuration is the stack of one.

Positions in ``keep`` (exactly kept outliers) get zero error: they take whatever value the
feedback has given them, returned as aux["kept"], and are left out of the group ranges.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import SpecError
from .quant import (DTYPES, QUANTIZERS, QuantContext, QuantSpec, Quantizer, _rtn_dequantize, from_layout,
                    _shrink_factors, minmax_params, n_groups, register, to_groups, to_layout)
from .stats import cholesky_, damped, invert_lower_, memo_on, require

BLOCK = 32  # columns per lazy-update block (rank-1 updates inside a block, one matmul per block)
SUPER = 128  # the fused sweep's second level: blocks update the rest of their super-block, which updates the rest
MAX_STACK = 1 << 25  # elements of the stacked weight per sweep on a CPU (larger stacks run in several sweeps)
MAX_STACK_CUDA = 1 << 28  # ... on a GPU at most (and at most a 40th of its free memory, ~10 bytes an element)


def max_stack(device: torch.device) -> int:
    """Elements of the stacked weight one sweep takes on ``device``. On a GPU each column step is a
    few kernel launches whatever the stack's height, so fewer, taller sweeps are faster: as tall as a
    40th of the free memory allows (a sweep holds about 10 bytes an element), up to MAX_STACK_CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return MAX_STACK
    return max(MAX_STACK, min(MAX_STACK_CUDA, free_memory(device) // 40))


def free_memory(device: torch.device) -> int:
    """Bytes this process may still take on a GPU: the device's free memory, or less where the process
    is held to a fraction of the GPU (``torch.cuda.set_per_process_memory_fraction``, e.g. ``lqkit
    compress --max-gpu-memory``): that share less what the process has reserved."""
    free, total = torch.cuda.mem_get_info(device)
    frac = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    if frac < 1.0:
        free = min(free, max(0, int(frac * total) - torch.cuda.memory_reserved(device)))
    return free


@dataclass(frozen=True)
class GPTQResult:
    """One configuration's outcome: codes (out, in) uint8; scale, offset in the layout of
    ``spec.group_dim`` (as rtn stores them); q the fp32 reconstruction (exact at kept positions)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    q: torch.Tensor


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (damped H)⁻¹ (UᵀU = H⁻¹); dampening grows ×10 until H is positive
    definite. H⁻¹ is never formed: with J the reversal of the order and M the lower Cholesky factor of
    J·H·J, H = (J·M·J)(J·M·J)ᵀ with J·M·J upper triangular, so U = (J·M·J)⁻¹ = J·M⁻¹·J — one
    factorisation and one triangular inverse, both in place in one fp64 n×n matrix (a 28672-wide H is
    6.6 GB a copy)."""
    if not torch.isfinite(h).all():
        raise SpecError("the input second-moment matrix H has NaN/inf entries; re-run calibration")
    for _ in range(6):
        m = damped(h, damp).flip(0, 1).double()  # J·H·J
        if cholesky_(m):
            return invert_lower_(m).float().flip(0, 1)  # J·M⁻¹·J
        del m
        damp *= 10
    raise SpecError("H is not positive definite even with heavy dampening; check the calibration data")


@dataclass
class _Family:
    """Configurations sharing (group dim, group size, scale dtype, clip), i.e. one group-parameter rule
    up to the number of levels: a contiguous slice of the stacked rows, ``out`` rows per member."""

    group_dim: str
    group_size: int
    dtype: torch.dtype  # stored dtype of scales and offsets
    clip: bool  # MSE search of each group's range
    members: list[int]  # indices into the caller's spec list
    qmax: torch.Tensor  # (members, 1) float: 2^bits − 1 of each member
    start: int  # first stacked row
    rows: int  # members × out
    scale: torch.Tensor | None = None  # "in": (rows, ng); "out": (members, n, ngo)
    offset: torch.Tensor | None = None

    def row_qmax(self, out: int) -> torch.Tensor:
        return self.qmax.repeat_interleave(out, dim=0)  # (rows, 1)


def _families(specs: Sequence[QuantSpec], out: int, device) -> list[_Family]:
    by_key: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        by_key.setdefault((s.group_dim, s.group_size, s.scale_dtype, s.clip), []).append(i)
    fams, start = [], 0
    for (dim, gs, dt, clip), members in by_key.items():
        qmax = torch.tensor([[float((1 << specs[k].bits) - 1)] for k in members], device=device)
        fams.append(_Family(dim, gs, DTYPES[dt], clip, members, qmax, start, len(members) * out))
        start += len(members) * out
    return fams


@dataclass
class _OutGroups:
    """The output-dimension groups of one "out" family as a (G, group size) table that one set of
    operations per column serves. A group's slots follow ``to_groups`` (a short last group repeats
    its last row). When the group size divides ``out`` the table is a view of the family's stacked
    rows (``view``): no gather."""

    fam: _Family
    idx: torch.Tensor  # (G, group size) stacked row of each slot
    qmax: torch.Tensor  # (G,)
    rows: torch.Tensor  # (R,) the stacked rows of the family
    row_group: torch.Tensor  # (R,) the group of each of those rows, member-major
    scale: torch.Tensor | None = None  # (n, G) per column
    offset: torch.Tensor | None = None
    view: slice | None = None  # the family's stacked rows, when its groups tile them exactly


def _out_groups(fams: list[_Family], out: int, n: int, device) -> list[_OutGroups]:
    res = []
    for f in fams:  # one table per family: padding groups to the largest group size would cost work
        if f.group_dim != "out":
            continue
        gs = f.group_size
        idx, qmax, rows, row_group = [], [], [], []
        for m in range(len(f.members)):
            base = f.start + m * out
            for g in range(n_groups(out, gs)):
                lo, hi = g * gs, min((g + 1) * gs, out)
                members = list(range(base + lo, base + hi))
                idx.append(members + [base + hi - 1] * (gs - len(members)))
                qmax.append(float(f.qmax[m, 0]))
                rows.extend(members)
                row_group.extend([len(idx) - 1] * len(members))
        t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        og = _OutGroups(f, t(idx, torch.long), t(qmax, torch.float32), t(rows, torch.long), t(row_group, torch.long))
        if out % gs == 0:
            og.view = slice(f.start, f.start + f.rows)
        og.scale = torch.zeros(n, len(idx), dtype=f.dtype, device=device)
        og.offset = torch.zeros_like(og.scale)
        res.append(og)
    return res


def _fused_sweep_ok(w: torch.Tensor, fams: list[_Family], static: bool, out: int) -> bool:
    """Whether the sweep runs as one Triton launch per block and family (:mod:`.gptq_triton`): on a
    GPU with triton (LQKIT_GPTQ_FUSED=0 turns it off), groups along "in" fixed before the sweep
    (act-order) or absent, and groups along "out" that a tile holds (16-128 rows, dividing ``out``)."""
    if os.environ.get("LQKIT_GPTQ_FUSED", "1") == "0" or not _triton_ok(w.device):
        return False
    from .gptq_triton import supports_out_group

    return all(static if f.group_dim == "in" else (supports_out_group(f.group_size) and out % f.group_size == 0)
               for f in fams)


def _triton_ok(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _fused_sweep(w: torch.Tensor, keep: torch.Tensor, qmax: torch.Tensor, fams: list[_Family], u: torch.Tensor,
                 perm: torch.Tensor | None, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_sweep` with each block's column steps in one Triton launch per family (same results
    up to the order of sums; see :mod:`.gptq_triton`)."""
    from . import gptq_triton as gt

    rows, n = w.shape
    bb = gt.block_columns()
    u = u.contiguous()  # the kernel reads rows of u (cholesky_ex may return it column-major)
    codes = torch.zeros(rows, n, dtype=torch.uint8, device=w.device)
    q_all = torch.zeros_like(w)
    err = torch.empty(rows, SUPER, device=w.device)
    kp = keep.view(torch.uint8) if bool(keep.any()) else None
    cols = (perm if perm is not None else torch.arange(n, device=w.device)).to(torch.int32)
    shrink = _shrink_factors(w.device)
    params = {}
    for f in fams:
        if f.group_dim == "out":
            sc = torch.zeros(n, f.rows // f.group_size, dtype=f.dtype, device=w.device)
            params[id(f)] = (sc, torch.zeros_like(sc))
        else:
            f.scale, f.offset = f.scale.contiguous(), f.offset.contiguous()  # the kernel reads them row-major
            params[id(f)] = (f.scale, f.offset)
    for s0 in range(0, n, SUPER):  # lazy updates in two levels: inside a super-block, then past it
        s1 = min(s0 + SUPER, n)
        for b0 in range(s0, s1, bb):
            b1 = min(b0 + bb, s1)
            for f in fams:
                sc, of = params[id(f)]
                gt.run_block(w, kp, codes, q_all, err, u, cols, qmax, sc, of, shrink, row0=f.start, rows=f.rows,
                             b0=b0, nb=b1 - b0, out_groups=f.group_dim == "out", group_size=f.group_size,
                             clip=f.clip, err_col0=b0 - s0)
            if b1 < s1:
                w[:, b1:s1].addmm_(err[:, b0 - s0:b1 - s0], u[b0:b1, b1:s1], alpha=-1.0)
        if s1 < n:
            w[:, s1:].addmm_(err[:, :s1 - s0], u[s0:s1, s1:], alpha=-1.0)
    for f in fams:
        if f.group_dim == "out":
            k = len(f.members)
            sc, of = params[id(f)]
            f.scale = sc.reshape(n, k, -1).permute(1, 0, 2).contiguous()
            f.offset = of.reshape(n, k, -1).permute(1, 0, 2).contiguous()
    return codes, q_all


def _sweep(wT: torch.Tensor, keepT: torch.Tensor | None, qmax: torch.Tensor, fams: list[_Family], u: torch.Tensor,
           perm: torch.Tensor | None, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ sweep over the stack given transposed, Wᵀ (n, rows) in the sweep's column order (modified
    in place), with its kept positions ``keepT`` (bool, or None for none). Fills the families' group
    parameters; returns (codesᵀ uint8, qᵀ), (n, rows), in the sweep's order.

    Working on Wᵀ, every per-column operation reads and writes one contiguous vector and a block of
    columns is a slice of rows, with no copies. Lazy updates in two levels: after each block of BLOCK
    columns, the rest of its super-block of SUPER columns; after each super-block, everything past it.
    With static groups (act-order) the scales and offsets of a whole block are gathered once, not
    column by column."""
    n, rows = wT.shape
    dinv = (1.0 / torch.diagonal(u)).tolist()
    cols = perm.tolist() if perm is not None else list(range(n))  # original column of sweep step j
    has_keep = keepT is not None
    tiny = torch.finfo(torch.float32).tiny
    codesT = torch.empty(n, rows, dtype=torch.uint8, device=wT.device)
    qT = torch.empty_like(wT)
    static = perm is not None  # act-order: "in" groups fixed before the sweep
    row_qmax = {id(f): f.row_qmax(out) for f in fams if f.group_dim == "in"}
    col_t = torch.tensor(cols, device=wT.device)  # group of each sweep step, gathered per block without a host copy
    outs = _out_groups(fams, out, n, wT.device)
    ins = [f for f in fams if f.group_dim == "in"]
    s_run = torch.ones(rows, device=wT.device)  # lazy groups: the current scale and offset of each row
    o_run = torch.zeros(rows, device=wT.device)
    err_s = torch.empty(SUPER, rows, device=wT.device)  # the scaled errors of the current super-block's steps
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        s1 = min((b0 // SUPER + 1) * SUPER, n)  # end of this block's super-block
        nb = b1 - b0
        wt, ct, qt = wT[b0:b1], codesT[b0:b1], qT[b0:b1]  # (B, rows) views
        kt = keepT[b0:b1] if has_keep else None
        err = err_s[b0 % SUPER:b0 % SUPER + nb]
        st = torch.ones_like(wt)  # scale and offset of each (column, stacked row)
        ot = torch.zeros_like(wt)
        if static:
            for f in ins:
                g = col_t[b0:b1] // f.group_size
                st[:, f.start:f.start + f.rows] = f.scale[:, g].T.float().clamp_min(tiny)
                ot[:, f.start:f.start + f.rows] = f.offset[:, g].T.float()
        for i in range(nb):
            j = b0 + i
            col = cols[j]
            x = wt[i]
            if not static:  # lazy group parameters from the current W, at each group's first column
                for f in ins:
                    sl = slice(f.start, f.start + f.rows)
                    if col % f.group_size == 0:
                        blk = wT[j:j + f.group_size, sl].T  # steps past this super-block lack its updates
                        if has_keep:
                            blk = torch.where(keepT[j:j + f.group_size, sl].T, 0.0, blk)
                        sc, of = minmax_params(blk.unsqueeze(1), row_qmax[id(f)], f.dtype, f.clip)  # (rows, 1)
                        g = col // f.group_size
                        f.scale[:, g], f.offset[:, g] = sc[:, 0], of[:, 0]
                        s_run[sl], o_run[sl] = sc[:, 0].float().clamp_min(tiny), of[:, 0].float()
                    st[i, sl], ot[i, sl] = s_run[sl], o_run[sl]
            for og in outs:  # per column: every group of each "out" family at once
                if og.view is not None:  # (G, group size) views: no gather
                    gs = og.idx.shape[1]
                    xg = x[og.view].view(-1, gs)
                    if has_keep:
                        xg = torch.where(kt[i][og.view].view(-1, gs), 0.0, xg)
                    sc, of = minmax_params(xg, og.qmax, og.fam.dtype, og.fam.clip)  # (G,)
                    st[i, og.view].view(-1, gs).copy_(sc.float().clamp_min(tiny).unsqueeze(1).expand(-1, gs))
                    ot[i, og.view].view(-1, gs).copy_(of.float().unsqueeze(1).expand(-1, gs))
                else:
                    xg = x[og.idx]  # (G, group size)
                    if has_keep:
                        xg = torch.where(kt[i][og.idx], 0.0, xg)
                    sc, of = minmax_params(xg, og.qmax, og.fam.dtype, og.fam.clip)  # (G,)
                    st[i, og.rows] = sc.float().clamp_min(tiny)[og.row_group]
                    ot[i, og.rows] = of.float()[og.row_group]
                og.scale[col], og.offset[col] = sc, of
            s, o = st[i], ot[i]
            c = torch.minimum(torch.round((x - o) / s).clamp_(min=0), qmax)
            q = torch.addcmul(o, c, s)
            if has_keep:
                q = torch.where(kt[i], x, q)
            ct[i], qt[i] = c, q
            e = torch.sub(x, q, out=err[i]).mul_(dinv[j])
            if i + 1 < nb:
                wt[i + 1:].addr_(u[j, j + 1:b1], e, alpha=-1.0)
        if b1 < s1:
            wT[b1:s1].addmm_(u[b0:b1, b1:s1].T, err, alpha=-1.0)
        elif s1 < n:
            s0 = s1 - SUPER
            wT[s1:].addmm_(u[s0:s1, s1:].T, err_s, alpha=-1.0)
    for og in outs:  # back to the family's (members, n, ngo) layout
        f, k = og.fam, len(og.fam.members)
        f.scale = og.scale.reshape(n, k, -1).permute(1, 0, 2).contiguous()
        f.offset = og.offset.reshape(n, k, -1).permute(1, 0, 2).contiguous()
    return codesT, qT


def gptq_many(w: torch.Tensor, h: torch.Tensor, specs: Sequence[QuantSpec],
              keeps: Sequence[torch.Tensor | None] | None = None) -> list[GPTQResult]:
    """GPTQ of one (out, in) matrix under several configurations at once (one result per spec).

    The specs must agree on ``act_order`` and ``damp`` (they share H's factorisation and column
    order); bits, group size, group dim and scale dtype may differ. ``keeps[k]``: bool (out, in)
    positions of spec k stored exactly elsewhere (outliers), or None."""
    if not specs:
        return []
    if len({(s.act_order, s.damp) for s in specs}) > 1:
        raise SpecError("gptq_many needs specs with one act_order and damp setting")
    out, n = w.shape
    keeps = list(keeps) if keeps is not None else [None] * len(specs)
    per_sweep = max(1, max_stack(w.device) // (out * n))
    u_perm = _factor(h, specs[0])
    results: dict[int, GPTQResult] = {}
    order = sorted(range(len(specs)), key=lambda k: (specs[k].group_dim, specs[k].group_size, specs[k].bits))
    for c0 in range(0, len(order), per_sweep):
        chunk = order[c0:c0 + per_sweep]
        for k, r in zip(chunk, _gptq_stack(w, h, [specs[k] for k in chunk], [keeps[k] for k in chunk], u_perm)):
            results[k] = r
    return [results[k] for k in range(len(specs))]


def _factor(h: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(U, perm): the upper Cholesky factor of the damped H⁻¹ in sweep order, and that order.
    Remembered per H: a cost-table row runs its GPTQ configurations in many chunks on one H."""
    def make() -> tuple[torch.Tensor, torch.Tensor | None]:
        perm = torch.argsort(torch.diagonal(h), descending=True) if spec.act_order else None
        hp = h[perm][:, perm] if perm is not None else h
        return inverse_cholesky(hp, spec.damp), perm
    return memo_on(h, ("gptq-factor", spec.act_order, spec.damp), make)


def _gptq_stack(w, h, specs, keeps, u_perm) -> list[GPTQResult]:
    """GPTQ of ``w`` under ``specs`` stacked in one sweep. The stack is built in the sweep's column
    order (permuting the one matrix, not the stack), transposed for the torch sweep, and the results
    are put back in order by rows of the transposed stack: the same values as permuting the stack."""
    out, n = w.shape
    u, perm = u_perm
    fams = _families(specs, out, w.device)
    stack_order = [k for f in fams for k in f.members]  # stacked block b holds specs[stack_order[b]]
    w32 = w.float()
    dead = torch.diagonal(h) <= 0  # inputs that are always zero: any value works, 0 is cheapest
    any_dead = bool(dead.any())
    w_dead = w32.masked_fill(dead, 0.0) if any_dead else w32
    for f in fams:  # static groups (act-order) from the original W, outliers and dead inputs excluded
        if f.group_dim == "in":
            if perm is not None:
                part = torch.cat([w_dead if keeps[k] is None else w_dead.masked_fill(keeps[k], 0.0) for k in f.members])
                f.scale, f.offset = minmax_params(to_groups(part, f.group_size), f.row_qmax(out), f.dtype, f.clip)
            else:
                f.scale = torch.zeros(f.rows, n_groups(n, f.group_size), dtype=f.dtype, device=w.device)
                f.offset = torch.zeros_like(f.scale)
    qmax = torch.cat([f.row_qmax(out)[:, 0] for f in fams])
    wp = w32[:, perm] if perm is not None else w32  # (out, n) in the sweep's column order
    kp = [None if keeps[k] is None else (keeps[k][:, perm] if perm is not None else keeps[k]) for k in stack_order]
    deadp = dead[perm] if perm is not None else dead

    def member_rows(wq: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """A member's (out, n) rows of the stack: dead inputs zeroed unless kept."""
        if not any_dead:
            return wq
        return torch.where(deadp & ~keep, 0.0, wq) if keep is not None else wq.masked_fill(deadp, 0.0)

    K = len(specs)
    if _fused_sweep_ok(w, fams, perm is not None, out):
        W = wp.repeat(K, 1)
        keep = torch.zeros_like(W, dtype=torch.bool)
        for b, k in enumerate(kp):
            if k is not None:
                keep[b * out:(b + 1) * out] = k
            if any_dead:
                W[b * out:(b + 1) * out] = member_rows(wp, k)
        codes, q = _fused_sweep(W, keep, qmax, fams, u, perm, out)
        if perm is not None:
            inv = torch.argsort(perm)
            codes, q = codes[:, inv], q[:, inv]
    else:
        wT = wp.T.contiguous().repeat(1, K)  # (n, K·out)
        keepT = None
        if any(k is not None for k in kp):
            keepT = torch.zeros_like(wT, dtype=torch.bool)
            for b, k in enumerate(kp):
                if k is not None:
                    keepT[:, b * out:(b + 1) * out] = k.T
        if any_dead:
            for b, k in enumerate(kp):
                wT[:, b * out:(b + 1) * out] = member_rows(wp, k).T
        codesT, qT = _sweep(wT, keepT, qmax, fams, u, perm, out)
        del wT, keepT
        if perm is not None:
            inv = torch.argsort(perm)
            codesT, qT = codesT[inv], qT[inv]
        codes, q = codesT.T, qT.T
    results = {}
    for f in fams:
        for m, k in enumerate(f.members):
            rows = slice(f.start + m * out, f.start + (m + 1) * out)
            if f.group_dim == "in":
                sc, of = f.scale[m * out:(m + 1) * out], f.offset[m * out:(m + 1) * out]
            else:
                sc, of = f.scale[m], f.offset[m]
            results[k] = GPTQResult(codes[rows].contiguous(), sc.contiguous(), of.contiguous(), q[rows].contiguous())
    return [results[k] for k in range(len(specs))]


def gptq(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None) -> GPTQResult:
    """GPTQ of an (out, in) matrix under one configuration."""
    return gptq_many(w, h, [spec], [keep])[0]


def _check_h(h: torch.Tensor, w: torch.Tensor) -> None:
    if h.shape != (w.shape[1], w.shape[1]):
        raise SpecError(f"H has shape {tuple(h.shape)} but the matrix has {w.shape[1]} inputs; "
                        "the statistics belong to another model")


def _aux(r: GPTQResult, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
    aux = {"scale": r.scale, "offset": r.offset}
    if keep is not None:
        aux["kept"] = r.q
    return aux


def _gptq_quantize(m: torch.Tensor, spec: QuantSpec, ctx: QuantContext):
    h = require(ctx.stats, "h", "the gptq quantizer")
    w = from_layout(m, spec)
    _check_h(h, w)
    r = gptq(w, h.to(w.device), spec, ctx.keep)
    return to_layout(r.codes, spec).contiguous(), _aux(r, ctx.keep)


def _gptq_quantize_many(w: torch.Tensor, specs: Sequence[QuantSpec], ctxs: Sequence[QuantContext]):
    """Batched entry for :func:`lqkit.core.quant.quantize_many`: w in (out, in) orientation."""
    h = require(ctxs[0].stats, "h", "the gptq quantizer")
    _check_h(h, w)
    results = gptq_many(w, h.to(w.device), specs, [c.keep for c in ctxs])
    return [(to_layout(r.codes, s).contiguous(), _aux(r, c.keep)) for r, s, c in zip(results, specs, ctxs)]


def _gptq_aux_layout(spec, rows, cols):
    return QUANTIZERS["rtn"].aux_layout(spec, rows, cols)


register(Quantizer(
    name="gptq",
    bits_allowed=frozenset(range(2, 9)),
    quantize=_gptq_quantize,
    dequantize=_rtn_dequantize,
    aux_layout=_gptq_aux_layout,
    data_aware=True,
    kernel_format="rtn",
    quantize_many=_gptq_quantize_many,
))
