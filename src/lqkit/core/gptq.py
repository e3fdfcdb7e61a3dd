"""GPTQ (Frantar et al., 2022): uniform asymmetric quantization with Hessian error feedback.

Minimises tr(E·H·Eᵀ), E = W − Q, H = E[xᵀx] the layer's input second moment, column by column
along the input dimension: each quantized column's error, scaled by the inverse-Hessian row, is
pushed onto the columns not yet quantized. Uses the upper Cholesky factor U of H⁻¹ (damped), lazy
updates in blocks of BLOCK columns, optional act-order (columns by decreasing diag H; group
parameters are then fixed from the original W before the sweep, "static groups"), and groups along
either dimension. Codes and aux are stored exactly as ``rtn``'s (scale, offset per group), so the
module, size accounting and fused kernels treat them alike.

Positions in ``ctx.keep`` (exactly kept outliers) get zero error: they take whatever value the
feedback has given them, returned as aux["kept"], and are left out of the group ranges.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from .quant import (DTYPES, QUANTIZERS, QuantContext, QuantSpec, Quantizer, _rtn_dequantize, from_layout,
                    n_groups, register, to_layout)
from .stats import damped, require

BLOCK = 128  # columns per lazy-update block


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (damped H)⁻¹; dampening grows ×10 until H is positive definite."""
    if not torch.isfinite(h).all():
        raise SpecError("the input second-moment matrix H has NaN/inf entries; re-run calibration")
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(damped(h, damp).double())
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u.float()
        damp *= 10
    raise SpecError("H is not positive definite even with heavy dampening; check the calibration data")


def _params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (scale, offset) of the rtn quantizer's groups along the last dim of x (rows, cols):
    exactly RTN's grid (whatever its range rule), so GPTQ and RTN differ only in the rounding."""
    _, aux = QUANTIZERS["rtn"].quantize(x, spec)
    return aux["scale"], aux["offset"]


def gptq(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, keep: torch.Tensor | None = None):
    """GPTQ of an (out, in) matrix. Returns (codes (out, in) uint8, scale, offset, q) where scale and
    offset are in the layout of ``spec.group_dim`` and q is the fp32 reconstruction (exact at keep)."""
    out, n = w.shape
    gs, qmax, by_in = spec.group_size, (1 << spec.bits) - 1, spec.group_dim == "in"
    w = w.float().clone()
    keep = torch.zeros_like(w, dtype=torch.bool) if keep is None else keep
    dead = torch.diagonal(h) <= 0
    w[:, dead & ~keep.any(0)] = 0.0  # inputs that are always zero: any value works, 0 is cheapest
    perm = torch.argsort(torch.diagonal(h), descending=True) if spec.act_order else None
    valid = torch.where(keep, torch.zeros_like(w), w)  # outliers excluded from group ranges
    if by_in:
        ng = n_groups(n, gs)
        scale = torch.zeros(out, ng, dtype=DTYPES[spec.scale_dtype], device=w.device)
        offset = torch.zeros_like(scale)
        if spec.act_order:  # static groups from the original W
            scale, offset = _params(valid, spec)
    else:
        ngo = n_groups(out, gs)
        scale = torch.zeros(n, ngo, dtype=DTYPES[spec.scale_dtype], device=w.device)
        offset = torch.zeros_like(scale)
    if perm is not None:
        w, keep, h = w[:, perm], keep[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, spec.damp)  # (n, n) upper
    dinv = (1.0 / torch.diagonal(u)).tolist()
    cols = perm.tolist() if perm is not None else list(range(n))  # original column of sweep step j
    has_keep = bool(keep.any())
    tiny = torch.finfo(torch.float32).tiny
    codes = torch.zeros(out, n, dtype=torch.uint8, device=w.device)
    q_all = torch.zeros_like(w)
    g_cur, s, o = -1, None, None
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        wb = w[:, b0:b1].clone()  # (out, B) columns of this block, updated in place
        err, cb, qb = torch.zeros_like(wb), torch.zeros_like(wb), torch.zeros_like(wb)
        for i in range(b1 - b0):
            j = b0 + i
            col = cols[j]
            x = wb[:, i]
            if by_in:
                g = col // gs
                if perm is None and col % gs == 0:  # lazy group parameters from the current W
                    blk = torch.cat([wb[:, i:], w[:, b1:]], dim=1)[:, :gs]
                    sc, of = _params(torch.where(keep[:, j:j + blk.shape[1]], 0.0, blk), spec)
                    scale[:, g], offset[:, g] = sc[:, 0], of[:, 0]
                    g_cur = -1
                if g != g_cur:
                    g_cur, s, o = g, scale[:, g].float().clamp_min(tiny), offset[:, g].float()
            else:
                sc, of = _params(torch.where(keep[:, j], 0.0, x).unsqueeze(0), spec)  # (1, ngo)
                scale[col], offset[col] = sc[0], of[0]
                s = scale[col].float().clamp_min(tiny).repeat_interleave(gs)[:out]
                o = offset[col].float().repeat_interleave(gs)[:out]
            c = torch.round((x - o) / s).clamp_(0, qmax)
            q = c * s + o
            if has_keep:
                q = torch.where(keep[:, j], x, q)
            cb[:, i], qb[:, i] = c, q
            e = (x - q) * dinv[j]
            wb[:, i:].addr_(e, u[j, j:b1], alpha=-1.0)
            err[:, i] = e
        codes[:, b0:b1], q_all[:, b0:b1] = cb.to(torch.uint8), qb
        w[:, b1:] -= err @ u[b0:b1, b1:]
    if perm is not None:
        inv = torch.argsort(perm)
        codes, q_all = codes[:, inv], q_all[:, inv]
    return codes, scale, offset, q_all


def _gptq_quantize(m: torch.Tensor, spec: QuantSpec, ctx: QuantContext):
    h = require(ctx.stats, "h", "the gptq quantizer")
    w = from_layout(m, spec)
    if h.shape != (w.shape[1], w.shape[1]):
        raise SpecError(f"H has shape {tuple(h.shape)} but the matrix has {w.shape[1]} inputs; "
                        "the statistics belong to another model")
    codes, scale, offset, q = gptq(w, h.to(w.device), spec, ctx.keep)
    aux = {"scale": scale, "offset": offset}
    if ctx.keep is not None:
        aux["kept"] = q
    return to_layout(codes, spec).contiguous(), aux


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
))
