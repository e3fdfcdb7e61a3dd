"""Per-row quantization of embedding tables and output heads, and their cost rows (pure tensor math).

A table W of shape (rows, dim) — a token embedding, or an output head whose rows are vocabulary
entries — is stored row by row: each row (or each group of ``group_size`` consecutive entries of a
row) has its own scale, ``symmetric`` codes ``c ∈ [0, 2^b)`` with ``w ≈ (c − 2^(b−1))·scale``
(scale = absmax / (2^(b−1) − 1)), or asymmetric codes with ``w ≈ c·scale + offset`` (min-max).
Codes are bit-packed (:mod:`.packing`) row by row, so that one row's codes are one contiguous slice
of ``dim·b/8`` bytes: a lookup unpacks only the rows it reads.

Sensitivity (:class:`TableStats`) has two sides, each on the scale of the cost table's "kfac"
errors of the linear layers (a diagonal-Fisher estimate of the loss increase), so that both enter
one integer program:
- lookup: the empirical Fisher diagonal of the rows the calibration text reads, ``F_ij = mean over
  windows of (∂loss_w/∂W_ij)²`` (per-window gradients, as for the linear layers); rows it never
  reads have F = 0. Error ``Σ_ij F_ij·E_ij²``.
- head: the head's input second moment H (dim, dim) and a row sensitivity ρ_v (Σ_j F_vj / tr H, as
  "kfac"); error ``Σ_v ρ_v·(E·H·Eᵀ)_vv``.
A tied table carries both; an untied embedding the first, an untied head the second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import SpecError
from . import packing
from .allocate import pareto_front
from .quant import DTYPES

ROW_BITS = (2, 3, 4, 5, 6, 7, 8)
CHUNK_ROWS = 1 << 14  # rows of a table quantized / scored at once (bounded memory for 262k-row vocabularies)


@dataclass(frozen=True)
class RowSpec:
    """How one table is quantized: bits per code, symmetric or min-max, scales per row (or per group)."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None  # entries per scale along a row (None: one scale per row)
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits not in ROW_BITS:
            raise SpecError(f"table rows take {ROW_BITS[0]}-{ROW_BITS[-1]} bits, e.g. 8, 6 or 4; got {self.bits!r}")
        if self.group_size is not None and not (isinstance(self.group_size, int) and self.group_size >= 8
                                                and self.group_size % 8 == 0):
            raise SpecError(f"a table's group size is a multiple of 8 (e.g. 128) or None (per row); "
                            f"got {self.group_size!r}")
        if self.scale_dtype not in DTYPES:
            raise SpecError(f"scale dtype must be one of {', '.join(DTYPES)}, got {self.scale_dtype!r}")

    def groups(self, dim: int) -> int:
        return 1 if self.group_size is None else dim // self.group_size

    def check_shape(self, shape: tuple[int, int], name: str = "the table") -> None:
        dim = shape[1]
        if dim % 8:
            raise SpecError(f"{name} has rows of {dim} entries; per-row packing needs a multiple of 8")
        if self.group_size is not None and dim % self.group_size:
            raise SpecError(f"{name}: group size {self.group_size} does not divide its row length {dim}; "
                            f"use a divisor of {dim} or per-row scales")

    def label(self) -> str:
        per = "row" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}{'sym' if self.symmetric else 'asym'}/{per}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> RowSpec:
        return cls(**dict(d))


@dataclass(frozen=True)
class QRows:
    """A quantized (rows, dim) table as stored."""

    spec: RowSpec
    codes: torch.Tensor  # uint8 (rows, dim·bits/8): each row packed on its own
    scales: torch.Tensor  # (rows, groups) in spec.scale_dtype
    offsets: torch.Tensor | None  # (rows, groups), asymmetric only

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] * 8 // self.spec.bits)


