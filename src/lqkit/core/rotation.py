"""Randomized Hadamard rotations of a matrix's input dimension (pure tensor math).

A :class:`Rotation` (seed, block) of an input of size n is the orthogonal matrix

    R = blockdiag over the n/b blocks of (1/√b)·H_b·diag(s_block)

with H_b the Sylvester Hadamard matrix of order b (a power of two dividing n; by default the largest
up to :data:`MAX_BLOCK`: :func:`default_block`) and s ∈ {±1}^n random signs drawn from a CPU
``torch.Generator`` seeded by ``seed`` (the same signs on every machine and device). Since R is
orthogonal, W·x = (W·Rᵀ)·(R·x): a rotated layer compresses W' = W·Rᵀ like any other matrix and
rotates its input at run time; all it stores of the rotation is (seed, block). As in QuIP / QuIP# /
QuaRot, a random rotation spreads the large entries of W and the outlier features of x over whole
blocks (incoherence), which suits quantizers that share a scale across a group.

The transform: the log2 b butterfly stages of a fast Walsh–Hadamard transform, grouped into stages of
radix ≤ :data:`RADIX`, each one small matmul with H_r along one axis of x viewed as
(..., n/b, r_1, ..., r_k) (H_b = H_{r_1} ⊗ ... ⊗ H_{r_k}); with radix 2 it is the butterfly itself.
Two stages reach b = 4096 at 64 + 64 multiply-adds per element: a few launches on a GPU rather than
one (or three) per butterfly stage. 16-bit inputs are transformed in float32.

Statistics follow the matrix (:func:`rotate_gram`, :func:`rotate_fisher`): H' = R·H·Rᵀ exactly, so
tr(E'·H'·E'ᵀ) = tr(E·H·Eᵀ) for E' = E·Rᵀ; the Fisher diagonal of W' is not a function of W's (it
needs the cross-moments of the gradient), so it is estimated, keeping its row sums exact.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import SpecError

RADIX = 64  # the largest Hadamard factor applied as one matmul
# the largest default block. At one token a GPU rotates two blocks of 2048 for less than one of 4096
# (H100, rtn 4-bit 14336×4096 layer in a CUDA graph, 5 runs: +1.47 µs = +8.3 % against +1.89 µs = +10.6 %;
# bench/results/rotation-block-h100-*.json), and on gemma-3-270m's 2048-input matrices blocks of 256 to
# 2048 differ by no consistent amount (rtn 3-bit g128 output error under the calibration second moments
# 3.39 % in blocks of 2048, 3.28 % of 1024, 3.42 % of 512; 4-bit 0.70 / 0.72 / 0.72 %;
# bench/results/rotation-block-proxy-gemma-3-270m.json). Inputs of 4096 and more: quality not measured
MAX_BLOCK = 2048


@dataclass(frozen=True)
class Rotation:
    """x ↦ R·x along the input dimension: random signs from ``seed``, Hadamard blocks of ``block``."""

    seed: int  # seeds the CPU generator of the signs
    block: int  # Hadamard order, a power of two dividing the input size

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise SpecError(f"a rotation seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not (isinstance(self.block, int) and self.block >= 1 and self.block & (self.block - 1) == 0):
            raise SpecError(f"a rotation block must be a power of two, got {self.block!r}")

    def check(self, n: int, name: str = "the input") -> None:
        if n % self.block:
            raise SpecError(f"a rotation in blocks of {self.block} does not divide {name} of size {n}; use blocks of "
                            f"{default_block(n)} (the default for {n}: the largest power of two dividing it, at most "
                            f"{MAX_BLOCK})")

    def to_dict(self) -> dict:
        return {"seed": self.seed, "block": self.block}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Rotation":
        return cls(int(d["seed"]), int(d["block"]))

    @classmethod
    def for_size(cls, n: int, seed: int = 0) -> "Rotation":
        """The rotation of an input of size ``n`` in blocks of :func:`default_block`."""
        return cls(seed, default_block(n))


def default_block(n: int) -> int:
    """The largest power of two dividing n, at most :data:`MAX_BLOCK`."""
    if n < 1:
        raise SpecError(f"cannot rotate an input of size {n}")
    return min(n & -n, MAX_BLOCK)


def seed_for(key: str, seed: int = 0) -> int:
    """A 32-bit seed derived from ``key`` and a base ``seed`` (sha256: the same in every process,
    unlike Python's ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def for_matrix(name: str, in_features: int, seed: int = 0) -> Rotation:
    """The rotation of the matrix called ``name`` (a module path): seeded by its parent module and its
    input size, so that siblings reading one input (q/k/v, gate/up) share it and can run as one
    stacked launch after one rotation of that input, while every other matrix gets its own signs."""
    parent = name.rpartition(".")[0]
    return Rotation(seed_for(f"{parent}|{in_features}", seed), default_block(in_features))


@functools.lru_cache(maxsize=None)
def _signs_cpu(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).float() * 2 - 1  # (n,) ±1


def signs(rot: Rotation, n: int) -> torch.Tensor:
    """The random signs s (n,), float32 on the CPU."""
    return _signs_cpu(rot.seed, n).clone()


@functools.lru_cache(maxsize=None)
def hadamard(r: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order r (a power of two), ±1 entries, float32 on the CPU."""
    h = torch.ones(1, 1)
    while h.shape[0] < r:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def radices(block: int, radix: int = RADIX) -> tuple[int, ...]:
    """The Hadamard factors of the stages (powers of two ≤ radix, as even as possible, product = block)."""
    m, per = block.bit_length() - 1, radix.bit_length() - 1
    k = -(-m // per) if m else 0
    return tuple(1 << (m // k + (i < m % k)) for i in range(k))


@dataclass(frozen=True)
class Transform:
    """A rotation of inputs of one size, its tensors on one device (built by :func:`transform`)."""

    n: int
    block: int
    signs: torch.Tensor  # (n,) s/√b: the signs with the normalisation of H_b folded in
    factors: tuple[torch.Tensor, ...]  # (r, r) each, H_r (±1: exact in any dtype)

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """R·x (or Rᵀ·x with ``inverse``) along the last dim of x (..., n); x's dtype."""
        if x.shape[-1] != self.n:
            raise SpecError(f"a rotation of size {self.n} cannot rotate an input of size {x.shape[-1]}")
        dt = torch.promote_types(x.dtype, torch.float32)
        y = x * self.signs.to(dt) if not inverse else x.to(dt)  # 16-bit x promoted by the product: one launch
        lead = y.shape[:-1]
        k = len(self.factors)
        y = y.reshape(*lead, self.n // self.block, *(f.shape[0] for f in self.factors))  # (..., n/b, r_1, ..., r_k)
        for i, f in enumerate(self.factors):  # H_b = H_{r_1} ⊗ ... ⊗ H_{r_k}: H_{r_i} along axis i
            f, pos = f.to(dt), k - i  # pos: that axis counted from the end; H_r is symmetric
            if pos == 1:
                y = y @ f
            elif pos == 2:
                y = f @ y
            else:
                y = torch.movedim(torch.movedim(y, -pos, -1) @ f, -1, -pos)
        y = y.reshape(*lead, self.n)
        if inverse:
            y = y * self.signs.to(dt)
        return y.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _transform(rot: Rotation, n: int, device: torch.device, radix: int) -> Transform:
    rot.check(n)
    rs = radices(rot.block, radix)
    factors = tuple(hadamard(r).to(device) for r in rs)
    return Transform(n, rot.block, (_signs_cpu(rot.seed, n).double() / math.sqrt(rot.block)).float().to(device),
                     factors)


def transform(rot: Rotation, n: int, device: torch.device | str = "cpu", radix: int = RADIX) -> Transform:
    """The :class:`Transform` of ``rot`` for inputs of size ``n`` on ``device`` (built once, then cached:
    a rotated layer's call reuses its tensors)."""
    return _transform(rot, n, torch.device(device), radix)


def rotate_input(x: torch.Tensor, rot: Rotation, inverse: bool = False) -> torch.Tensor:
    """x' = R·x along the last dim of x (..., n) (Rᵀ·x with ``inverse``)."""
    return transform(rot, x.shape[-1], x.device)(x, inverse)


def rotate_weight(w: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """W' = W·Rᵀ for W (out, in), so that W·x = W'·(R·x): each row w_i becomes R·w_i."""
    return rotate_input(w, rot)


def unrotate_weight(w: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """W = W'·R, the inverse of :func:`rotate_weight` (for L·R: the rotated R back, R·Rot)."""
    return rotate_input(w, rot, inverse=True)


def rotate_gram(h: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """H' = R·H·Rᵀ of an (in, in) input second moment H = E[x·xᵀ] (the second moment of R·x), symmetric."""
    g = rotate_input(rotate_input(h.float(), rot).T, rot)  # R·(H·Rᵀ)ᵀᵀ: rows then columns
    return (g + g.T) / 2


def _block_mean(t: torch.Tensor, block: int) -> torch.Tensor:
    """Each entry replaced by the mean of its block of ``block`` along the last dim."""
    v = t.reshape(*t.shape[:-1], -1, block)
    return v.mean(-1, keepdim=True).expand(v.shape).reshape(t.shape)


def _h_ratio(h: torch.Tensor | None, rot: Rotation) -> torch.Tensor | None:
    """(in,): diag(R·H·Rᵀ) over the block means of diag(H) (1 where a block of H is all zero)."""
    if h is None:
        return None
    d = torch.diagonal(h).float().clamp_min(0)
    dr = torch.diagonal(rotate_gram(h, rot)).clamp_min(0)
    m = _block_mean(d, rot.block)
    return torch.where(m > 0, dr / m.clamp_min(1e-30), torch.ones_like(m))


def rotate_fisher(f: torch.Tensor, rot: Rotation, h: torch.Tensor | None = None) -> torch.Tensor:
    """An estimate of the Fisher diagonal of W' = W·Rᵀ from W's (out, in) diagonal ``f``.

    The gradient of W' is G·Rᵀ, so F'_ij = Σ_kl R_jk·R_jl·E[g_ik·g_il]: the diagonal terms (k = l)
    give the block mean of row i of F, the cross terms E[g_ik·g_il] are not kept (their signs s_k·s_l
    average them out over the random signs). With ``h`` (W's input second moment H), each column j is
    scaled by H'_jj over the block mean of H_jj: the cross terms as Kronecker-factored Fisher
    (E[g_ik·g_il] ∝ H_kl) sees them. The result is exact when F is K-FAC separable (F_ij = ρ_i·H_jj)
    and, without input correlations, equals the block mean; its row sums Σ_j F'_ij are always the
    true ones (Σ_j F_ij: rotation keeps each row's gradient norm), so the "kfac" sensitivities ρ_i
    are unchanged."""
    rot.check(f.shape[-1])
    out = _block_mean(f.float(), rot.block)
    ratio = _h_ratio(h, rot)
    return out if ratio is None else out * ratio


def rotate_fisher_sums(sums: tuple[torch.Tensor, torch.Tensor], rot: Rotation, h: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row sums, column sums) of :func:`rotate_fisher`'s estimate, from those of F alone: the row
    sums unchanged, the column sums block-averaged (and scaled as there with ``h``)."""
    rows, cols = sums
    rot.check(cols.shape[-1])
    cols = _block_mean(cols.float(), rot.block)
    ratio = _h_ratio(h, rot)
    return rows, cols if ratio is None else cols * ratio
