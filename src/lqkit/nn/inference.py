"""Make a compressed model ready for fast inference in one call (``checkpoint.load`` does it).

On a CUDA GPU with triton: every layer whose format the kernels read gets its kernel layout once
(a :class:`.linear.KernelRunner`), layers that share an input are stacked and computed by one launch
(:mod:`.fuse`, found by one short forward), and the call for ``tokens`` tokens is bound ahead
(configuration, plan and compiled kernel fixed), so that a layer call costs one launch and little
host work, eagerly and under ``torch.compile`` / CUDA graphs (:mod:`.ops`). On the CPU: deq(Q) is
kept as a dense matrix in the compute dtype, so that a forward costs what the uncompressed model's
does (the memory of the dense linear weights, which an uncompressed model holds too; ``dense_cpu=False``
keeps only the packed codes and dequantizes in every call instead).

Prepared state is a snapshot for inference: ``.to()``/``.cuda()``/``.half()``, ``.train()`` and
``load_state_dict`` drop it (the unprepared paths, correct but slower, take over); after changing a
layer's tensors in place, prepare again.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .. import kernels
from ..core import quant as qmod
from .fuse import fuse_shared_inputs, unfuse
from .linear import CompressedLinear, KernelRunner
from .surgery import compressed_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare_for_inference` did."""

    device: str  # where the compressed layers are ("none": the model has none)
    kernel_layers: int  # layers on the fused kernels (alone or in a stack)
    stacks: tuple[tuple[str, ...], ...]  # sets of layers computed by one launch (q/k/v, gate/up, ...)
    dense_layers: int  # layers keeping deq(Q) dense (CPU)
    seconds: float
    tuned: int = 0  # distinct (shape, format, tokens) calls whose launch configuration was timed now
    tune_seconds: float = 0.0


def prepare_for_inference(model: nn.Module, *, fuse: bool = True, dense_cpu: bool = True,
                          tokens: tuple[int, ...] = (1,), example: torch.Tensor | None = None,
                          tuned: dict[str, dict] | None = None) -> Prepared:
    """Prepare ``model``'s compressed layers for inference where they are (see the module docstring).
    ``fuse``: stack layers that share an input (found by running ``model(example)``, default four
    token ids, once); ``tokens``: token counts whose kernel calls are bound now (the rest on first
    use); ``dense_cpu``: on the CPU keep deq(Q) dense. ``tuned``: a table of launch configurations
    (``kernels.tuned_config``'s keys): the calls bound now take theirs from it, and those not in it
    are timed now (once per distinct shape and format) and added to it; None: nothing is timed or
    read (the configurations this process already chose, else the defaults). Idempotent: prepares
    afresh each time."""
    t0 = time.time()
    unprepare(model)
    mods = compressed_modules(model)
    device = _device_of(mods.values())
    if device is None:
        return Prepared("none", 0, (), 0, 0.0)
    dtype = _compute_dtype(model)
    on_kernels = {n: m for n, m in mods.items() if _kernel_format(m)} if _kernels_usable(device) else {}
    stacks: tuple[tuple[str, ...], ...] = ()
    dense, n_tuned, tune_s = 0, 0, 0.0
    if on_kernels:
        runners = []
        if fuse:
            groups = _fuse(model, on_kernels, example, device)
            stacks = tuple(g.names for g in groups)
            runners += [g.prepare() for g in groups]
        runners += [m.prepare_runner() for m in on_kernels.values() if m._runner is None]
        if tuned is not None:
            n_tuned, tune_s = _tune(runners, dtype, tokens, tuned)
        for t in tokens:
            _bind(runners, (t,), dtype)
    elif device.type == "cpu" and dense_cpu:
        for m in mods.values():
            if m.spec.quant is not None:
                m._dense_q = m.dequantized_weight(dtype)
                dense += 1
    res = Prepared(str(device), len(on_kernels), stacks, dense, time.time() - t0, n_tuned, tune_s)
    log.info("prepared %d compressed layers on %s for inference: %d on the kernels (%d stacks), %d with a dense "
             "deq(Q) (%.1f s%s)", len(mods), device, res.kernel_layers, len(stacks), dense, res.seconds,
             f"; {n_tuned} launch configurations timed in {tune_s:.1f} s" if n_tuned else "")
    return res