def layout(spec: RowSpec, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every stored tensor of a table (codes, scales[, offsets])."""
    rows, dim = shape
    sd = DTYPES[spec.scale_dtype]
    out = {"codes": ((rows, dim * spec.bits // 8), torch.uint8), "scales": ((rows, spec.groups(dim)), sd)}
    if not spec.symmetric:
        out["offsets"] = ((rows, spec.groups(dim)), sd)
    return out


def storage_bits(spec: RowSpec, shape: tuple[int, int]) -> int:
    """Exact stored bits of a (rows, dim) table under ``spec``."""
    total = 0
    for shp, dt in layout(spec, shape).values():
        total += int(np.prod(shp)) * torch.empty((), dtype=dt).element_size() * 8
    return total


def _params(w: torch.Tensor, spec: RowSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales, offsets or None) of a (rows, groups, g) fp32 view, rounded to the stored dtype."""
    sd = DTYPES[spec.scale_dtype]
    if spec.symmetric:
        amax = w.abs().amax(dim=2)  # (rows, groups)
        scale = (amax / (2 ** (spec.bits - 1) - 1)).to(sd)
        return torch.where(scale.float() > 0, scale, torch.ones_like(scale)), None
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scale = ((hi - lo) / (2 ** spec.bits - 1)).to(sd)
    return torch.where(scale.float() > 0, scale, torch.ones_like(scale)), lo.to(sd)


def _codes(w: torch.Tensor, spec: RowSpec, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Integer codes (rows, groups, g) of a grouped fp32 view, in [0, 2^bits)."""
    s = scale.float().unsqueeze(2)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        return (torch.round(w / s) + half).clamp(1, 2 ** spec.bits - 1)
    return torch.round((w - offset.float().unsqueeze(2)) / s).clamp(0, 2 ** spec.bits - 1)


def _grouped(w: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    rows, dim = w.shape
    return w.float().reshape(rows, spec.groups(dim), -1)  # (rows, groups, g)


def quantize(w: torch.Tensor, spec: RowSpec) -> QRows:
    """Quantize a (rows, dim) table row by row (in chunks of rows: bounded memory)."""
    spec.check_shape(tuple(w.shape))
    codes, scales, offsets = [], [], []
    for i in range(0, w.shape[0], CHUNK_ROWS):
        part = _grouped(w[i:i + CHUNK_ROWS], spec)
        s, o = _params(part, spec)
        c = _codes(part, spec, s, o)  # (r, groups, g)
        r = c.shape[0]
        codes.append(packing.pack(c.reshape(r, -1), spec.bits).view(r, -1))
        scales.append(s)
        offsets.append(o)
    return QRows(spec, torch.cat(codes), torch.cat(scales), None if spec.symmetric else torch.cat(offsets))


def _rows(spec: RowSpec, dim: int, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
          dtype: torch.dtype) -> torch.Tensor:
    """(n, dim) rows from their packed codes (n, dim·b/8), scales and offsets."""
    n = codes.shape[0]
    c = packing.unpack(codes.reshape(-1), spec.bits, n * dim).view(n, spec.groups(dim), -1).to(dtype)
    s = scales.to(dtype).unsqueeze(2)
    w = (c - 2 ** (spec.bits - 1)) * s if spec.symmetric else c * s + offsets.to(dtype).unsqueeze(2)
    return w.reshape(n, dim)


def dequantize(q: QRows, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The table (or only ``rows``, any integer shape: the result has that shape + (dim,)) in ``dtype``."""
    dim = q.shape[1]
    if rows is not None:
        idx = rows.reshape(-1)
        w = _rows(q.spec, dim, q.codes[idx], q.scales[idx], q.offsets[idx] if q.offsets is not None else None, dtype)
        return w.reshape(*rows.shape, dim)
    out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    for i in range(0, q.shape[0], CHUNK_ROWS):  # bounded temporaries for a large vocabulary
        j = slice(i, i + CHUNK_ROWS)
        out[j] = _rows(q.spec, dim, q.codes[j], q.scales[j], q.offsets[j] if q.offsets is not None else None, dtype)
    return out


# ----------------------------------------------------------------------------------------------
# sensitivity and cost rows


@dataclass(frozen=True)
class TableStats:
    """Calibration statistics of one table (see the module docstring); either side may be absent."""

    lookup_rows: torch.Tensor | None = None  # (n,) int64: the rows the calibration text reads, ascending
    lookup_fisher: torch.Tensor | None = None  # (n, dim) fp32: their empirical Fisher diagonal
    head_h: torch.Tensor | None = None  # (dim, dim) fp32: E[x·xᵀ] of the head's input
    head_rows: torch.Tensor | None = None  # (rows,) fp32: ρ_v = Σ_j F_vj / tr H

    def __post_init__(self) -> None:
        if (self.lookup_rows is None) != (self.lookup_fisher is None):
            raise SpecError("a table's lookup statistics need both the rows and their Fisher diagonal")
        if (self.head_h is None) != (self.head_rows is None):
            raise SpecError("a table's head statistics need both H and the row sensitivities")
        if self.lookup_rows is None and self.head_h is None:
            raise SpecError("a table's statistics need a lookup or a head side")

    def to(self, device) -> TableStats:
        return TableStats(*(t.to(device) if t is not None else None for t in
                            (self.lookup_rows, self.lookup_fisher, self.head_h, self.head_rows)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor]) -> TableStats:
        return cls(**{k: t.get(k) for k in ("lookup_rows", "lookup_fisher", "head_h", "head_rows")})


def table_error(w: torch.Tensor, w_hat: torch.Tensor | None, stats: TableStats) -> float:
    """The weighted squared error of ``w_hat`` against ``w`` (``w_hat`` None: of storing nothing), fp64."""
    total = 0.0
    if stats.lookup_rows is not None:
        r = stats.lookup_rows
        e = w[r].float() - (w_hat[r].float() if w_hat is not None else 0)
        total += float((stats.lookup_fisher.float() * e.square()).sum(dtype=torch.float64))
    if stats.head_h is not None:
        h = stats.head_h.float()
        for i in range(0, w.shape[0], CHUNK_ROWS):
            e = w[i:i + CHUNK_ROWS].float() - (w_hat[i:i + CHUNK_ROWS].float() if w_hat is not None else 0)
            rows = ((e @ h) * e).sum(dim=1)  # (E·H·Eᵀ)_vv
            total += float((rows.double() * stats.head_rows[i:i + CHUNK_ROWS].double()).sum())
    return total


@dataclass(frozen=True)
class RowCandidates:
    """The per-row configurations a table may take, besides staying in its source dtype."""

    bits: tuple[int, ...] = (4, 6, 8)
    symmetric: tuple[bool, ...] = (True, False)
    group_sizes: tuple[int | None, ...] = (None,)

    def __post_init__(self) -> None:
        for name in ("bits", "symmetric", "group_sizes"):
            if not getattr(self, name):
                raise SpecError(f"the table candidates need at least one value of {name}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.specs()  # each one valid

    def specs(self) -> list[RowSpec]:
        return [RowSpec(b, s, g) for b in self.bits for s in self.symmetric for g in self.group_sizes]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> RowCandidates:
        return cls(**{k: tuple(v) for k, v in d.items()})


@dataclass(frozen=True)
class TableCosts:
    """The Pareto-optimal choices of one table by increasing bits: a RowSpec, or None (kept as stored)."""

    specs: tuple[RowSpec | None, ...]
    bits: np.ndarray  # int64
    errors: np.ndarray  # float64
    base: float  # error of storing nothing

    def to_dict(self) -> dict:
        return {"base": self.base, "specs": [s.to_dict() if s is not None else None for s in self.specs],
                "bits": self.bits.tolist(), "errors": self.errors.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> TableCosts:
        return cls(tuple(RowSpec.from_dict(s) if s is not None else None for s in d["specs"]),
                   np.array(d["bits"], dtype=np.int64), np.array(d["errors"], dtype=np.float64), d["base"])


def table_costs(w: torch.Tensor, stats: TableStats, cands: RowCandidates, keep_bits: int) -> TableCosts:
    """Bits and error of every candidate of the (rows, dim) table ``w`` and of keeping it as stored
    (``keep_bits``: its stored size, error 0); the Pareto front."""
    specs: list[RowSpec | None] = [None]
    bits, errs = [int(keep_bits)], [0.0]
    shape = tuple(w.shape)
    for spec in cands.specs():
        spec.check_shape(shape)
        w_hat = dequantize(quantize(w, spec))
        specs.append(spec)
        bits.append(storage_bits(spec, shape))
        errs.append(table_error(w, w_hat, stats))
        del w_hat
    b, e = np.array(bits, dtype=np.int64), np.array(errs, dtype=np.float64)
    front = pareto_front(b, e)
    return TableCosts(tuple(specs[i] for i in front), b[front], e[front], table_error(w, None, stats))
