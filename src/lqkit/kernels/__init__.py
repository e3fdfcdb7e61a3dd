"""Fused GPU kernels (Triton) for compressed layers: y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ + b in one launch.

Optional: nothing here imports triton or touches CUDA until a kernel is asked for, so ``import
lqkit`` works without either. Usage::

    kw = prepare(packed, aux, spec, shape, device)   # once per layer: the kernels' layout
    y = linear(x, kw, L, R, bias)                     # every call
    bound, y = bind(x, kw, L, R, bias)                # or: the call prepared once, then y = bound(x)

Covers the stored formats: rtn / rtn_sym at 2..8 bits, nf at 2/3/4 bits (with or without
double-quantized absmax), groups along "in" or "out", any group size (multiples of 32 take the
fast paths); nuq codebooks per output row or per input column (tables looked up in registers);
and exactly kept outliers on any of them (a CSR correction added by one more launch,
:class:`.layout.SparseFix`). See :mod:`.layout` for the layouts, :mod:`._frag` for the fragment layout's tensor-core
GEMV (the default where it holds the format: 1–32 tokens, in launches of 16; dequantize + cuBLAS for
more) and :mod:`._triton` for the interleaved layout's kernels (a GEMV kernel for one token, a
tensor-core kernel for 2–16, tiled ``tl.dot`` or dequantize + cuBLAS for more).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..core.quant import QuantSpec
from .layout import KernelWeight, auto_layout, prepare_weight, stack_factors, stack_weights, stackable

if TYPE_CHECKING:
    from ..core.rotation import Rotation

__all__ = ["available", "prepare", "linear", "bind", "tune", "tuned_config", "use_config", "auto_layout",
           "path_for", "KernelWeight", "stack", "rotation", "plans_rotation",
           "stackable", "stack_factors"]


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when triton runs kernels on the CPU (TRITON_INTERPRET=1; for development and tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when the kernels can run here: triton importable and a CUDA device present."""
    return torch.cuda.is_available() and _triton_importable()


def path_for(quant: QuantSpec | None) -> str:
    """Where a matrix stored in this format runs on a CUDA GPU with triton: "triton/frag" (the
    tensor-core GEMV's fragment layout), "triton/interleaved", or "torch" (no quantized part, or a
    quantizer without a kernel format). Exactly kept outliers run on the kernels
    too, as one more sparse pass. Pure: imports neither triton nor CUDA."""
    from ..core import quant as qmod

    k = qmod.kernel_spec(quant) if quant is not None else None
    return f"triton/{auto_layout(k)}" if k is not None else "torch"


def prepare(packed: torch.Tensor, aux: Mapping[str, torch.Tensor], spec: QuantSpec,
            shape: tuple[int, int], device: torch.device | str | None = None, layout: str = "auto") -> KernelWeight:
    """Convert one stored quantized matrix (packed codes + aux, as in ``core.quant``) into the
    kernels' layout on ``device``. Pure torch; do it once per layer, not per call. ``layout``:
    "auto" (the default: "frag" where it holds the format, else "interleaved"), "frag" (a
    tensor-core GEMV, rtn/rtn_sym 2-7 bits with groups along ``in``, up to 32 tokens in launches of
    16; more tokens: dequantize + cuBLAS) or "interleaved" (every format; GEMV, tensor-core and tiled kernels)."""
    return prepare_weight(packed, aux, spec, shape, device, layout)


def stack(prepared: "list[KernelWeight]") -> tuple[KernelWeight, tuple[int, ...]]:
    """Matrices that share an input (q/k/v, gate/up), same format and K, as one stacked matrix: one
    launch computes all their outputs (fewer launches and fixed costs per decoder layer). Returns it
    and the row where each member's output begins (``stackable`` says why a set cannot be stacked;
    ``stack_factors`` stacks their L, R and bias to match). Pure torch."""
    return stack_weights(prepared)