def _tune(runners: list[KernelRunner], dtype: torch.dtype, tokens: tuple[int, ...],
          tuned: dict[str, dict]) -> tuple[int, float]:
    """Each distinct call's launch configuration from ``tuned`` or timed now (then added to it):
    (how many were timed, seconds)."""
    t0, n = time.time(), 0
    with torch.no_grad():
        for run in runners:
            for t in tokens:
                gen = torch.Generator(device=run.device).manual_seed(0)
                x = torch.randn(t, run.k, generator=gen, device=run.device).to(dtype)
                key, cfg, now = kernels.tuned_config(x, run.kw, run.L, run.R, run.bias, tuned)
                n += now
                if now:
                    log.info("timed the %d-token call of a %dx%d %s layer: %s", t, run.n, run.k,
                             run.kw.spec.label(), cfg or "no candidate ran; the default stays")
                if cfg:  # read from the table or timed now (a repeated key is then found there)
                    tuned[key] = cfg
    return n, time.time() - t0


def bind_calls(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Bind now, eagerly, every prepared layer's kernel call for inputs of ``shape`` without the last
    dimension (e.g. (batch, 1) for one decoding step): a call bound for the first time allocates lasting
    scratch, which must not come from the memory pool of a CUDA graph being recorded (torch.compile's
    "reduce-overhead" refuses a graph that leaves such tensors behind). Returns how many were bound."""
    runners = {id(m._runner): m._runner for m in compressed_modules(model).values() if m._runner is not None}
    return _bind(list(runners.values()), shape, _compute_dtype(model))


def _bind(runners: list[KernelRunner], shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Each runner's call for inputs of ``shape`` + (its K,) bound by one call on zeros, unless it is
    already: how many were bound."""
    n = 0
    with torch.no_grad():
        for run in runners:
            if (torch.Size((*shape, run.k)), dtype) not in run.calls:
                run(torch.zeros(*shape, run.k, dtype=dtype, device=run.device))
                n += 1
    return n


def unprepare(model: nn.Module) -> None:
    """Drop what :func:`prepare_for_inference` kept (kernel calls, stacks, dense weights)."""
    unfuse(model)
    for m in compressed_modules(model).values():
        m.drop_prepared()


def _kernels_usable(device: torch.device) -> bool:
    return device.type == "cuda" and kernels.available()


def _kernel_format(m: CompressedLinear) -> bool:
    return m.spec.quant is not None and qmod.kernel_spec(m.spec.quant) is not None and m.backend != "torch"


def _device_of(mods) -> torch.device | None:
    for m in mods:
        for t in (m._buffers.get("qcodes"), m.L):
            if t is not None:
                return t.device
    return None


def _compute_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _fuse(model: nn.Module, mods: dict[str, CompressedLinear], example: torch.Tensor | None,
          device: torch.device) -> list:
    """Stack the layers that share an input, found by one forward on the torch path (a few token ids
    unless ``example`` is given); none when the model cannot be run that way."""
    if example is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", 2)
        example = (torch.arange(1, 5, device=device) % vocab)[None]  # (1, 4)
    try:
        with _torch_path(mods.values()):
            groups = fuse_shared_inputs(model, example)
    except Exception as e:  # a model that needs more than token ids: each layer keeps its own launch
        log.warning("could not run the model on example token ids to find layers that share an input (%s: %s); "
                    "each layer runs as its own launch", type(e).__name__, (str(e).splitlines() or [""])[0][:200])
        unfuse(model)
        return []
    for g in [g for g in groups if not all(n in mods for n in g.names)]:  # a member kept off the kernels
        for m in g.members:
            m.__dict__.pop("_shared_input", None)
    return [g for g in groups if all(n in mods for n in g.names)]


@contextmanager
def _torch_path(mods) -> Iterator[None]:
    """Within the block the layers take the torch path (no kernel layout is built for the example run),
    without announcing it (they run on the kernels afterwards)."""
    saved = [m.__dict__.get("backend") for m in mods]
    quiet = logging.getLogger(CompressedLinear.__module__)
    level = quiet.level
    try:
        quiet.setLevel(logging.WARNING)
        for m in mods:
            m.backend = "torch"
        yield
    finally:
        quiet.setLevel(level)
        for m, b in zip(mods, saved):
            if b is None:
                del m.backend
            else:
                m.backend = b
