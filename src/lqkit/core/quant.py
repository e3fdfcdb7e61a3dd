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

Data-aware entries (``gptq``, ``nuq``; modules :mod:`.gptq`, :mod:`.nuq`) also receive the matrix's
calibration statistics. Any quantizer can keep outliers exactly (dense-and-sparse): a fraction
``outliers`` of the weights, chosen by |w|·sensitivity, stored as fp16 values with int32 flat
indices (COO), and a fraction ``outlier_features`` of the input features (LLM.int8()-style, chosen by
activation energy diag(H)) stored as fp16 columns; both are restored exactly on dequantization and
counted in the size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping

import torch

from ..errors import SpecError
from . import compiled, packing
from .stats import MatrixStats, require

GROUP_DIMS = ("in", "out", "auto")  # "auto": chosen per matrix by weighted error (AdaDim, see .adadim)
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
    act_order: bool = False  # gptq only: quantize columns in order of decreasing diag(H)
    damp: float = 0.01  # gptq: dampening, fraction of mean(diag H) added to H's diagonal
    outliers: float = 0.0  # fraction of weights kept exactly as sparse fp16 (dense-and-sparse)
    outlier_features: float = 0.0  # fraction of input features kept as 16-bit columns (LLM.int8())
    clip: bool = False  # rtn / gptq: shrink each group's range to the one of least squared error (MSE search)
    int_zero: bool = False  # rtn / gptq: store each group's zero point as a ``bits``-bit integer instead of
    # its float offset (as GPTQ checkpoints do): the same values, 16 − bits fewer bits per group (fp16 scales)

    def __post_init__(self) -> None:
        if self.method not in QUANTIZERS:
            raise SpecError(f"unknown quantizer {self.method!r}; choose one of {sorted(QUANTIZERS)}")
        q = QUANTIZERS[self.method]
        if self.bits not in q.bits_allowed:
            allowed = ", ".join(str(b) for b in sorted(q.bits_allowed))
            raise SpecError(f"quantizer {self.method!r} supports bits {allowed}; got {self.bits!r}")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise SpecError(f"group size must be a positive integer such as 128, got {self.group_size!r}")
        if self.group_dim not in GROUP_DIMS:
            raise SpecError(f"group dim must be 'in', 'out' or 'auto', got {self.group_dim!r}")
        if self.double_quant and not q.supports_double_quant:
            raise SpecError(f"quantizer {self.method!r} has no double quantization of its scales")
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise SpecError(f"scale dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}")
        if self.act_order and self.method != "gptq":
            raise SpecError("act-order is a gptq option; use --method gptq (or --quantizer gptq with lq/lorc/sparse) "
                            "or drop --act-order")
        if self.clip and self.method not in ("rtn", "gptq"):
            raise SpecError(f"range clipping is an rtn / gptq option, not {self.method!r}; drop --clip or "
                            "quantize with rtn or gptq (e.g. --method gptq)")
        if not isinstance(self.int_zero, bool):
            raise SpecError(f"int_zero must be true or false, got {self.int_zero!r}")
        if self.int_zero and self.method not in ("rtn", "gptq"):
            raise SpecError(f"integer zero points are an rtn / gptq option, not {self.method!r}; drop --int-zero "
                            "or quantize with rtn or gptq")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 10):
            raise SpecError(f"damp must be a positive fraction such as 0.01, got {self.damp!r}")
        if not (isinstance(self.outliers, (int, float)) and 0 <= self.outliers < 0.5):
            raise SpecError(f"outliers is a fraction of the weights in [0, 0.5) such as 0.005, got {self.outliers!r}")
        if not (isinstance(self.outlier_features, (int, float)) and 0 <= self.outlier_features < 1):
            raise SpecError(f"outlier features is a fraction of the inputs in [0, 1) such as 0.01, got "
                            f"{self.outlier_features!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["int_zero"]:  # left out: plans, checkpoints and cost tables from before keep their JSON
            del d["int_zero"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantSpec":
        return cls(**dict(d))

    def label(self) -> str:
        dq = "+dq" if self.double_quant else ""
        ao = ("+ao" if self.act_order else "") + ("+mse" if self.clip else "") + ("+iz" if self.int_zero else "")
        sp = f"+sp{self.outliers:g}" if self.outliers else ""
        of = f"+of{self.outlier_features:g}" if self.outlier_features else ""
        return f"{self.method}{self.bits}{dq}{ao}/g{self.group_size}{self.group_dim}{sp}{of}"


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
class QuantContext:
    """What a data-aware quantizer sees besides M, in the original (out, in) orientation."""

    stats: MatrixStats | None = None
    keep: torch.Tensor | None = None  # bool (out, in): positions stored exactly elsewhere (outliers)


@dataclass(frozen=True)
class Quantizer:
    """A registry entry. ``quantize`` maps a layout matrix M (rows, cols), fp32, to
    (codes uint8 (rows, cols), aux); ``dequantize`` inverts it to fp32; ``aux_layout`` gives the
    shapes and dtypes of aux for a spec and layout shape (used to size buffers and count bits).

    A ``data_aware`` quantizer is called as ``quantize(M, spec, ctx)`` with a :class:`QuantContext`
    and receives M with outliers still in place (it must ignore ``ctx.keep`` positions in its
    objective); it may return aux["kept"], an (out, in) matrix whose ``keep`` positions hold the
    values to store exactly (GPTQ's error-compensated values). Other quantizers see outliers as 0.
    ``kernel_format``: the plain stored format the fused kernels know ("rtn", "rtn_sym", "nf", "nuq"), if
    any.
    ``quantize_many`` (optional, data-aware only): ``(w (out, in), specs, ctxs) -> [(codes, aux)]``,
    several configurations of one matrix at once, each result as ``quantize`` would return it.
    ``reconstruct`` (optional): called as ``quantize`` is, returns (``dequantize`` of the codes, aux)
    without forming the integer codes: the cost table's reconstructions, bit for bit the same.
    """

    name: str
    bits_allowed: frozenset[int]
    quantize: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    dequantize: Callable[[torch.Tensor, Mapping[str, torch.Tensor], QuantSpec], torch.Tensor]
    aux_layout: Callable[[QuantSpec, int, int], dict[str, AuxSlot]]
    supports_double_quant: bool = False
    data_aware: bool = False
    kernel_format: str | None = None
    quantize_many: Callable[..., list[tuple[torch.Tensor, dict[str, torch.Tensor]]]] | None = None
    reconstruct: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None


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


def _concrete(spec: QuantSpec) -> None:
    if spec.group_dim == "auto":
        raise SpecError("group dim 'auto' is chosen per matrix by decompose (AdaDim); "
                        "resolve it with lqkit.core.adadim before quantizing or sizing")


def layout_shape(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int]:
    _concrete(spec)
    out, inp = shape
    return (out, inp) if spec.group_dim == "in" else (inp, out)


def to_layout(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    _concrete(spec)
    return w if spec.group_dim == "in" else w.t()


def from_layout(m: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return m if spec.group_dim == "in" else m.t()


def _group_slot(spec: QuantSpec, rows: int, cols: int) -> AuxSlot:
    return AuxSlot((rows, n_groups(cols, spec.group_size)), DTYPES[spec.scale_dtype])


def _store(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return t.to(DTYPES[spec.scale_dtype])


# ----------------------------------------------------------------------------------------------
# uniform affine, asymmetric (min-max, integer zero point): w ≈ code · scale + offset


CLIP_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76)  # range fractions tried by clip=True
CLIP_VECTOR_MAX = 1 << 23  # elements up to which all fractions are tried in one vectorised pass


def minmax_params(g: torch.Tensor, qmax: int | torch.Tensor, dtype: torch.dtype, clip: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (scale, offset) of asymmetric min-max groups along the last dim of g (..., gs), for
    codes 0..qmax (an int, or a tensor broadcasting against g's leading dims: one qmax per row).

    As in GPTQ's quantizer, the range is widened to contain 0 and the zero point is an integer
    code, so that 0 is (up to the fp16 rounding of the offset) exactly on the grid: weights near 0
    are not all pushed the same way, which at 3 bits and below matters far more than the small loss
    in range. Stored in ``dtype`` as ``scale`` and ``offset = −zero·scale`` (w ≈ code·scale + offset).

    ``clip``: the range [lo, hi] is shrunk by the factor of CLIP_SHRINK that gives each group the
    least squared rounding error (GPTQ's "mse" grid search): clipping a few extreme weights buys a
    finer grid for all the others."""
    lo = g.amin(dim=-1).clamp(max=0)
    hi = g.amax(dim=-1).clamp(min=0)
    if not clip:
        return _range_params(lo, hi, qmax, dtype)
    if g.device.type == "cpu" and compiled.enabled():  # one fused pass: no (P, ...) copies of g
        return _clip_search(g, lo, hi, _shrink_factors(g.device), qmax, dtype)
    if g.numel() * len(CLIP_SHRINK) <= CLIP_VECTOR_MAX:  # all factors at once (few, large ops)
        p = _shrink_factors(g.device).view(-1, *[1] * lo.ndim)  # (P, 1, ...)
        scale, offset = _range_params(lo * p, hi * p, qmax, dtype)  # (P, ...)
        err = _grid_sq_err(g, scale, offset, qmax)  # (P, ...)
        best = err.argmin(dim=0, keepdim=True)  # the first factor of least error
        return scale.gather(0, best)[0], offset.gather(0, best)[0]
    best = None
    for p in CLIP_SHRINK:  # one factor at a time (bounded memory)
        scale, offset = _range_params(lo * p, hi * p, qmax, dtype)
        err = _grid_sq_err(g, scale, offset, qmax)
        if best is None:
            best = (err, scale, offset)
            continue
        better = err < best[0]
        best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]), torch.where(better, offset, best[2]))
    return best[1], best[2]


@compiled.cpu_compiled
def _clip_search(g, lo, hi, shrink, qmax, dtype):
    """The clip search of :func:`minmax_params` with every factor at once: (scale, offset) of least error."""
    p = shrink.view(-1, *[1] * lo.ndim)  # (P, 1, ...)
    scale, offset = _range_params(lo * p, hi * p, qmax, dtype)  # (P, ...)
    best = _grid_sq_err(g, scale, offset, qmax).argmin(dim=0, keepdim=True)  # the first of least error
    return scale.gather(0, best)[0], offset.gather(0, best)[0]


_SHRINK: dict[torch.device, torch.Tensor] = {}


def _shrink_factors(device: torch.device) -> torch.Tensor:
    """CLIP_SHRINK as a tensor on ``device``, made once: GPTQ asks for it at every column, and a
    fresh host-to-device copy each time would make the GPU wait for the host."""
    t = _SHRINK.get(device)
    if t is None:
        t = _SHRINK[device] = torch.tensor(CLIP_SHRINK, device=device)
    return t


def _grid_sq_err(g, scale, offset, qmax) -> torch.Tensor:
    """Squared error of rounding g (..., gs) to the grid code·scale + offset (codes 0..qmax), summed
    over the last dim: Σ ((t − clamp(round(t)))·scale)², t = (g − offset) / scale (few passes, in place)."""
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    t = (g - offset.float().unsqueeze(-1)).div_(s)
    c = torch.round(t).clamp_(min=0)
    c = c.clamp_(max=qmax) if isinstance(qmax, int) else torch.minimum(c, qmax.unsqueeze(-1), out=c)
    return t.sub_(c).mul_(s).square_().sum(dim=-1)


def _range_params(lo, hi, qmax, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((hi - lo) / qmax).to(dtype)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / s).clamp_(min=0)
    zero = zero.clamp_(max=qmax) if isinstance(qmax, int) else torch.minimum(zero, qmax)
    return scale, (-zero * scale.float()).to(dtype)


def _rtn_codes(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(codes as floats in groups (rows, ng, gs), aux)."""
    g = to_groups(m, spec.group_size)  # (rows, ng, gs)
    qmax = (1 << spec.bits) - 1
    scale, offset = minmax_params(g, qmax, DTYPES[spec.scale_dtype], spec.clip)  # (rows, ng) each
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return torch.round((g - offset.float().unsqueeze(-1)) / s).clamp_(0, qmax), {"scale": scale, "offset": offset}


def _rtn_quantize(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    codes, aux = _rtn_codes(m, spec)
    return from_groups(codes, m.shape[1]).to(torch.uint8), aux


def _rtn_values(g: torch.Tensor, aux: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Codes in groups (rows, ng, gs), as floats, to values."""
    return g * aux["scale"].float().unsqueeze(-1) + aux["offset"].float().unsqueeze(-1)


def _rtn_dequantize(codes: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    return from_groups(_rtn_values(to_groups(codes.float(), spec.group_size), aux), codes.shape[1])


def _rtn_reconstruct(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    codes, aux = _rtn_codes(m, spec)
    return from_groups(_rtn_values(codes, aux), m.shape[1]), aux


register(Quantizer(
    name="rtn",
    bits_allowed=frozenset(range(2, 9)),
    quantize=_rtn_quantize,
    dequantize=_rtn_dequantize,
    aux_layout=lambda spec, rows, cols: {"scale": _group_slot(spec, rows, cols), "offset": _group_slot(spec, rows, cols)},
    kernel_format="rtn",
    reconstruct=_rtn_reconstruct,
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
    kernel_format="rtn_sym",
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


def _nf_codes(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(codes in groups (rows, ng, gs) int64, aux)."""
    g = to_groups(m, spec.group_size)
    absmax = g.abs().amax(dim=-1)  # (rows, ng)
    aux = _dq_quantize(absmax) if spec.double_quant else {"absmax": _store(absmax, spec)}
    a = _nf_absmax(aux).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return nearest_level(g / a, nf_table(spec.bits).to(m.device)), aux


def _nf_quantize(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    codes, aux = _nf_codes(m, spec)
    return from_groups(codes, m.shape[1]).to(torch.uint8), aux


def _nf_dequantize(codes: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    table = nf_table(spec.bits).to(codes.device)
    g = to_groups(table[codes.long()], spec.group_size)
    return from_groups(g * _nf_absmax(aux).unsqueeze(-1), codes.shape[1])


def _nf_reconstruct(m: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    codes, aux = _nf_codes(m, spec)
    table = nf_table(spec.bits).to(m.device)
    return from_groups(table[codes] * _nf_absmax(aux).unsqueeze(-1), m.shape[1]), aux


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
    kernel_format="nf",
    reconstruct=_nf_reconstruct,
))


# ----------------------------------------------------------------------------------------------
# exactly kept outliers (dense-and-sparse, LLM.int8()-style features)

INDEX_DTYPE = torch.int32  # stored indices of outliers


def n_outliers(spec: QuantSpec, shape: tuple[int, int]) -> int:
    return int(round(spec.outliers * shape[0] * shape[1]))


def n_outlier_features(spec: QuantSpec, shape: tuple[int, int]) -> int:
    return int(round(spec.outlier_features * shape[1]))


def _outlier_slots(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, AuxSlot]:
    slots, kf, ks = {}, n_outlier_features(spec, shape), n_outliers(spec, shape)
    if kf:
        slots["feat_idx"] = AuxSlot((kf,), INDEX_DTYPE)
        slots["feat_val"] = AuxSlot((shape[0], kf), torch.float16)
    if ks:
        slots["sp_idx"] = AuxSlot((ks,), INDEX_DTYPE)
        slots["sp_val"] = AuxSlot((ks,), torch.float16)
    return slots


def outlier_positions(w: torch.Tensor, spec: QuantSpec, stats: MatrixStats | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature indices, flat element indices), both sorted int64, of what is kept exactly.

    Features: the input columns of largest activation energy diag(H) (else Fisher column sums, else
    weight column norms). Elements (outside those columns): largest |w|·s with s = √F (Fisher),
    else √diag(H) per input column, else 1."""
    kf, ks = n_outlier_features(spec, tuple(w.shape)), n_outliers(spec, tuple(w.shape))
    h = stats.h if stats is not None else None
    fisher = stats.fisher if stats is not None else None
    if ks and fisher is None and stats is not None and stats.fisher_sums is not None:
        require(stats, "fisher", "choosing outliers by |w|·√F")  # only sums kept: say so, never guess
    feat = torch.empty(0, dtype=torch.long, device=w.device)
    if kf:
        sums = stats.sums() if stats is not None else None
        score = torch.diagonal(h) if h is not None else sums[1] if sums is not None else (w * w).sum(0)
        feat = torch.topk(score.float(), kf).indices.sort().values
    flat = torch.empty(0, dtype=torch.long, device=w.device)
    if ks:
        s = w.abs()
        if fisher is not None:
            s = s * fisher.float().clamp_min(0).sqrt()
        elif h is not None:
            s = s * torch.diagonal(h).float().clamp_min(0).sqrt().unsqueeze(0)
        s[:, feat] = -1.0
        flat = torch.topk(s.reshape(-1), ks).indices.sort().values
    return feat, flat


def _restore_outliers(w: torch.Tensor, aux: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "feat_idx" in aux:
        w[:, aux["feat_idx"].long()] = aux["feat_val"].float()
    if "sp_idx" in aux:
        w.view(-1)[aux["sp_idx"].long()] = aux["sp_val"].float()
    return w


# ----------------------------------------------------------------------------------------------
# public API


def _keep(w: torch.Tensor, spec: QuantSpec, stats: MatrixStats | None):
    """(feature indices, flat indices, bool mask) of what ``spec`` keeps exactly, or Nones."""
    if not (spec.outliers or spec.outlier_features):
        return None, None, None
    feat, flat = outlier_positions(w, spec, stats)
    keep = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    keep[:, feat] = True
    keep.view(-1)[flat] = True
    return feat, flat, keep


def zero_codes(scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer zero points z (uint8, scale's shape) of offsets stored as −z·scale (a group of
    scale 0 has zero point 0). For offsets an rtn / gptq quantizer made, −z·scale rounded to the scale's
    dtype: z itself for float16 / float32 scales; with bfloat16 scales at 8 bits possibly z ± 1, but
    then one whose −z'·scale rounds to the same stored offset, so the rebuilt values are the same."""
    s, off = scale.float(), offset.float()
    z = torch.where(s > 0, torch.round(-off / s.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    return z.clamp_(0, (1 << bits) - 1).to(torch.uint8)


def quant_params(aux: Mapping[str, torch.Tensor], spec: QuantSpec) -> Mapping[str, torch.Tensor]:
    """The stored aux of a matrix as its quantizer reads it: for an integer-zero-point spec the offset
    rebuilt, −z·scale rounded to the scale's dtype as the quantizer rounded it (so the values are
    bit for bit those of the float-offset format); any other aux as it is."""
    if "zero" not in aux:
        return aux
    scale = aux["scale"]
    z = packing.unpack(aux["zero"], spec.bits, scale.numel()).view(scale.shape)
    out = {k: v for k, v in aux.items() if k != "zero"}
    out["offset"] = (-z.float() * scale.float()).to(scale.dtype)
    return out


def _qtensor(w: torch.Tensor, spec: QuantSpec, codes: torch.Tensor, aux: Mapping[str, torch.Tensor],
             feat: torch.Tensor | None, flat: torch.Tensor | None) -> QTensor:
    aux = dict(aux)
    kept = aux.pop("kept", w)
    if spec.int_zero:  # stored as packed integer zero points, in place of the offsets
        aux["zero"] = packing.pack(zero_codes(aux["scale"], aux.pop("offset"), spec.bits), spec.bits)
    if feat is not None and feat.numel():
        aux["feat_idx"] = feat.to(INDEX_DTYPE)
        aux["feat_val"] = kept[:, feat].to(torch.float16)
    if flat is not None and flat.numel():
        aux["sp_idx"] = flat.to(INDEX_DTYPE)
        aux["sp_val"] = kept.reshape(-1)[flat].to(torch.float16)
    return QTensor(spec=spec, shape=tuple(w.shape), packed=packing.pack(codes, spec.bits), aux=aux)


def _check_matrix(w: torch.Tensor) -> torch.Tensor:
    if w.ndim != 2:
        raise SpecError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")
    return w.float()


def quantize(w: torch.Tensor, spec: QuantSpec, stats: MatrixStats | None = None) -> QTensor:
    """Quantize an (out, in) matrix; ``stats`` feed data-aware quantizers and outlier selection."""
    w = _check_matrix(w)
    _concrete(spec)
    return _quantize(w, spec, stats, *_keep(w, spec, stats))


def _quantize(w, spec, stats, feat, flat, keep) -> QTensor:
    return _qtensor(w, spec, *_quantize_codes(w, spec, stats, keep), feat, flat)


def _quantize_codes(w, spec, stats, keep, values: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(codes in the layout, aux) of one spec; outliers (``keep``) handled as the quantizer wants.
    ``values``: (the codes' values, aux) instead where the quantizer has a ``reconstruct``."""
    q = QUANTIZERS[spec.method]
    fn = q.reconstruct if values and q.reconstruct is not None else q.quantize
    if q.data_aware:
        return fn(to_layout(w, spec), spec, QuantContext(stats, keep))
    dense = w if keep is None else w.masked_fill(keep, 0.0)
    return fn(to_layout(dense, spec), spec)


def _quantize_many_raw(w: torch.Tensor, specs: list[QuantSpec], stats: MatrixStats | None, values: bool = False):
    """[(codes, aux, feat, flat)] of each spec, batched where the quantizer allows it. ``values``: where
    the quantizer has a ``reconstruct``, the codes' values (fp32) instead of the codes."""
    w = _check_matrix(w)
    out: dict[int, tuple] = {}
    batches: dict[tuple, list[int]] = {}
    kept: dict[tuple, tuple] = {}  # outlier positions depend only on the fractions: computed once each
    for i, s in enumerate(specs):
        _concrete(s)
        k = (s.outliers, s.outlier_features)
        if k not in kept:
            kept[k] = _keep(w, s, stats)
        if QUANTIZERS[s.method].quantize_many is not None:
            batches.setdefault((s.method, s.act_order, s.damp), []).append(i)
        else:
            feat, flat, keep = kept[k]
            out[i] = (*_quantize_codes(w, s, stats, keep, values), feat, flat)
    for (method, _, _), idx in batches.items():
        keeps = [kept[(specs[i].outliers, specs[i].outlier_features)] for i in idx]
        results = QUANTIZERS[method].quantize_many(w, [specs[i] for i in idx], [QuantContext(stats, k[2]) for k in keeps])
        for i, (feat, flat, _), (codes, aux) in zip(idx, keeps, results):
            out[i] = (codes, aux, feat, flat)
    return w, [out[i] for i in range(len(specs))]


def quantize_many(w: torch.Tensor, specs: list[QuantSpec], stats: MatrixStats | None = None) -> list[QTensor]:
    """``[quantize(w, s, stats) for s in specs]``, with the configurations of a quantizer that has a
    batched entry (gptq: same act_order and damp) computed together in one pass."""
    w, raw = _quantize_many_raw(w, specs, stats)
    return [_qtensor(w, s, *r) for s, r in zip(specs, raw)]


def reconstruct_many(w: torch.Tensor, specs: list[QuantSpec], stats: MatrixStats | None = None) -> list[torch.Tensor]:
    """``[dequantize(quantize(w, s, stats)) for s in specs]`` without packing and unpacking codes
    (what a cost table needs); exactly equal to it, fp16 rounding of kept outliers included."""
    w, raw = _quantize_many_raw(w, specs, stats, values=True)
    return [_dense(w, s, *r) for s, r in zip(specs, raw)]


def _dense(w, spec, codes, aux, feat, flat) -> torch.Tensor:
    """W's reconstruction from one spec's codes (or, as floats, already their values) and aux."""
    aux = dict(aux)
    kept = aux.pop("kept", w)
    q = QUANTIZERS[spec.method]
    vals = codes if codes.is_floating_point() else q.dequantize(codes, aux, spec)
    out = from_layout(vals, spec).contiguous()
    if feat is not None and feat.numel():
        out[:, feat] = kept[:, feat].to(torch.float16).float()
    if flat is not None and flat.numel():
        out.view(-1)[flat] = kept.reshape(-1)[flat].to(torch.float16).float()
    return out


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the (out, in) matrix of a QTensor."""
    return dequantize_packed(q.packed, q.aux, q.spec, q.shape).to(dtype)


def dequantize_packed(packed: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec,
                      shape: tuple[int, int]) -> torch.Tensor:
    """Reconstruct an (out, in) fp32 matrix from its stored parts (used by modules)."""
    rows, cols = layout_shape(shape, spec)
    codes = packing.unpack(packed, spec.bits, rows * cols).view(rows, cols)
    w = from_layout(QUANTIZERS[spec.method].dequantize(codes, quant_params(aux, spec), spec), spec)
    if spec.outliers or spec.outlier_features:
        w = _restore_outliers(w.contiguous(), aux)
    return w


def aux_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, AuxSlot]:
    rows, cols = layout_shape(shape, spec)
    layout = QUANTIZERS[spec.method].aux_layout(spec, rows, cols)
    if spec.int_zero:  # the offsets' place: their integer zero points, packed at the codes' width
        n = math.prod(layout.pop("offset").shape)
        layout["zero"] = AuxSlot((packing.packed_nbytes(n, spec.bits),), torch.uint8)
    return {**layout, **_outlier_slots(spec, shape)}


def kernel_spec(spec: QuantSpec) -> QuantSpec | None:
    """``spec`` in a stored format the fused kernels read (gptq's codes are rtn's; exactly kept
    outliers stay in it: the kernels add them as a sparse correction), or None when the format
    needs the torch path (a quantizer without a kernel format)."""
    q = QUANTIZERS[spec.method]
    if q.kernel_format is None:
        return None
    if q.kernel_format == spec.method and not spec.int_zero:
        return spec
    # integer zero points reach the kernels as offsets (quant_params): the float-offset format
    return replace(spec, method=q.kernel_format, act_order=False, int_zero=False)


def packed_layout(spec: QuantSpec, shape: tuple[int, int]) -> AuxSlot:
    return AuxSlot((packing.packed_nbytes(math.prod(shape), spec.bits),), torch.uint8)


def storage_bits(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Exact stored bits of a matrix of ``shape`` quantized with ``spec`` (codes + aux)."""
    return packed_layout(spec, shape).nbits + sum(s.nbits for s in aux_layout(spec, shape).values())


from . import gptq as _gptq, nuq as _nuq  # noqa: E402,F401  (register the data-aware quantizers)
