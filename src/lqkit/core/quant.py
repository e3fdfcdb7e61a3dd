"""Weight quantizers (pure tensor math).

A weight matrix W of shape (out, in) is quantized group-wise. ``group_dim="in"`` puts each group of
``group_size`` consecutive elements along the input dimension of one output row (the usual
per-output-channel groups); ``group_dim="out"`` runs groups along the output dimension of one input
column (per-input-channel groups, as in AdaDim). Internally both become the same problem on a
"layout" matrix M: M = W for "in", M = Wᵀ for "out"; groups always run along M's last dimension.
A last group shorter than ``group_size`` is padded by repeating its last element (this never changes
a group's min, max or absmax) and the padding is dropped again on dequantization.

Quantizers are entries of :data:`QUANTIZERS`; each maps M to integer codes plus named auxiliary
tensors (scales, offsets, ...) in the exact dtypes that are stored. Storage size is therefore
counted from what is stored: :func:`storage_bits` (analytic) equals :attr:`QTensor.nbits` (actual).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

from ..errors import SpecError
from . import packing

GROUP_DIMS = ("in", "out")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized."""

    method: str = "rtn"  # key in QUANTIZERS: rtn (asymmetric min-max), rtn_sym, nf
    bits: int = 4  # bits per code
    group_size: int = 128  # elements per group (along group_dim)
    group_dim: str = "in"  # "in": groups along the input dim; "out": along the output dim (AdaDim)
    double_quant: bool = False  # nf only: quantize the absmax scales to 8 bits (QLoRA)
    scale_dtype: str = "float16"  # stored dtype of scales / offsets

    def __post_init__(self) -> None:
        if self.method not in QUANTIZERS:
            raise SpecError(f"unknown quantizer {self.method!r}; choose one of {sorted(QUANTIZERS)}")
        q = QUANTIZERS[self.method]
        if self.bits not in q.bits_allowed:
            allowed = ", ".join(str(b) for b in sorted(q.bits_allowed))
            raise SpecError(f"quantizer {self.method!r} supports bits {allowed}; got {self.bits!r}")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise SpecError(f"group size must be a positive integer, got {self.group_size!r}")
        if self.group_dim not in GROUP_DIMS:
            raise SpecError(f"group dim must be 'in' or 'out', got {self.group_dim!r}")
        if self.double_quant and not q.supports_double_quant:
            raise SpecError(f"quantizer {self.method!r} has no double quantization of its scales")
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise SpecError(f"scale dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantSpec":
        return cls(**dict(d))

    def label(self) -> str:
        dq = "+dq" if self.double_quant else ""
        return f"{self.method}{self.bits}{dq}/g{self.group_size}{self.group_dim}"


@dataclass(frozen=True)
class AuxSlot:
    """Shape and stored dtype of one auxiliary tensor of a quantized matrix."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbits(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size() * 8


@dataclass(frozen=True)
class QTensor:
    """A quantized (out, in) matrix as stored: bit-packed codes plus auxiliary tensors."""

    spec: QuantSpec
    shape: tuple[int, int]  # (out, in) of the original matrix
    packed: torch.Tensor  # uint8, packing.pack of the (rows, cols) layout codes, row-major
    aux: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def layout_shape(self) -> tuple[int, int]:
        return layout_shape(self.shape, self.spec)

    @property
    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 of shape ``layout_shape``."""
        rows, cols = self.layout_shape
        return packing.unpack(self.packed, self.spec.bits, rows * cols).view(rows, cols)

    @property
    def nbits(self) -> int:
        """Exact bits of everything stored for this matrix."""
        aux = sum(t.numel() * t.element_size() * 8 for t in self.aux.values())
        return self.packed.numel() * 8 + aux


@dataclass(frozen=True)
class Quantizer:
    """A registry entry. ``quantize`` maps a layout matrix M (rows, cols), fp32, to
    (codes uint8 (rows, cols), aux); ``dequantize`` inverts it to fp32; ``aux_layout`` gives the
    shapes and dtypes of aux for a spec and layout shape (used to size buffers and count bits)."""

    name: str
    bits_allowed: frozenset[int]
    quantize: Callable[[torch.Tensor, QuantSpec], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    dequantize: Callable[[torch.Tensor, Mapping[str, torch.Tensor], QuantSpec], torch.Tensor]
    aux_layout: Callable[[QuantSpec, int, int], dict[str, AuxSlot]]
    supports_double_quant: bool = False


QUANTIZERS: dict[str, Quantizer] = {}


def register(q: Quantizer) -> Quantizer:
    QUANTIZERS[q.name] = q
    return q


# ----------------------------------------------------------------------------------------------
# group helpers


def n_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def to_groups(m: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) -> (rows, n_groups, group_size), padding the last group by repetition."""
    rows, cols = m.shape
    pad = n_groups(cols, group_size) * group_size - cols
    if pad:
        m = torch.cat([m, m[:, -1:].expand(rows, pad)], dim=1)
    return m.reshape(rows, -1, group_size)


def from_groups(g: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, n_groups, group_size) -> (rows, cols), dropping padding."""
    return g.reshape(g.shape[0], -1)[:, :cols]


def layout_shape(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int]:
    out, inp = shape
    return (out, inp) if spec.group_dim == "in" else (inp, out)


def to_layout(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return w if spec.group_dim == "in" else w.t()


def from_layout(m: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return m if spec.group_dim == "in" else m.t()


def _group_slot(spec: QuantSpec, rows: int, cols: int) -> AuxSlot:
    return AuxSlot((rows, n_groups(cols, spec.group_size)), DTYPES[spec.scale_dtype])


def _store(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return t.to(DTYPES[spec.scale_dtype])


# ----------------------------------------------------------------------------------------------
# uniform affine, asymmetric (min-max): w ≈ code · scale + offset


def _rtn_quantize(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = to_groups(m, spec.group_size)  # (rows, ng, gs)
    qmax = (1 << spec.bits) - 1
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (rows, ng)
    scale = _store((hi - lo) / qmax, spec)
    offset = _store(lo, spec)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    codes = torch.round((g - offset.float().unsqueeze(-1)) / s).clamp_(0, qmax)
    return from_groups(codes, m.shape[1]).to(torch.uint8), {"scale": scale, "offset": offset}


def _rtn_dequantize(codes: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    g = to_groups(codes.float(), spec.group_size)  # (rows, ng, gs)
    w = g * aux["scale"].float().unsqueeze(-1) + aux["offset"].float().unsqueeze(-1)
    return from_groups(w, codes.shape[1])


register(Quantizer(
    name="rtn",
    bits_allowed=frozenset(range(2, 9)),
    quantize=_rtn_quantize,
    dequantize=_rtn_dequantize,
    aux_layout=lambda spec, rows, cols: {"scale": _group_slot(spec, rows, cols), "offset": _group_slot(spec, rows, cols)},
))


# ----------------------------------------------------------------------------------------------
# uniform symmetric: w ≈ (code − 2^(b−1)) · scale, scale = absmax / (2^(b−1) − 1)


def _sym_quantize(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = to_groups(m, spec.group_size)
    half = 1 << (spec.bits - 1)
    scale = _store(g.abs().amax(dim=-1) / (half - 1), spec)  # (rows, ng)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    codes = torch.round(g / s).clamp_(-half, half - 1) + half
    return from_groups(codes, m.shape[1]).to(torch.uint8), {"scale": scale}


def _sym_dequantize(codes: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    half = 1 << (spec.bits - 1)
    g = to_groups(codes.float() - half, spec.group_size)
    return from_groups(g * aux["scale"].float().unsqueeze(-1), codes.shape[1])


register(Quantizer(
    name="rtn_sym",
    bits_allowed=frozenset(range(2, 9)),
    quantize=_sym_quantize,
    dequantize=_sym_dequantize,
    aux_layout=lambda spec, rows, cols: {"scale": _group_slot(spec, rows, cols)},
))


# ----------------------------------------------------------------------------------------------
# NormalFloat (QLoRA / LQ-LoRA): w ≈ table[code] · absmax, table = normal quantiles in [-1, 1]

NF_OFFSET = 0.9677083  # QLoRA: mean of 1 − 1/(2·15) and 1 − 1/(2·16)
DQ_BLOCK = 256  # second-level block size for double quantization of absmax


def nf_table(bits: int) -> torch.Tensor:
    """The 2**bits NormalFloat levels, sorted, with an exact zero, normalised to [-1, 1]:
    2^(b−1) positive and 2^(b−1) − 1 negative quantiles of N(0, 1)."""
    half = 1 << (bits - 1)
    p_pos = torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(p_pos)
    neg = -torch.special.ndtri(p_neg)
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (v / v.abs().max()).to(torch.float32)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted 1-D ``levels`` for every element of x."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.contiguous())


def _dq_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Second-level quantization of the (rows, ng) fp32 absmax: subtract the mean, then symmetric
    8-bit in blocks of DQ_BLOCK with one fp32 scale per block."""
    flat = absmax.reshape(-1)
    mean = flat.mean().reshape(1)
    c = flat - mean
    pad = (-c.numel()) % DQ_BLOCK
    blocks = torch.cat([c, c.new_zeros(pad)]).view(-1, DQ_BLOCK)
    bscale = (blocks.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(blocks / bscale.unsqueeze(1)).clamp_(-127, 127) + 128
    return {
        "absmax_codes": q.reshape(-1)[: flat.numel()].to(torch.uint8).view_as(absmax),
        "absmax_scale": bscale.float(),
        "absmax_mean": mean.float(),
    }


def _dq_dequantize(aux: Mapping[str, torch.Tensor]) -> torch.Tensor:
    codes = aux["absmax_codes"]
    flat = codes.reshape(-1).float() - 128
    pad = (-flat.numel()) % DQ_BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, DQ_BLOCK)
    c = (blocks * aux["absmax_scale"].float().unsqueeze(1)).reshape(-1)[: flat.numel()]
    return (c + aux["absmax_mean"].float()).view(codes.shape)


def _nf_absmax(aux: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return _dq_dequantize(aux) if "absmax_codes" in aux else aux["absmax"].float()


def _nf_quantize(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = to_groups(m, spec.group_size)
    absmax = g.abs().amax(dim=-1)  # (rows, ng)
    aux = _dq_quantize(absmax) if spec.double_quant else {"absmax": _store(absmax, spec)}
    a = _nf_absmax(aux).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    codes = nearest_level(g / a, nf_table(spec.bits).to(m.device))
    return from_groups(codes, m.shape[1]).to(torch.uint8), aux


def _nf_dequantize(codes: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    table = nf_table(spec.bits).to(codes.device)
    g = to_groups(table[codes.long()], spec.group_size)
    return from_groups(g * _nf_absmax(aux).unsqueeze(-1), codes.shape[1])


def _nf_aux_layout(spec: QuantSpec, rows: int, cols: int) -> dict[str, AuxSlot]:
    if not spec.double_quant:
        return {"absmax": _group_slot(spec, rows, cols)}
    ng = n_groups(cols, spec.group_size)
    return {
        "absmax_codes": AuxSlot((rows, ng), torch.uint8),
        "absmax_scale": AuxSlot((-(-rows * ng // DQ_BLOCK),), torch.float32),
        "absmax_mean": AuxSlot((1,), torch.float32),
    }


register(Quantizer(
    name="nf",
    bits_allowed=frozenset({2, 3, 4}),
    quantize=_nf_quantize,
    dequantize=_nf_dequantize,
    aux_layout=_nf_aux_layout,
    supports_double_quant=True,
))


# ----------------------------------------------------------------------------------------------
# public API


def quantize(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Quantize an (out, in) matrix."""
    if w.ndim != 2:
        raise SpecError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    m = to_layout(w.float(), spec)
    codes, aux = QUANTIZERS[spec.method].quantize(m, spec)
    return QTensor(spec=spec, shape=tuple(w.shape), packed=packing.pack(codes, spec.bits), aux=aux)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the (out, in) matrix of a QTensor."""
    return dequantize_packed(q.packed, q.aux, q.spec, q.shape).to(dtype)


def dequantize_packed(packed: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec,
                      shape: tuple[int, int]) -> torch.Tensor:
    """Reconstruct an (out, in) fp32 matrix from its stored parts (used by modules)."""
    rows, cols = layout_shape(shape, spec)
    codes = packing.unpack(packed, spec.bits, rows * cols).view(rows, cols)
    return from_layout(QUANTIZERS[spec.method].dequantize(codes, aux, spec), spec)


def aux_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, AuxSlot]:
    rows, cols = layout_shape(shape, spec)
    return QUANTIZERS[spec.method].aux_layout(spec, rows, cols)


def packed_layout(spec: QuantSpec, shape: tuple[int, int]) -> AuxSlot:
    return AuxSlot((packing.packed_nbytes(math.prod(shape), spec.bits),), torch.uint8)


def storage_bits(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Exact stored bits of a matrix of ``shape`` quantized with ``spec`` (codes + aux)."""
    return packed_layout(spec, shape).nbits + sum(s.nbits for s in aux_layout(spec, shape).values())
