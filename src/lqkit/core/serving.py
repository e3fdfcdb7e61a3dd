"""What serving runtimes can hold of a plan (pure): lqkit's uniform integer grids as the integer
weight schemes of the ``compressed-tensors`` format that vLLM and SGLang read.

A matrix is servable when its Q is a uniform integer grid with groups along the input dimension:
``rtn`` and ``gptq`` (asymmetric: w = (q − zp)·scale with an integer zero point) and ``rtn_sym``
(symmetric: w = q·scale). Codebooks (nf, nuq), groups along the output dimension, exactly kept
outliers or feature columns, matrices without Q, and rotated matrices (W·Rᵀ stored, R·x at run time:
the format has no input transform) have no such scheme. L·R needs nothing here: it travels as a LoRA
adapter.

lqkit stores codes c ∈ [0, 2^b) and, for the asymmetric grid, ``offset = fp(−z·scale)`` with an
integer zero point z; compressed-tensors stores signed codes q = c − 2^(b−1) and zp = z − 2^(b−1),
so (q − zp)·scale = (c − z)·scale: the same grid, exact up to the rounding of the stored offset
(:func:`int_parts` checks that the offset is such a rounding).

A :class:`Target` is a runtime's reach: which bit widths and group sizes its kernels serve, and
whether it fuses layers that read one input (q/k/v, gate/up) into one layer of a single scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import SpecError
from . import quant as qmod
from .decompose import MatrixSpec
from .quant import DTYPES, QuantSpec

SYMMETRIC = {"rtn": False, "rtn_sym": True}  # stored integer grids (Quantizer.kernel_format) -> symmetric


@dataclass(frozen=True)
class IntScheme:
    """One compressed-tensors integer weight scheme (weight-only, static, groups along the input)."""

    bits: int
    group_size: int | None  # None: one group per output channel (strategy "channel")
    symmetric: bool

    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "channel"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class Target:
    """What a runtime serves: integer codes of ``bits`` (``asym_bits`` with zero points), groups of
    ``group_sizes`` (None: any size dividing the inputs; "channel" is always allowed), and whether
    layers that share an input must share one scheme (``ties``), and whether it can apply an input
    rotation before a layer (``transforms``)."""

    name: str
    bits: frozenset[int]
    asym_bits: frozenset[int]
    group_sizes: frozenset[int] | None = None
    ties: bool = True
    transforms: bool = False  # applies a layer's randomized Hadamard rotation of its input (core.rotation)
    group_multiple: int = 1  # group sizes a multiple of this and no larger than the input (when > 1)
    integer_zero: bool = True  # reads integer zero points (what distillation keeps for it: distill.py)
    note: str = ""


TARGETS: dict[str, Target] = {}


def register(t: Target) -> Target:
    TARGETS[t.name] = t
    return t


# what the compressed-tensors pack-quantized format itself expresses (export checks this)
FORMAT = register(Target("compressed-tensors", frozenset(range(1, 9)), frozenset(range(1, 9)), ties=False,
                         note="anything the format stores; transformers reads it"))
register(Target("vllm", frozenset(range(2, 9)), frozenset(range(2, 9)),
                note="vLLM / SGLang compressed-tensors int weight-only, 2-8 bits; q/k/v and gate/up fused"))
register(Target("vllm-marlin", frozenset({4, 8}), frozenset({4, 8}), frozenset({32, 64, 128}),
                note="the schemes vLLM's Marlin/Machete kernels serve on any recent vLLM: 4 and 8 bits, "
                     "groups of 32/64/128 or per channel"))
# lqkit's own GPU path at its fastest: what the fragment GEMV reads (kernels.layout.frag_ok: integer grids,
# groups of a multiple of 16 along in, 2-7 bits; no codebook, kept outlier or output-dim group, which take
# slower kernels or an extra pass), and q/k/v and gate/up tied to one scheme so that each group runs as one
# stacked launch; no input rotation (a stack shares one, which the tie does not hold, and it adds 7-17 % a call)
register(Target("lqkit-gpu", frozenset(range(2, 8)), frozenset(range(2, 8)), frozenset({16, 32, 64, 128, 256}),
                group_multiple=16, integer_zero=False,
                note="lqkit's fused GPU kernels at full speed: 2-7-bit integer grids with groups along in, "
                     "q/k/v and gate/up stacked"))


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise SpecError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


# (why not, how to avoid it): the one-line refusals of export and the filter of --target
_OPTION = "or compress with --target vllm"


def refusal(spec: MatrixSpec, shape: tuple[int, int], target: Target = FORMAT) -> tuple[str, str] | None:
    """Why ``target`` cannot hold a matrix of ``shape`` compressed with ``spec`` and which option
    avoids it, or None when it can."""
    q = spec.quant
    if spec.rotation is not None and not target.transforms:
        return "an input rotation (randomized Hadamard)", "compress without --rotate"
    if q is None:
        return "no quantized part (low rank only)", f"use a method with Q (lq, lorc, rtn, gptq) {_OPTION}"
    why = quant_refusal(q, target)
    if why is not None:
        return why
    if target.group_multiple > 1 and (q.group_size % target.group_multiple or q.group_size > shape[1]):
        # (a group over the whole row is stored at its own size: tied layers of one scheme could then
        # differ in format and not stack)
        return (f"groups of {q.group_size} over {shape[1]} inputs",
                f"use --cand-group-sizes with multiples of {target.group_multiple} up to the input size")
    if q.group_size < shape[1] and (shape[1] % q.group_size
                                    or (target.group_sizes is not None and q.group_size not in target.group_sizes)):
        sizes = _csv(target.group_sizes) if target.group_sizes is not None else f"a divisor of {shape[1]}"
        return (f"groups of {q.group_size} over {shape[1]} inputs", f"use --group-size/--cand-group-sizes {sizes} {_OPTION}")
    return None


def quant_refusal(q: QuantSpec, target: Target = FORMAT) -> tuple[str, str] | None:
    """:func:`refusal` of a Q config as far as it does not depend on the matrix (group sizes do)."""
    k = qmod.kernel_spec(q)
    if k is None or k.method not in SYMMETRIC:
        return (f"{q.method} codebooks", f"use --quantizer rtn, rtn_sym or gptq (--cand-quantizers rtn,gptq) {_OPTION}")
    if q.group_dim != "in":
        return "groups along the output dim", f"use --group-dim in (--cand-group-dims in) {_OPTION}"
    if q.outliers:
        return "kept fp16 outliers", f"use --outliers 0 (--cand-outliers 0) {_OPTION}"
    if q.outlier_features:
        return "16-bit feature columns", f"use --outlier-features 0 {_OPTION}"
    allowed = target.bits if SYMMETRIC[k.method] else target.asym_bits
    if q.bits not in allowed:
        return (f"{q.bits}-bit codes ({target.name} serves {_csv(allowed)}{'' if SYMMETRIC[k.method] else ' with zero points'})",
                f"use --bits/--cand-bits {_csv(allowed)} {_OPTION}")
    return None


def servable(spec: MatrixSpec, shape: tuple[int, int], target: Target = FORMAT) -> bool:
    return refusal(spec, shape, target) is None


def scheme(q: QuantSpec, in_features: int) -> IntScheme:
    """The integer scheme of a servable Q (see :func:`refusal`)."""
    k = qmod.kernel_spec(q)
    return IntScheme(q.bits, q.group_size if q.group_size < in_features else None, SYMMETRIC[k.method])


def _csv(values) -> str:
    return ",".join(str(v) for v in sorted(values))


@dataclass(frozen=True)
class IntParts:
    """A matrix in compressed-tensors' terms: w = (q − zp)·scale per group along the input."""

    q: torch.Tensor  # int8 (out, in), signed codes in [−2^(b−1), 2^(b−1))
    scale: torch.Tensor  # (out, groups), lqkit's stored dtype
    zero: torch.Tensor | None  # int8 (out, groups), signed zero points; None when symmetric