def rotation(rot: Rotation, n: int, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The input rotation ``rot`` (a ``core.rotation.Rotation``) of inputs of size ``n`` on ``device``,
    as a callable x -> R·x: one Triton launch for bf16/fp16 inputs on a CUDA device (or under triton's
    interpreter) and blocks of 16..4096 (:mod:`._rotate`), else the core transform."""
    from ..core.rotation import transform

    dev = torch.device(device)
    if not ((dev.type == "cuda" and available()) or (interpreting() and _triton_importable())):
        return transform(rot, n, dev)
    from . import _rotate

    if _rotate.stages(rot.block) is None:
        return transform(rot, n, dev)
    return _rotate.TritonRotation(rot, n, dev)


@functools.lru_cache(maxsize=None)
def cached_rotation(rot: Rotation, n: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`rotation`, built once per (rotation, size, device) and kept (a model has a few per decoder
    layer, and a forward visits them in turn, so a bounded cache would miss on every call): the
    unprepared kernel path (a layer called without ``prepare_for_inference``) rotates with the same
    one launch as a prepared layer, without rebuilding its signs and Hadamard factors on every call."""
    return rotation(rot, n, device)


def linear(x: torch.Tensor, prepared: KernelWeight, L: torch.Tensor | None = None,
           R: torch.Tensor | None = None, bias: torch.Tensor | None = None, config=None,
           out: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    """y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ + bias, computed by the fused kernels; same dtype as x.
    ``config``: a ``_triton.Config`` to force a launch configuration (else tuned or default).
    ``rotation``: the layer's input rotation (a callable from :func:`rotation`), x ← R·x first, one
    launch more: where :func:`plans_rotation` (one token) planned with the GEMV's, into its scratch."""
    from . import _triton

    return _triton.linear(x, prepared, L, R, bias, config, out, rotation)


def plans_rotation(prepared: KernelWeight, m: int, dtype: torch.dtype, rotation, has_lr: bool = False) -> bool:
    """True when a call of ``m`` tokens of ``dtype`` on ``prepared`` takes ``rotation`` (from
    :func:`rotation`) into its plan: the rotation's launch into the plan's scratch, then the GEMV's
    (:func:`bind` keeps both; on a Hopper GPU the GEMV as a programmatic dependent launch, unless
    LQKIT_PDL=0): the fragment GEMV at one token, bf16/fp16, blocks of 16–4096, no exactly kept outliers."""
    if not _triton_importable():
        return False
    from . import _triton

    return _triton.plans_rotation(prepared, m, dtype, rotation, has_lr=has_lr)


def bind(x: torch.Tensor, prepared: KernelWeight, L: torch.Tensor | None = None, R: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, config=None, rotation=None):
    """``linear`` for x (m, K) — contiguous rows, 16-byte aligned — returned as ``(bound, y)``:
    ``bound(x2)`` computes the same for later inputs of this token count and dtype with the launch
    plan, compiled kernel and fixed arguments kept (per call: y allocated, one launch). For the
    layers' hot path (``lqkit.nn.prepare_for_inference``); :func:`tune` first if at all.
    ``rotation``: as in :func:`linear`; bind it only where :func:`plans_rotation` (else the bound
    call is the general one: rotate x first and bind the rest)."""
    from . import _triton

    return _triton.bind(x, prepared, L, R, bias, config, rotation)


def tune(x: torch.Tensor, prepared: KernelWeight, L=None, R=None, bias=None, **kw):
    """Time the candidate launch configurations for x's shape and keep the fastest (per process).
    By default back to back on rotating copies of the weights, larger together than the L2, as a
    decoder runs its layers (``cold=False``: isolated calls with the L2 flushed before each).
    ``report=fn(cfg, ms or None, seconds)`` is called after each candidate (progress)."""
    from . import _triton

    return _triton.tune(x, prepared, L, R, bias, **kw)


def tuned_config(x: torch.Tensor, prepared: KernelWeight, L=None, R=None, bias=None,
                 known: Mapping[str, dict] | None = None) -> tuple[str, dict | None, bool]:
    """The launch configuration for calls like ``x`` on ``prepared``, made this process's choice (as
    :func:`tune` makes it): the one under its key in ``known`` (a persisted table of earlier
    tunings) when it is there and valid, else the fastest of a few candidates timed now (one-token
    calls on the fragment layout). Returns ``(key, config as a dict, timed now?)``; config None: the
    default stays (no candidate for this call, or none ran), and nothing is worth keeping."""
    from dataclasses import asdict

    from . import _triton

    key = _triton.config_key(x, prepared, L, R)
    if known and key in known and use_config(x, prepared, L, R, known[key]):
        return key, dict(known[key]), False
    m = x.reshape(-1, prepared.shape[1]).shape[0]
    configs = _triton.quick_candidates(prepared, m, x.dtype, _triton.with_lr(L, R))
    if not configs:
        return key, None, False
    cfg, _ = _triton.tune(x, prepared, L, R, bias, configs=configs)
    return key, (asdict(cfg) if cfg is not None else None), True


def use_config(x: torch.Tensor, prepared: KernelWeight, L, R, config: Mapping) -> bool:
    """Make ``config`` (a dict of a launch configuration's fields) this process's choice for calls
    like ``x`` on ``prepared``. False, and nothing changed, when it is not a valid configuration for
    this layout (e.g. kept by another version)."""
    from . import _triton

    try:
        cfg = _triton.Config(**config)
    except TypeError:
        return False
    if cfg.kind not in _triton._KINDS[prepared.layout]:
        return False
    m = x.reshape(-1, prepared.shape[1]).shape[0]
    has_lr = _triton.with_lr(L, R)
    _triton.set_config(prepared, m, has_lr, x.dtype, cfg)
    return True
