"""The kernels' weight layout, built once from lqkit's stored format (pure torch, no triton).

Stored format (``core.packing``): the layout matrix (rows, cols) of b-bit codes packed 8 codes per
b bytes, groups along cols. The kernels want, for every output row n, the codes along the reduction
dim K in 32-bit words, arranged so that one shift of a whole tile of words yields 32 *consecutive*
k's ("interleaved" packing):

    S = 32 // b codes per word (3 bits: 10 codes, 30 of 32 bits used);
    a K-tile is S·32 codes held by 32 consecutive words of a row;
    word (n, t·32 + i), bits [p_j, p_j + b)  ↔  code of k = t·S·32 + j·32 + i   (slice j, lane i),

with p_j = j·b, except that when the S codes split evenly between the word's two 16-bit halves
(H = S/2 codes each: 2, 3, 4, 5, 7, 8 bits) slice j sits in half j // H at p_j = 16·(j // H) +
b·(j % H). Then one shift and one and-or of a word decode a *pair* of codes (slices j and j + H)
into two fp16/bf16 values at once (the tensor-core kernel's decoding).

So a kernel loads a (rows × 32 words) tile once and gets slice j, a (rows × 32) block of codes for
32 consecutive k, with ``(w >> j·b) & mask``: no reshapes, no gathers. N is padded to a multiple of
:data:`N_PAD`, K to a multiple of the K-tile (padding codes are 0, padding scales 0, and x is masked,
so padding adds nothing). Scales, offsets and absmax are padded the same way; for group_dim "out"
they are stored transposed, (groups of n, k), so that a slice of 32 k's reads them contiguously.
Double-quantized NF absmax is dequantized here once to float32.

**Fragment layout** ("frag"; the default for the formats it holds: rtn / rtn_sym, 2–7 bits,
groups of a multiple of 16 along ``in``). Built for the tensor-core GEMV of :mod:`._frag`, where one warp
multiplies 16 rows at a time with ``mma.m16n8k16`` and each lane's 32-bit word *is* its operand:
the two 16-bit halves of a word hold codes of the same row at adjacent k (slot p of the low half
at k, of the high half at k + 1), so one shift and one ``lop3`` turn a word into a register of two
fp16/bf16 values 2ᵇ + code, exactly the A-fragment register the instruction wants. With P = 16 // b
codes per half and 4 words per lane (one 16-byte load), a block of 16 rows × 16·P k's is 4·32 words;
word v of lane (g, q) (lane = 4g + q) holds pairs P·v … P·v + P − 1, and pair u is register u % 4
of chunk u // 4 (16 k's): row g + 8·(u & 1), k = 16·chunk + 4q + 2·(u >> 1) (+1 in the high half).
Words are stored block by block, ``[row block, k block, lane, v]``: a lane's 4 words are one
16-byte load and a warp reads 512 contiguous bytes per block.

Its scales (and offsets) are stored in fragment order too, ``[row block, group, g, (s_g, s_g+8
[, o_g, o_g+8])]`` (:func:`frag_params`), so a lane reads the parameters of both of its rows in one
load per group; ``KernelWeight.scale`` holds that tensor and ``offset`` is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

from ..core import packing
from ..core import quant as qmod
from ..core.quant import QuantSpec

LANES = 32  # words per row of a K-tile (and k's per slice)
FRAG_WORDS = 4  # fragment layout: words per lane and block (one 16-byte load)
N_PAD = 128  # rows are padded to a multiple of the largest block of rows a kernel uses
MODES = {"rtn": 0, "rtn_sym": 1, "nf": 2, "nuq": 2}  # affine (scale, offset) / symmetric (scale) / table


def codes_per_word(bits: int) -> int:
    return 32 // bits


def k_tile(bits: int) -> int:
    return codes_per_word(bits) * LANES


def frag_ok(spec: QuantSpec) -> bool:
    """Formats the fragment layout holds (codes fit a bf16 mantissa; groups span whole 16-k chunks)."""
    return (spec.method in ("rtn", "rtn_sym") and spec.group_dim == "in" and spec.group_size % 16 == 0
            and 2 <= spec.bits <= 7)


def frag_kblock(bits: int) -> int:
    """k's per block of the fragment layout (16 rows × this many k's = 4 words × 32 lanes)."""
    return 16 * (16 // bits) * FRAG_WORDS // 4


def frag_pack(codes: torch.Tensor, bits: int, k_pad: int) -> torch.Tensor:
    """(N, K) integer codes, N a multiple of 16 -> int32 (N // 16, k_pad // kblock · 4 · 32) words of
    the fragment layout (zero-padded along K)."""
    n, k = codes.shape
    pw, kb = 16 // bits, frag_kblock(bits)
    nch = kb // 16
    c = torch.zeros(n, k_pad, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes
    # rows (rb, h8, g), k (kb, chunk, q, kk, e): pair u = 4·chunk + 2·kk + h8, e = half
    c = c.view(n // 16, 2, 8, k_pad // kb, nch, 4, 2, 2).permute(0, 3, 2, 5, 4, 6, 1, 7)
    c = c.reshape(n // 16, k_pad // kb, 8, 4, FRAG_WORDS, pw, 2)  # (rb, kb, g, q, v, p, e)
    shift = (16 * torch.arange(2, device=c.device).view(1, 2) + bits * torch.arange(pw, device=c.device).view(pw, 1))
    words = (c << shift).sum(dim=(-2, -1))  # (rb, kb, g, q, v): disjoint bits, so the sum is an or
    words = words.reshape(n // 16, -1)  # (rb, kb, lane = 4g + q, v)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def frag_unpack(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`frag_pack` (for tests and the reference): uint8 (N, k) codes."""
    rbs = words.shape[0]
    pw, kb = 16 // bits, frag_kblock(bits)
    nkb = words.shape[1] // (FRAG_WORDS * LANES)
    w = words.to(torch.int64).view(rbs, nkb, 8, 4, FRAG_WORDS)  # (rb, kb, g, q, v)
    shift = (16 * torch.arange(2, device=w.device).view(1, 2) + bits * torch.arange(pw, device=w.device).view(pw, 1))
    c = (w[..., None, None] >> shift) & ((1 << bits) - 1)  # (rb, kb, g, q, v, p, e)
    c = c.reshape(rbs, nkb, 8, 4, kb // 16, 2, 2, 2)  # (rb, kb, g, q, chunk, kk, h8, e)
    c = c.permute(0, 6, 2, 1, 4, 3, 5, 7).reshape(rbs * 16, nkb * kb)
    return c[:, :k].to(torch.uint8)


def frag_params(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """(N, ng) scales [and offsets], N a multiple of 16 -> (N // 16, ng, 8, 2 or 4): for row block
    rb, group j and lane row g: (s[g], s[g + 8]) [+ (o[g], o[g + 8])] of the block's rows."""
    n, ng = scale.shape
    parts = [t.reshape(n // 16, 2, 8, ng).permute(0, 3, 2, 1) for t in (scale, offset) if t is not None]
    return torch.cat(parts, dim=-1).contiguous()


def frag_unparams(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`frag_params`: (scale, offset or None), each (N, ng)."""
    rbs, ng = params.shape[:2]
    out = [params[..., i:i + 2].permute(0, 3, 2, 1).reshape(rbs * 16, ng) for i in range(0, params.shape[-1], 2)]
    return out[0], (out[1] if len(out) > 1 else None)


def half_codes(bits: int) -> int:
    """Codes per 16-bit half of a word when they split evenly between the halves, else S."""
    h = 16 // bits
    return h if 2 * h == codes_per_word(bits) else codes_per_word(bits)


def slot(bits: int, j: int) -> int:
    """Bit position of slice j's code inside its word."""
    h = half_codes(bits)
    return 16 * (j // h) + bits * (j % h)


@dataclass
class KernelWeight:
    """A quantized (out, in) matrix in the kernels' layout (tensors on one device)."""

    spec: QuantSpec
    shape: tuple[int, int]  # (N, K) = (out, in)
    qweight: torch.Tensor  # int32 (NP, KP // S): interleaved words along K; frag: (NP // 16, k blocks · 128)
    scale: torch.Tensor  # 'in': (NP, NGP) per (n, group of k); 'out': (NGP, KP) per (group of n, k); frag: frag_params
    offset: torch.Tensor | None  # rtn only, same layout as scale (frag: inside scale, None here)
    lut: torch.Tensor | None  # nf: float32 (2**bits,) levels; nuq: (NP, 2**bits) per row or (KP, 2**bits) per column
    n_pad: int
    k_pad: int
    layout: str = "interleaved"  # or "frag" (see the module docstring)
    fix: SparseFix | None = None  # exactly kept outliers, as a correction added after the main product
    lut_cols: bool = False  # nuq with groups along "out": lut holds a table per input column
    cache: dict = field(default_factory=dict, repr=False)  # per-device scratch (counters)

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def mode(self) -> int:
        return MODES[self.spec.method]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def lut_stride(self) -> int:
        """The kernels' LS: entries per table when each output row has its own (nuq, groups along
        "in"), minus that when each input column has its own (nuq, groups along "out"), 0 for one
        shared table (nf)."""
        if self.lut is None or self.lut.ndim != 2:
            return 0
        return -self.lut.shape[1] if self.lut_cols else self.lut.shape[1]

    @property
    def n_tiles(self) -> int:
        """K-tiles (interleaved) or k blocks (frag) per row."""
        return self.k_pad // (frag_kblock(self.bits) if self.layout == "frag" else k_tile(self.bits))

    def nbytes(self) -> int:
        """Bytes a kernel reads for the whole weight (words, scales, offsets, table)."""
        ts = [self.qweight, self.scale, self.offset, self.lut]
        fix = self.fix.nbytes() if self.fix is not None else 0
        return sum(t.numel() * t.element_size() for t in ts if t is not None) + fix


@dataclass
class SparseFix:
    """Exactly kept outliers (dense-and-sparse elements, LLM.int8()-style feature columns) as one
    CSR matrix C over the (N, K) weight with C = kept − deq(Q) at those positions, so that
    W = deq(Q) + C and y = x·deq(Q)ᵀ + x·Cᵀ: the main kernel reads the plain codes, one more pass
    adds x·Cᵀ. A feature column is an entry in every row."""

    rowptr: torch.Tensor  # int32 (N + 1,): row n's entries are [rowptr[n], rowptr[n + 1])
    col: torch.Tensor  # int32 (nnz,), sorted within each row
    val: torch.Tensor  # float32 (nnz,)

    @property
    def nnz(self) -> int:
        return self.col.numel()

    def rows(self) -> torch.Tensor:
        """int64 (nnz,) row of each entry."""
        n = self.rowptr.numel() - 1
        return torch.repeat_interleave(torch.arange(n, device=self.col.device), self.rowptr.diff().long())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.col, self.val))

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        """W + C in place for a dense (N, K) ``w`` (sums in fp32, rounded once to w's dtype); returns w."""
        rows, cols = self.rows(), self.col.long()
        w[rows, cols] = (w[rows, cols].float() + self.val).to(w.dtype)  # positions are unique
        return w


def interleave(codes: torch.Tensor, bits: int, k_pad: int) -> torch.Tensor:
    """(N, K) integer codes -> int32 (N, k_pad // S) interleaved words (zero-padded along K)."""
    n, k = codes.shape
    s = codes_per_word(bits)
    tiles = k_pad // (s * LANES)
    c = torch.zeros(n, k_pad, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes
    c = c.view(n, tiles, s, LANES)  # (N, T, slice j, lane i)
    words = torch.zeros(n, tiles, LANES, dtype=torch.int64, device=codes.device)
    for j in range(s):
        words |= c[:, :, j, :] << slot(bits, j)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.view(n, tiles * LANES).to(torch.int32)


def deinterleave(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`interleave` (for tests): int32 words -> uint8 (N, k) codes."""
    n, kw = words.shape
    s = codes_per_word(bits)
    w = words.to(torch.int64).view(n, kw // LANES, 1, LANES)
    shifts = torch.tensor([slot(bits, j) for j in range(s)], device=words.device).view(1, 1, s, 1)
    c = (w >> shifts) & ((1 << bits) - 1)  # (N, T, S, LANES)
    return c.reshape(n, -1)[:, :k].to(torch.uint8)


def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(rows, cols, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


LAYOUTS = ("auto", "frag", "interleaved")


def auto_layout(spec: QuantSpec) -> str:
    """The layout ``prepare_weight(..., layout="auto")`` picks for a format."""
    return "frag" if frag_ok(spec) else "interleaved"


def prepare_weight(packed: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec,
                   shape: tuple[int, int], device: torch.device | str | None = None,
                   layout: str = "auto") -> KernelWeight:
    """Convert one stored quantized matrix into the kernels' layout (done once per layer).
    ``layout``: "auto" (the default: "frag" for the formats :func:`frag_ok` accepts, else
    "interleaved"), "frag" (the tensor-core GEMV of :mod:`._frag`) or "interleaved" (every format)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    aux = qmod.quant_params(aux, spec)  # stored integer zero points (QuantSpec.int_zero) as offsets
    if layout == "frag" and not frag_ok(spec):
        raise ValueError(f"the fragment layout does not hold {spec.label()} (rtn/rtn_sym, 2-7 bits, "
                         "groups of a multiple of 16 along 'in'); use layout='interleaved'")
    frag = (auto_layout(spec) if layout == "auto" else layout) == "frag"
    device = torch.device(device) if device is not None else packed.device
    if qmod.kernel_spec(spec) != spec:
        raise ValueError(f"the kernels do not read {spec.label()} as stored; pass qmod.kernel_spec(spec) "
                         "(None: the format runs on the torch path)")
    n, k = shape
    rows, cols = qmod.layout_shape(shape, spec)
    packed = packed.to(device)
    codes = packing.unpack(packed, spec.bits, rows * cols).view(rows, cols)
    if spec.group_dim == "out":
        codes = codes.t()  # layout (in, out) -> (out, in)
    n_pad = -(-n // N_PAD) * N_PAD
    kt = frag_kblock(spec.bits) if frag else k_tile(spec.bits)
    k_pad = -(-k // kt) * kt
    if frag:
        padded = torch.zeros(n_pad, k, dtype=codes.dtype, device=device)
        padded[:n] = codes
        qweight = frag_pack(padded, spec.bits, k_pad)
    else:
        qweight = torch.zeros(n_pad, k_pad // codes_per_word(spec.bits), dtype=torch.int32, device=device)
        qweight[:n] = interleave(codes, spec.bits, k_pad)

    aux = {name: t.to(device) for name, t in aux.items()}
    fix = sparse_fix(packed, aux, spec, shape) if spec.outliers or spec.outlier_features else None
    spec = replace(spec, outliers=0.0, outlier_features=0.0)  # the main product reads the plain codes
    lut_cols = spec.method == "nuq" and spec.group_dim == "out"
    if spec.method == "nf":
        scale = qmod._dq_dequantize(aux) if spec.double_quant else aux["absmax"]
        offset = None
        lut = qmod.nf_table(spec.bits).to(device)
    elif spec.method == "nuq":  # a table per row (or per column), unit scales, one group spanning each row
        lut = _pad2(aux["codebook"].float(), k_pad if lut_cols else n_pad, 1 << spec.bits)
        spec = replace(spec, group_size=k_pad, group_dim="in")
        scale, offset = torch.ones(n, 1, dtype=torch.float16, device=device), None
    else:
        scale, offset, lut = aux["scale"], aux.get("offset"), None
    g = spec.group_size
    if spec.group_dim == "in":  # (N, ng) -> (n_pad, groups covering k_pad)
        dims = (n_pad, -(-k_pad // g))
    else:  # stored (K, ng) over groups of n -> (groups covering n_pad, k_pad)
        scale = scale.t()
        offset = offset.t() if offset is not None else None
        dims = (-(-n_pad // g), k_pad)
    scale = _pad2(scale.contiguous(), *dims)
    offset = _pad2(offset.contiguous(), *dims) if offset is not None else None
    if frag:
        scale, offset = frag_params(scale, offset), None
    return KernelWeight(spec=spec, shape=(n, k), qweight=qweight, scale=scale, offset=offset, lut=lut,
                        n_pad=n_pad, k_pad=k_pad, layout="frag" if frag else "interleaved", fix=fix,
                        lut_cols=lut_cols)


def sparse_fix(packed: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec,
               shape: tuple[int, int]) -> SparseFix:
    """The correction C = kept − deq(Q) at the exactly kept positions of a stored matrix, as CSR
    (:class:`SparseFix`). deq(Q) is the plain decode of the codes there (what the main kernel
    computes). Pure torch, on the tensors' device."""
    n, k = shape
    base = replace(spec, outliers=0.0, outlier_features=0.0)
    w0 = qmod.dequantize_packed(packed, aux, base, shape)  # without the outliers restored
    rows, cols, kept = [], [], []
    if "feat_idx" in aux:  # (n, kf) values, row-major: every row holds every kept column
        f = aux["feat_idx"].long()
        rows.append(torch.arange(n, device=w0.device).repeat_interleave(f.numel()))
        cols.append(f.repeat(n))
        kept.append(aux["feat_val"].float().reshape(-1))
    if "sp_idx" in aux:
        flat = aux["sp_idx"].long()
        rows.append(flat // k)
        cols.append(flat % k)
        kept.append(aux["sp_val"].float())
    r, c, v = (torch.cat(t) if t else torch.zeros(0, device=w0.device) for t in (rows, cols, kept))
    r, c = r.long(), c.long()
    order = torch.argsort(r * k + c)
    r, c, v = r[order], c[order], v[order]
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=w0.device)
    rowptr[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
    return SparseFix(rowptr=rowptr.to(torch.int32), col=c.to(torch.int32), val=(v - w0[r, c]).contiguous())


def reference_weight(kw: KernelWeight) -> torch.Tensor:
    """Dense fp32 (N, K) matrix decoded from the kernel layout (pure torch; for tests)."""
    n, k = kw.shape
    spec, g = kw.spec, kw.spec.group_size
    scale, offset = kw.scale, kw.offset
    if kw.layout == "frag":
        codes = frag_unpack(kw.qweight, kw.bits, k)[:n].float()
        scale, offset = frag_unparams(scale)
    else:
        codes = deinterleave(kw.qweight[:n], kw.bits, k).float()  # (N, K)
    if spec.group_dim == "in":
        s = scale[:n].float().repeat_interleave(g, dim=1)[:, :k]
        o = offset[:n].float().repeat_interleave(g, dim=1)[:, :k] if offset is not None else None
    else:
        s = kw.scale[:, :k].float().repeat_interleave(g, dim=0)[:n]
        o = kw.offset[:, :k].float().repeat_interleave(g, dim=0)[:n] if kw.offset is not None else None
    if kw.mode == 0:
        w = codes * s + o
    elif kw.mode == 1:
        w = (codes - (1 << (kw.bits - 1))) * s
    elif kw.lut_cols:  # a table per input column (nuq, groups along "out")
        w = torch.gather(kw.lut[:k], 1, codes.long().t()).t() * s
    elif kw.lut_stride:  # a table per row (nuq)
        w = torch.gather(kw.lut[:n], 1, codes.long()) * s
    else:
        w = kw.lut[codes.long()] * s
    return kw.fix.add_to(w) if kw.fix is not None else w


def rows_stack(layout: str, spec: QuantSpec) -> bool:
    """Whether matrices in this layout and format stack by rows: their parameters run along the rows
    (the fragment layout, or groups along ``in``)."""
    return layout == "frag" or spec.group_dim == "in"


def stackable(ws: "list[KernelWeight]") -> str | None:
    """Why these matrices cannot be stacked into one (a reason), or None when they can: same format,
    same K and layout, and a layout whose parameters run along the rows (fragment layout, or groups
    along ``in``)."""
    if len(ws) < 2:
        return "fewer than two matrices"
    a = ws[0]
    for w in ws[1:]:
        if w.spec != a.spec or w.layout != a.layout:
            return f"formats differ ({a.spec.label()}/{a.layout} vs {w.spec.label()}/{w.layout})"
        if w.shape[1] != a.shape[1] or w.k_pad != a.k_pad:
            return f"input sizes differ ({a.shape[1]} vs {w.shape[1]})"
        if w.scale.dtype != a.scale.dtype or w.device != a.device:
            return "scales' dtypes or devices differ"
    if not rows_stack(a.layout, a.spec):
        return "groups along 'out' (their parameters do not stack by rows)"
    if a.lut_cols:
        return "codebooks per input column (each matrix has its own for the shared columns)"
    if any(w.fix is not None for w in ws):
        return "exactly kept outliers (each matrix adds its own sparse pass)"
    return None


def stack_weights(ws: "list[KernelWeight]") -> tuple[KernelWeight, tuple[int, ...]]:
    """Matrices with one input (q/k/v, gate/up) as one (ΣN, K) matrix in the kernels' layout, and the
    row where each begins in it (member i's rows: offsets[i] … offsets[i] + N_i; rows between members
    are zero padding). Every layout pads N to a multiple of N_PAD, so the members' words,
    parameters and per-row tables (nuq) concatenate as they are."""
    why = stackable(ws)
    if why is not None:
        raise ValueError(f"cannot stack these matrices: {why}")
    offsets, row = [], 0
    for w in ws:
        offsets.append(row)
        row += w.n_pad
    a = ws[0]
    stacked = KernelWeight(spec=a.spec, shape=(offsets[-1] + ws[-1].shape[0], a.shape[1]),
                           qweight=_cat_rows([w.qweight for w in ws]), scale=_cat_rows([w.scale for w in ws]),
                           offset=_cat_rows([w.offset for w in ws]),
                           lut=_cat_rows([w.lut for w in ws]) if a.lut_stride else a.lut, n_pad=row, k_pad=a.k_pad,
                           layout=a.layout)
    return stacked, tuple(offsets)


def _cat_rows(ts: "list[torch.Tensor | None]") -> torch.Tensor | None:
    return torch.cat(ts, dim=0) if ts[0] is not None else None


def stack_factors(Ls: "list[torch.Tensor | None]", Rs: "list[torch.Tensor | None]",
                  biases: "list[torch.Tensor | None]", sizes: "tuple[int, ...]", offsets: "tuple[int, ...]",
                  n: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The stacked matrix's low-rank factors and bias: R the members' R one above the other (Σr, K),
    L block-diagonal (n, Σr) (member i's rows see only its own rank), the biases at their rows (zero
    where a member has none). None where no member has one. Pure torch."""
    ranks = [L.shape[1] if L is not None else 0 for L in Ls]
    L = R = b = None
    if sum(ranks):
        ref = next(t for t in Ls if t is not None)
        rr = next(t for t in Rs if t is not None)
        L = torch.zeros(n, sum(ranks), dtype=ref.dtype, device=ref.device)
        R = torch.zeros(sum(ranks), rr.shape[1], dtype=rr.dtype, device=rr.device)
        c = 0
        for Li, Ri, r, o, s in zip(Ls, Rs, ranks, offsets, sizes):
            if r:
                L[o:o + s, c:c + r] = Li
                R[c:c + r] = Ri
                c += r
    if any(t is not None for t in biases):
        ref = next(t for t in biases if t is not None)
        b = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        for bi, o, s in zip(biases, offsets, sizes):
            if bi is not None:
                b[o:o + s] = bi
    return L, R, b