def int_parts(codes: torch.Tensor, aux: Mapping[str, torch.Tensor], q: QuantSpec) -> IntParts:
    """lqkit's codes (uint8 (out, in)) and aux of a servable Q as signed codes, scales and zero
    points. The zero point z = round(−offset/scale) is kept when the offset is −z·scale up to the
    rounding of the stored dtypes (the spec's scale dtype, or a coarser one the tensors were cast
    to); any other offset (a zero point off the integers) raises SpecError."""
    half = 1 << (q.bits - 1)
    signed = (codes.to(torch.int16) - half).to(torch.int8)
    aux = qmod.quant_params(aux, q)  # stored integer zero points: their offsets
    scale = aux["scale"]
    if SYMMETRIC[qmod.kernel_spec(q).method]:
        return IntParts(signed, scale, None)
    s, off = scale.float(), aux["offset"].float()
    z = torch.where(s > 0, torch.round(-off / s.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    z = z.clamp_(0, (1 << q.bits) - 1)
    eps = max(torch.finfo(d).eps for d in (DTYPES[q.scale_dtype], scale.dtype, aux["offset"].dtype))
    if ((off + z * s).abs() > eps * (off.abs() + z * s.abs())).any():
        raise SpecError("a stored offset is not −zero·scale for an integer zero point; "
                        "this matrix cannot be written as compressed-tensors zero points")
    return IntParts(signed, scale, (z.to(torch.int16) - half).to(torch.int8))


def dequantize_parts(p: IntParts) -> torch.Tensor:
    """(q − zp)·scale in fp32, (out, in): the reference the tests compare compressed-tensors with."""
    out, n = p.q.shape
    ng = p.scale.shape[1]
    g = p.q.float().reshape(out, ng, -1)
    if p.zero is not None:
        g = g - p.zero.float().unsqueeze(-1)
    return (g * p.scale.float().unsqueeze(-1)).reshape(out, n)
