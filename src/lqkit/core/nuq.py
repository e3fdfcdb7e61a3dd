"""SqueezeLLM-style non-uniform quantization (Kim et al., 2023).

Each row of the layout matrix (an output channel for group_dim "in", an input channel for "out")
gets its own codebook of 2^b levels, found by weighted 1-D k-means (Lloyd) with the Fisher diagonal
as weights (uniform weights without statistics). Codes are bit-packed; the codebook is stored in
fp16, (rows, 2^b), and counted in the size. ``group_size`` is not used (one codebook per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import QuantContext, QuantSpec, Quantizer, AuxSlot, register, to_layout
from .stats import require

ITERS = 100  # Lloyd iterations at most (each is O(rows·k) after one sort)
TOL = 1e-5  # ... stopping early once an iteration improves the error by less than this fraction
WEIGHT_FLOOR = 1e-3  # weights below this fraction of a row's mean weight are raised to it
ROWS_CHUNK = 1 << 23  # elements of the rows whose k-means stops as one (its error summed over them)
ROWS_BATCH = 1 << 25  # elements of rows clustered at once, several chunks together (~60 bytes an element)
CHECK_EVERY = 8  # iterations between looks (a host sync) at whether every chunk has stopped


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of each row's sorted codebook c (rows, k) for x (rows, n)."""
    mids = (c[:, 1:] + c[:, :-1]) / 2  # (rows, k-1)
    if mids.shape[1] > 8:
        return torch.searchsorted(mids.contiguous(), x.contiguous())
    codes = torch.zeros(x.shape, dtype=torch.long, device=x.device)  # few levels: counting is faster
    for i in range(mids.shape[1]):
        codes += x > mids[:, i:i + 1]
    return codes


@dataclass(frozen=True)
class _Sorted:
    """Rows sorted once for any number of levels: the sorted values (fp64) and the prefix sums of
    w, w·x and w·x² along them (rows, n+1)."""

    xd: torch.Tensor
    p0: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor


def _sort_rows(x: torch.Tensor, weight: torch.Tensor) -> _Sorted:
    x, weight = x.float(), weight.float()
    rows = x.shape[0]
    order = torch.argsort(x, dim=1)
    xs, ws = torch.gather(x, 1, order), torch.gather(weight, 1, order)
    del order
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=x.device)
    wd, xd = ws.double(), xs.double()
    del xs, ws
    p0, p1, p2 = (torch.cat([zero, t.cumsum(1)], dim=1) for t in (wd, wd * xd, wd * xd * xd))  # (rows, n+1)
    return _Sorted(xd, p0, p1, p2)


