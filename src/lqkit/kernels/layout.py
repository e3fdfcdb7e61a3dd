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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..core import packing
from ..core import quant as qmod
from ..core.quant import QuantSpec

LANES = 32  # words per row of a K-tile (and k's per slice)
N_PAD = 128  # rows are padded to a multiple of the largest block of rows a kernel uses
MODES = {"rtn": 0, "rtn_sym": 1, "nf": 2}  # affine (scale, offset) / symmetric (scale) / table (absmax)


def codes_per_word(bits: int) -> int:
    return 32 // bits


def k_tile(bits: int) -> int:
    return codes_per_word(bits) * LANES


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
    qweight: torch.Tensor  # int32 (NP, KP // S): interleaved words along K
    scale: torch.Tensor  # 'in': (NP, NGP) per (n, group of k); 'out': (NGP, KP) per (group of n, k)
    offset: torch.Tensor | None  # rtn only, same layout as scale
    lut: torch.Tensor | None  # nf only: float32 (2**bits,) levels
    n_pad: int
    k_pad: int
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
    def n_tiles(self) -> int:
        return self.k_pad // k_tile(self.bits)

    def nbytes(self) -> int:
        """Bytes a kernel reads for the whole weight (words, scales, offsets, table)."""
        ts = [self.qweight, self.scale, self.offset, self.lut]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


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


def prepare_weight(packed: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec,
                   shape: tuple[int, int], device: torch.device | str | None = None) -> KernelWeight:
    """Convert one stored quantized matrix into the kernels' layout (done once per layer)."""
    device = torch.device(device) if device is not None else packed.device
    n, k = shape
    rows, cols = qmod.layout_shape(shape, spec)
    packed = packed.to(device)
    codes = packing.unpack(packed, spec.bits, rows * cols).view(rows, cols)
    if spec.group_dim == "out":
        codes = codes.t()  # layout (in, out) -> (out, in)
    n_pad = -(-n // N_PAD) * N_PAD
    kt = k_tile(spec.bits)
    k_pad = -(-k // kt) * kt
    qweight = torch.zeros(n_pad, k_pad // codes_per_word(spec.bits), dtype=torch.int32, device=device)
    qweight[:n] = interleave(codes, spec.bits, k_pad)

    aux = {name: t.to(device) for name, t in aux.items()}
    if spec.method == "nf":
        scale = qmod._dq_dequantize(aux) if spec.double_quant else aux["absmax"]
        offset = None
        lut = qmod.nf_table(spec.bits).to(device)
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
    return KernelWeight(spec=spec, shape=(n, k), qweight=qweight, scale=scale, offset=offset, lut=lut,
                        n_pad=n_pad, k_pad=k_pad)


def reference_weight(kw: KernelWeight) -> torch.Tensor:
    """Dense fp32 (N, K) matrix decoded from the kernel layout (pure torch; for tests)."""
    n, k = kw.shape
    spec, g = kw.spec, kw.spec.group_size
    codes = deinterleave(kw.qweight[:n], kw.bits, k).float()  # (N, K)
    if spec.group_dim == "in":
        s = kw.scale[:n].float().repeat_interleave(g, dim=1)[:, :k]
        o = kw.offset[:n].float().repeat_interleave(g, dim=1)[:, :k] if kw.offset is not None else None
    else:
        s = kw.scale[:, :k].float().repeat_interleave(g, dim=0)[:n]
        o = kw.offset[:, :k].float().repeat_interleave(g, dim=0)[:n] if kw.offset is not None else None
    if kw.mode == 0:
        return codes * s + o
    if kw.mode == 1:
        return (codes - (1 << (kw.bits - 1))) * s
    return kw.lut[codes.long()] * s