def _lloyd(x: torch.Tensor, weight: torch.Tensor, k: int, iters: int, chunk: int, srt: _Sorted | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd k-means of every row of x (rows, n) into k levels, the rows in chunks of
    ``chunk`` rows that each stop on their own: a chunk stops once an iteration improves its error
    (summed over its rows) by less than TOL. Returns (codebooks (rows, k) fp64 sorted, history
    (iterations, chunks) fp64: each chunk's error of each iteration's assignment with its levels,
    repeated once the chunk has stopped). Every chunk goes through exactly the iterations it would
    alone; the loop looks at the host only every CHECK_EVERY iterations.

    In one dimension a cluster is a run of the sorted values, so after one sort every iteration is
    O(rows·k): the cluster boundaries are the midpoints' positions in the sorted row and each
    cluster's sums of w, w·x and w·x² are differences of prefix sums (fp64). ``srt``: those of x and
    weight, already made (:func:`_sort_rows`), shared by the runs of several k."""
    rows, n = x.shape
    n_chunks = -(-rows // chunk)
    srt = srt or _sort_rows(x, weight)
    xd, p0, p1, p2 = srt.xd, srt.p0, srt.p1, srt.p2
    cw = p0[:, 1:] / p0[:, -1:].clamp_min(1e-300)
    targets = (torch.arange(k, device=x.device, dtype=torch.float64) + 0.5) / k  # (k,)
    idx = torch.searchsorted(cw.contiguous(), targets.expand(rows, k).contiguous()).clamp_(max=n - 1)
    del cw
    c = torch.gather(xd, 1, idx)  # (rows, k), sorted
    ends = torch.full((rows, 1), n, dtype=torch.long, device=x.device)
    pad = n_chunks * chunk - rows
    stopped = torch.zeros(n_chunks, dtype=torch.bool, device=x.device)
    history: list[torch.Tensor] = []
    for t in range(iters):
        mids = (c[:, 1:] + c[:, :-1]) / 2  # an element goes to the cluster of the midpoints below it
        b = torch.cat([torch.zeros_like(ends), torch.searchsorted(xd, mids, right=True), ends], dim=1)  # (rows, k+1)
        s0, s1, s2 = (torch.gather(p, 1, b[:, 1:]) - torch.gather(p, 1, b[:, :-1]) for p in (p0, p1, p2))
        per_row = (s2 - 2 * c * s1 + c * c * s0).sum(dim=1)
        err = torch.nn.functional.pad(per_row, (0, pad)).view(n_chunks, chunk).sum(dim=1)  # (chunks,)
        if history:
            stopped |= history[-1] - err <= TOL * history[-1]
        history.append(err)
        go = (s0 > 0) & ~stopped.repeat_interleave(chunk)[:rows, None]
        c = torch.where(go, s1 / s0.clamp_min(1e-300), c)
        if (t + 1) % CHECK_EVERY == 0 and bool(stopped.all()):
            break
    return c, torch.stack(history)


def kmeans_1d(x: torch.Tensor, weight: torch.Tensor, k: int, iters: int = ITERS
              ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Weighted Lloyd k-means of every row of x (rows, n) into k levels.

    Returns (codebook (rows, k) sorted, codes (rows, n) int64, history) where history[t] is the
    weighted squared error Σ w·(x − c[code])² of iteration t's assignment with its levels (at most
    ``iters`` iterations, fewer once an iteration improves the error by less than TOL), and a last
    entry for the final levels; it never increases (each assignment and each centroid update is
    optimal given the other). Initialised at the weighted quantiles (t + ½)/k; an empty cluster
    keeps its level."""
    c, hist = _lloyd(x, weight, k, iters, x.shape[0])
    h = hist[:, 0].tolist()
    stop = next((t for t in range(1, len(h)) if h[t - 1] - h[t] <= TOL * h[t - 1]), len(h) - 1)
    history = h[:stop + 1]
    c = c.float()
    codes = _assign(x.float(), c)
    history.append(float((weight.float() * (x.float() - torch.gather(c, 1, codes)) ** 2).sum()))
    return c, codes, history


def codebooks(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k-level codebook (rows, k), fp32 sorted, of every row of x (rows, n): rows in chunks of
    ROWS_CHUNK elements that stop on their own (bounded memory, a result that does not depend on
    the device), several chunks clustered at once (few launches on a GPU)."""
    return codebooks_many(x, weight, [k])[0]


def codebooks_many(x: torch.Tensor, weight: torch.Tensor, ks: list[int]) -> list[torch.Tensor]:
    """:func:`codebooks` of x for each number of levels in ``ks``, the rows sorted once for all."""
    chunk = max(1, ROWS_CHUNK // x.shape[1])
    batch = chunk * max(1, ROWS_BATCH // (chunk * x.shape[1]))
    parts: list[list[torch.Tensor]] = [[] for _ in ks]
    for i in range(0, x.shape[0], batch):
        xb, wb = x[i:i + batch], weight[i:i + batch]
        srt = _sort_rows(xb, wb)
        for j, k in enumerate(ks):
            parts[j].append(_lloyd(xb, wb, k, ITERS, chunk, srt)[0].float())
        del srt
    return [torch.cat(p) for p in parts]


def _inputs(m: torch.Tensor, spec: QuantSpec, ctx: QuantContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layout matrix to cluster, its weights): outliers zeroed, with no weight."""
    f = ctx.stats.fisher if ctx.stats is not None else None
    if f is None and ctx.stats is not None and ctx.stats.fisher_sums is not None:
        require(ctx.stats, "fisher", "nuq's Fisher-weighted codebooks")  # only sums kept: say so, never guess
    wt = torch.ones_like(m) if f is None else to_layout(f.to(m.device).float(), spec).clamp_min(0)
    wt = torch.maximum(wt, WEIGHT_FLOOR * wt.mean(dim=1, keepdim=True).clamp_min(1e-30))
    x = m
    if ctx.keep is not None:  # kept outliers: no weight, and no pull on the levels
        keep = to_layout(ctx.keep, spec)
        wt, x = wt.masked_fill(keep, 0.0), m.masked_fill(keep, 0.0)
    return x, wt


def _encode(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(codes (rows, cols) uint8, aux) of x against the codebook c."""
    book = c.to(torch.float16)  # stored codebook; codes assigned against the rounded levels
    return _assign(x, book.float()).to(torch.uint8), {"codebook": book}


def _nuq_quantize_many(w: torch.Tensor, specs, ctxs) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Batched entry (w in (out, in) orientation): the configurations that cluster the same matrix
    (group dim and outliers alike, any bits) sort its rows once."""
    out: dict[int, tuple] = {}
    same: dict[tuple, list[int]] = {}
    for i, (s, c) in enumerate(zip(specs, ctxs)):
        same.setdefault((s.group_dim, id(c.keep)), []).append(i)
    for idx in same.values():
        s0 = specs[idx[0]]
        x, wt = _inputs(to_layout(w, s0), s0, ctxs[idx[0]])
        for i, c in zip(idx, codebooks_many(x, wt, [1 << specs[i].bits for i in idx])):
            out[i] = _encode(x, c)
    return [out[i] for i in range(len(specs))]


def _nuq_quantize(m: torch.Tensor, spec: QuantSpec, ctx: QuantContext):
    x, wt = _inputs(m, spec, ctx)
    return _encode(x, codebooks(x, wt, 1 << spec.bits))


def _nuq_dequantize(codes, aux, spec):
    return torch.gather(aux["codebook"].float(), 1, codes.long())


register(Quantizer(
    name="nuq",
    bits_allowed=frozenset(range(2, 9)),
    quantize=_nuq_quantize,
    dequantize=_nuq_dequantize,
    aux_layout=lambda spec, rows, cols: {"codebook": AuxSlot((rows, 1 << spec.bits), torch.float16)},
    data_aware=True,
    kernel_format="nuq",  # a table per layout row: per output row ("in") or per input column ("out")
    quantize_many=_nuq_quantize_many,
))
