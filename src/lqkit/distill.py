"""Distillation after compression, at fixed bits.

A compressed checkpoint (the student) is trained against the uncompressed model it came from (the
teacher) on calibration text, with the packed codes frozen: what trains is, per CompressedLinear,
its low-rank factors L and R (rank > 0) and the floating-point parameters of its dequantizer — the
group scales and offsets of rtn / gptq, the scales of rtn_sym, the absmax of nf (with double
quantization: its fp32 block scales and mean; the 8-bit absmax codes stay frozen), the per-row
codebooks of nuq, and the fp16 values of exactly kept outliers. Integer tensors (codes, outlier
indices) never change, every tensor is written back in its stored dtype (fp16 scales, L and R in
the plan's ``factor_dtype``), so the plan, every stored shape and dtype, and hence the size, are
exactly those of the checkpoint distilled (checked).

Stage 1, block-wise output matching (streamed, as :mod:`lqkit.blockwise`: the teacher's blocks are
read from its folder one at a time): for block k the teacher's inputs X_k (its own hidden states)
give the targets Y_k = teacher_k(X_k); the student's block k runs on the student's own inputs (the
outputs of its already distilled blocks 0..k−1) and is trained to minimise MSE(student_k(x), Y_k)
with AdamW over minibatches of calibration windows. Student inputs (as EfficientQAT's Block-AP and
OmniQuant do): each block then learns to correct the error that reaches it from the blocks before,
and is trained on the inputs it will see at run time. A block whose loss does not go down (on the
training windows, with the stored, rounded values) keeps its previous values.

Stage 2 (optional, ``kl_steps``): end to end, every block at once, the KL divergence of the
student's next-token distribution from the teacher's; the teacher's logits come from its final
hidden states (kept from stage 1) through its own head, so the teacher never runs whole. Kept only
if the KL on held-out windows goes down.

Block lists and each block's call (position embeddings, masks) are found as calibration finds them
(:func:`lqkit.calibrate.block_calls`): no per-architecture code. Memory: the student whole (it is
compressed) + one teacher block + the teacher's embeddings and head + two copies of the
calibration activations.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .calibrate import (CalibConfig, _first_output, _hidden_of, _with_hidden, block_calls, calibration_ids,
                        find_blocks, first_inputs, forward_block, replaced_forwards, windows_per_call)
from .core.decompose import storage_bits
from .core.quant import DTYPES
from .data import DEFAULT_CALIB_TEXT, read_text
from .dist import default_device
from .errors import CheckpointError, LqkitError, ModelLoadError, SpecError
from .models import load_tokenizer
from .nn.linear import AUX_PREFIX, CompressedLinear
from .nn.surgery import compressed_modules
from .plan import plan_from_json

log = logging.getLogger(__name__)

ZERO_POINTS = ("auto", "free", "integer")


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 100  # AdamW steps per block (stage 1); 0: no block-wise stage
    lr: float = 1e-4  # learning rate of L and R (cosine decay to 0 over each block's steps)
    scale_lr: float = 1e-5  # learning rate of the quantization parameters (scales, offsets, levels)
    batch_size: int = 4  # calibration windows per step
    samples: int = 64  # calibration windows trained on
    seqlen: int = 512  # tokens per window, BOS included
    heldout: int = 8  # further windows, never trained on, on which losses are also reported
    scales: bool = True  # train the quantization parameters (False: only L and R)
    factors: bool = True  # train L and R
    zero_points: str = "auto"  # rtn/gptq offsets: "free", "integer" (offset = −z·scale, z frozen: the
    # matrix stays exportable with integer zero points), "auto": integer when the plan was made for a
    # serving target (compress --target), else free
    kl_steps: int = 0  # end-to-end KL steps after the block-wise stage (0: none)
    kl_lr: float = 1e-5  # learning rate of every trained tensor in the KL stage
    kl_batch_size: int = 1  # windows per KL step
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "kl_steps", "heldout"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                raise SpecError(f"distill {name.replace('_', ' ')} must be a non-negative integer, got {v!r}")
        for name in ("batch_size", "samples", "kl_batch_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise SpecError(f"distill {name.replace('_', ' ')} must be a positive integer, got {v!r}")
        if not (isinstance(self.seqlen, int) and self.seqlen >= 2):
            raise SpecError(f"distill sequence length must be at least 2 tokens, got {self.seqlen!r}")
        for name in ("lr", "scale_lr", "kl_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise SpecError(f"distill {name.replace('_', ' ')} must be a positive number such as 1e-4, got {v!r}")
        if self.zero_points not in ZERO_POINTS:
            raise SpecError(f"zero points must be one of {ZERO_POINTS}, got {self.zero_points!r}")
        if not (self.scales or self.factors):
            raise SpecError("nothing to distill: both the scales and the factors are frozen; train at least one")
        if self.steps == 0 and self.kl_steps == 0:
            raise SpecError("nothing to distill: give block-wise steps (e.g. --steps 100) or KL steps (--kl-steps)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BlockReport:
    block: int
    mse_before: float  # relative MSE ||student_k(x) − Y_k||² / ||Y_k||² on the training windows
    mse_after: float  # the same with the values written back (= before when not kept)
    heldout_before: float | None  # the same on the held-out windows
    heldout_after: float | None
    kept: bool  # False: training did not lower the loss; the block keeps its values
    trained_tensors: int
    seconds: float


@dataclass(frozen=True)
class DistillReport:
    config: dict
    zero_points: str  # the mode used ("free" or "integer")
    blocks: tuple[BlockReport, ...]
    kl: dict | None  # stage 2: {"before", "after", "kept", "seconds"} (KL on held-out windows, nats/token)
    heldout_nll: dict  # next-token loss on the held-out windows: teacher, student before, after
    weight_error: dict[str, float]  # per matrix, ||W − Ŵ||/||W|| after distillation
    trained_params: int  # elements trained per step of stage 1 summed over blocks
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# what trains: fp32 copies of one layer's L, R and floating quantization parameters


def trained_aux(m: CompressedLinear) -> list[str]:
    """The layer's floating auxiliary tensors (scales, offsets, absmax, codebooks, outlier values):
    what distillation may train of its Q (integer codes and indices stay frozen)."""
    return [n for n in m.aux_names if getattr(m, AUX_PREFIX + n).is_floating_point()]


class LayerCopy:
    """Trainable fp32 copies of one CompressedLinear's tensors. While it lives, a forward pre-hook
    puts them in the layer's place on every call (an integer-zero-point offset is derived there from
    the trained scale: offset = −z·scale, z frozen); :meth:`commit` writes them back in their stored
    dtypes, :meth:`restore` puts the original tensors back."""

    def __init__(self, m: CompressedLinear, scales: bool, factors: bool, integer_zero: bool):
        self.m = m
        self.orig = {n: getattr(m, n) for n in ("L", "R") if getattr(m, n) is not None}
        self.orig.update({AUX_PREFIX + n: getattr(m, AUX_PREFIX + n) for n in m.aux_names})
        self.factors = {n: nn.Parameter(t.detach().float().clone()) for n, t in self.orig.items()
                        if factors and n in ("L", "R")}
        names = trained_aux(m) if scales else []
        self.zero = None
        if integer_zero and {"scale", "offset"} <= set(names):
            s, off = m.q_scale.float(), m.q_offset.float()
            self.zero = torch.where(s > 0, torch.round(-off / s.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
            names.remove("offset")
        self.quant = {AUX_PREFIX + n: nn.Parameter(getattr(m, AUX_PREFIX + n).detach().float().clone()) for n in names}
        self._hook = m.register_forward_pre_hook(self._install)

    def params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(factors, quantization parameters)."""
        return list(self.factors.values()), list(self.quant.values())

    def _install(self, m: CompressedLinear, args) -> None:
        for n, p in self.factors.items():
            m._parameters[n] = p
        for n, p in self.quant.items():
            m._buffers[n] = p
        if self.zero is not None:
            m._buffers[AUX_PREFIX + "offset"] = -self.zero * self.quant[AUX_PREFIX + "scale"]

    def _close(self) -> None:
        self._hook.remove()

    @torch.no_grad()
    def commit(self) -> None:
        """Write the trained values into the layer, rounded to their stored dtypes."""
        self._close()
        m = self.m
        factor = DTYPES[m.spec.factor_dtype]
        for n, p in self.factors.items():
            m._parameters[n] = nn.Parameter(p.detach().to(factor).to(self.orig[n].dtype), requires_grad=False)
        for n, p in self.quant.items():
            m._buffers[n] = p.detach().to(self.orig[n].dtype)
        if self.zero is not None:
            off = self.orig[AUX_PREFIX + "offset"]
            m._buffers[AUX_PREFIX + "offset"] = (-self.zero * m.q_scale.float()).to(off.dtype)  # as the quantizer stores it

    def restore(self) -> None:
        """Put the original tensors back (after :meth:`commit` too)."""
        self._close()
        for n, t in self.orig.items():
            (self.m._parameters if n in ("L", "R") else self.m._buffers)[n] = t


def stored_layout(model: nn.Module) -> dict[str, tuple]:
    """name -> (shape, dtype) of everything a checkpoint stores for each compressed layer, L and R at
    their stored dtype: equal before and after distillation, or the size would have changed."""
    out = {}
    for name, m in compressed_modules(model).items():
        for b, t in m.named_buffers():
            out[f"{name}.{b}"] = (tuple(t.shape), t.dtype)
        for part in ("L", "R"):
            t = getattr(m, part)
            if t is not None:
                out[f"{name}.{part}"] = (tuple(t.shape), DTYPES[m.spec.factor_dtype])
    return out


# ----------------------------------------------------------------------------------------------
# stage 1: one block


def _run(block: nn.Module, x: torch.Tensor, call, rows: torch.Tensor) -> torch.Tensor:
    a, kw = _with_hidden(*call, x[rows])
    return _first_output(block(*a, **kw))


@torch.no_grad()
def block_mse(block: nn.Module, x: torch.Tensor, y: torch.Tensor, call, rows: torch.Tensor, chunk: int) -> float:
    """||block(x) − y||² / ||y||² over the windows ``rows`` (relative MSE, fp32)."""
    if rows.numel() == 0:
        return float("nan")
    err = ref = 0.0
    for i in range(0, rows.numel(), chunk):
        r = rows[i:i + chunk]
        out = _run(block, x, call, r).float()
        t = y[r].float()
        err += float((out - t).square().sum())
        ref += float(t.square().sum())
    return err / max(ref, 1e-30)


def _cosine(steps: int):
    return lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))


def _batches(rows: torch.Tensor, size: int, seed: int):
    """Endless minibatches of ``rows``: a fresh permutation every epoch, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = rows[torch.randperm(rows.numel(), generator=g)]
        for i in range(0, perm.numel() - size + 1 if perm.numel() >= size else 1, size):
            yield perm[i:i + size]


def _copies(module: nn.Module, cfg: DistillConfig, integer_zero: bool) -> list[LayerCopy]:
    return [LayerCopy(m, cfg.scales, cfg.factors, integer_zero) for m in compressed_modules(module).values()]


def _optimizer(copies: list[LayerCopy], lr: float, scale_lr: float) -> torch.optim.Optimizer | None:
    factors = [p for c in copies for p in c.params()[0]]
    quant = [p for c in copies for p in c.params()[1]]
    groups = [g for g in ({"params": factors, "lr": lr}, {"params": quant, "lr": scale_lr}) if g["params"]]
    return torch.optim.AdamW(groups, weight_decay=0.0) if groups else None


def _train(copies: list[LayerCopy], opt: torch.optim.Optimizer, steps: int, batches, loss_of, bar, key: str) -> None:
    """``steps`` optimizer steps on ``loss_of(rows)`` for the next rows of ``batches`` (cosine schedule),
    then the trained values committed to the layers; every layer restored if anything fails."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps))
    try:
        for _ in range(steps):
            with torch.enable_grad():
                loss = loss_of(next(batches))
                loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update()
                bar.set_postfix({key: f"{float(loss.detach()):.4g}"}, refresh=False)
        for c in copies:
            c.commit()
    except BaseException:
        for c in copies:
            c.restore()
        raise


def distill_block(block: nn.Module, x: torch.Tensor, y: torch.Tensor, call, train: torch.Tensor,
                  held: torch.Tensor, cfg: DistillConfig, integer_zero: bool, chunk: int, seed: int,
                  bar=None) -> tuple[float, float, float | None, float | None, bool, int]:
    """Train the compressed layers of ``block`` (run on x, the student's inputs) to produce y (the
    teacher's outputs) on the windows ``train``; (mse before, after, held-out before, after, kept,
    trained elements). The block keeps its previous values unless the loss on ``train`` went down."""
    before = block_mse(block, x, y, call, train, chunk)
    hbefore = block_mse(block, x, y, call, held, chunk) if held.numel() else None
    copies = _copies(block, cfg, integer_zero)
    opt = _optimizer(copies, cfg.lr, cfg.scale_lr)
    if opt is None:
        for c in copies:
            c.restore()
        return before, before, hbefore, hbefore, False, 0
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    _train(copies, opt, cfg.steps, _batches(train, cfg.batch_size, seed),
           lambda rows: F.mse_loss(_run(block, x, call, rows).float(), y[rows].float()), bar, "loss")
    after = block_mse(block, x, y, call, train, chunk)
    kept = after <= before  # NaN: not kept
    if not kept:
        for c in copies:
            c.restore()
        after = before
    hafter = (block_mse(block, x, y, call, held, chunk) if kept else hbefore) if held.numel() else None
    return before, after, hbefore, hafter, kept, n


# ----------------------------------------------------------------------------------------------
# losses through the model's own tail (final norm, head, soft-capping)


def _tail_logits(model: nn.Module, blocks: nn.ModuleList, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits (b, T, V) for hidden states h (b, T, H) leaving its last block: its own code
    after the blocks (block 0 hands h on, the others pass their input through)."""
    with replaced_forwards(blocks, lambda k, *a, **kw: h if k == 0 else _hidden_of(a, kw)):
        return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def tail_nll(model: nn.Module, blocks: nn.ModuleList, h: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token loss of windows ``ids`` (n, T) whose final hidden states are h (n, T, H)."""
    total = 0.0
    for i in range(ids.shape[0]):
        logits = _tail_logits(model, blocks, h[i:i + 1], ids[i:i + 1])
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[i, 1:]))
    return total / max(ids.shape[0], 1)


@torch.no_grad()
def model_nll(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token loss of a whole model on windows ``ids`` (n, T), one window a call."""
    total = 0.0
    for i in range(ids.shape[0]):
        logits = model(input_ids=ids[i:i + 1], use_cache=False).logits
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[i, 1:]))
    return total / max(ids.shape[0], 1)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged (nats)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


@torch.no_grad()
def heldout_kl(student: nn.Module, teacher: nn.Module, tblocks: nn.ModuleList, h: torch.Tensor,
               ids: torch.Tensor) -> float:
    total = 0.0
    for i in range(ids.shape[0]):
        t = _tail_logits(teacher, tblocks, h[i:i + 1], ids[i:i + 1])
        total += float(_kl(student(input_ids=ids[i:i + 1], use_cache=False).logits, t))
    return total / max(ids.shape[0], 1)


def distill_kl(student: nn.Module, teacher: nn.Module, tblocks: nn.ModuleList, h: torch.Tensor, ids: torch.Tensor,
               train: torch.Tensor, held: torch.Tensor, cfg: DistillConfig, integer_zero: bool,
               progress: bool = True) -> dict:
    """Stage 2: every compressed layer of ``student`` at once, against the teacher's logits (its head on
    its final hidden states h); kept only if the KL on the held-out windows (else the first training
    windows) goes down."""
    t0 = time.time()
    judge = held if held.numel() else train[:8]
    before = heldout_kl(student, teacher, tblocks, h[judge], ids[judge])
    copies = _copies(student, cfg, integer_zero)
    opt = _optimizer(copies, cfg.kl_lr, cfg.kl_lr)
    bar = tqdm(total=cfg.kl_steps, desc="distill KL", unit="step", disable=not progress)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = _tail_logits(teacher, tblocks, h[rows], ids[rows])
        return _kl(student(input_ids=ids[rows], use_cache=False).logits, t)

    try:
        _train(copies, opt, cfg.kl_steps, _batches(train, cfg.kl_batch_size, cfg.seed + 1_000_003), loss_of, bar, "kl")
    finally:
        bar.close()
    after = heldout_kl(student, teacher, tblocks, h[judge], ids[judge])
    kept = after <= before
    if not kept:
        for c in copies:
            c.restore()
    log.info("distill KL: %.4g -> %.4g nats/token on %s windows%s", before, after,
             "held-out" if held.numel() else "training", "" if kept else " (not kept)")
    return {"before": before, "after": after if kept else before, "kept": kept,
            "measured_on": "heldout" if held.numel() else "train", "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------------------------
# the whole model


def _integer_zero(cfg: DistillConfig, meta: Mapping) -> bool:
    if cfg.zero_points != "auto":
        return cfg.zero_points == "integer"
    alloc = (meta.get("extra") or {}).get("allocation") or {}
    target = alloc.get("target")
    if not target:
        return False
    from .core.serving import TARGETS

    return TARGETS[target].integer_zero if target in TARGETS else True


def _zero_mode(student: nn.Module, integer_zero: bool) -> str:
    """How the rtn/gptq zero points were trained: "integer", "free", or free except in the layers that
    store integer zero points (QuantSpec.int_zero: their format holds no other offset)."""
    affine = [m.spec.quant for m in compressed_modules(student).values()
              if m.spec.quant is not None and m.spec.quant.method in ("rtn", "gptq")]
    stored = sum(q.int_zero for q in affine)
    if integer_zero or (affine and stored == len(affine)):
        return "integer"
    return f"free (integer in the {stored} layers that store integer zero points)" if stored else "free"


def _split(n: int, heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) of n windows: the held-out ones spread over the text."""
    held = torch.linspace(0, n - 1, heldout).round().long().unique() if heldout else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def _check_teacher(name: str, m: CompressedLinear, w: torch.Tensor) -> None:
    if tuple(w.shape) != m.shape:
        raise CheckpointError(f"the source model's {name} is {tuple(w.shape)}, the checkpoint's {m.shape}: the "
                              "source model is not the one this checkpoint was compressed from; pass it with --model, "
                              "e.g. --model path/to/uncompressed")


def _weight_errors(sblock: nn.Module, tblock: nn.Module, prefix: str) -> dict[str, float]:
    out = {}
    for rel, m in compressed_modules(sblock).items():
        w = tblock.get_submodule(rel).weight.detach().float()
        _check_teacher(prefix + rel, m, w)
        with torch.no_grad():
            out[prefix + rel] = float((w - m.merged_weight(torch.float32)).norm() / w.norm().clamp_min(1e-30))
    return out


def distill_model(student: nn.Module, teacher, ids: torch.Tensor, cfg: DistillConfig, *, integer_zero: bool,
                  progress: bool = True) -> DistillReport:
    """Distill ``student`` (a compressed model, whole, on ``teacher.device``) against ``teacher`` (a
    :class:`lqkit.stream.BlockSource` of the uncompressed model) on the windows ``ids``
    (samples + held-out, seqlen); in place. See the module's text."""
    t_start = time.time()
    dev = teacher.device
    _, sblocks = find_blocks(student)
    if len(sblocks) != len(teacher.blocks):
        raise CheckpointError(f"the source model has {len(teacher.blocks)} decoder blocks, the checkpoint "
                              f"{len(sblocks)}: it is not the model this checkpoint was compressed from; pass it with "
                              "--model, e.g. --model path/to/uncompressed")
    ids = ids.to(dev)
    train, held = _split(ids.shape[0], min(cfg.heldout, ids.shape[0] - 1), cfg.seed)
    train, held = train.to(dev), held.to(dev)
    chunk = windows_per_call(ids.shape[1], dev)
    teacher.load_rest()
    tcalls = block_calls(teacher.model, teacher.blocks, ids, dev)
    scalls = block_calls(student, sblocks, ids, dev)
    xt = first_inputs(teacher.model, teacher.blocks, ids, dev, chunk)  # teacher's hidden states
    xs = first_inputs(student, sblocks, ids, dev, chunk)  # student's
    nll = {"teacher": None, "before": None, "after": None}
    if held.numel():
        nll["before"] = model_nll(student, ids[held])
    prefix = find_blocks(teacher.model)[0]
    reports, errors, trained = [], {}, 0
    bar = tqdm(total=len(sblocks) * cfg.steps, desc="distill blocks", unit="step", disable=not progress)
    try:
        for k, sblock in enumerate(sblocks):
            t0 = time.time()
            tblock = teacher.load_block(k)
            forward_block(tblock, xt, tcalls[k], chunk)  # xt <- Y_k (in place): targets, and the teacher's next inputs
            if cfg.steps:
                bar.set_description(f"distill block {k}")
                mb, ma, hb, ha, kept, n = distill_block(sblock, xs, xt, scalls[k], train, held, cfg, integer_zero,
                                                        chunk, cfg.seed + k, bar)
                trained += n
                reports.append(BlockReport(k, mb, ma, hb, ha, kept, n, round(time.time() - t0, 1)))
                log.info("block %d: relative MSE %.4g -> %.4g%s%s", k, mb, ma,
                         f" (held-out {hb:.4g} -> {ha:.4g})" if hb is not None else "", "" if kept else " (not kept)")
            errors.update(_weight_errors(sblock, tblock, f"{prefix}.{k}."))
            teacher.release_block(k)
            forward_block(sblock, xs, scalls[k], chunk)  # the distilled block's outputs: the next block's inputs
    finally:
        bar.close()
    kl = None
    if cfg.kl_steps:
        kl = distill_kl(student, teacher.model, teacher.blocks, xt, ids, train, held, cfg, integer_zero, progress)
    if held.numel():
        nll["teacher"] = tail_nll(teacher.model, teacher.blocks, xt[held], ids[held])
        nll["after"] = model_nll(student, ids[held])
    return DistillReport(cfg.to_dict(), _zero_mode(student, integer_zero), tuple(reports), kl, nll, errors,
                         trained, round(time.time() - t_start, 1))


# ----------------------------------------------------------------------------------------------
# checkpoint in, checkpoint out


@dataclass(frozen=True)
class DistillResult:
    out: str
    source: str  # the uncompressed model distilled from
    report: DistillReport
    effective_bits: float | None
    extra: dict = field(default_factory=dict)


def nothing_to_train(plan, cfg: DistillConfig) -> str | None:
    """Why a checkpoint with ``plan`` has nothing distillation could train under ``cfg`` (None: it has)."""
    if not plan:
        return "it has no compressed layers"
    ranks = any(s.rank for s in plan.values())
    quant = any(s.quant is not None for s in plan.values())
    if (cfg.factors and ranks) or (cfg.scales and quant):
        return None
    if not ranks and not cfg.scales:
        return "no layer has a low-rank part and the scales are frozen (drop --no-scales)"
    return "no layer has a quantized part and the factors are frozen (DistillConfig(factors=False))"


def _open_teacher(source: str, ckpt: Path, device: torch.device):
    from .stream import open_model

    p = Path(source).expanduser()
    if (source.startswith((".", "/", "~")) or p.is_absolute()) and not p.is_dir():
        raise ModelLoadError(f"the source model of {ckpt}, {source!r}, does not exist; pass the uncompressed model "
                             "it was compressed from with --model, e.g. --model path/to/uncompressed")
    try:
        return open_model(source, device)
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot open the source model of {ckpt} ({e}); pass the uncompressed model it was "
                             "compressed from with --model, e.g. --model path/to/uncompressed") from None


def distill(path: str | Path, out: str | Path, config: DistillConfig = DistillConfig(), *, model: str | None = None,
            calib_text: str | None = None, device: str | None = None, overwrite: bool = False,
            progress: bool = True) -> DistillResult:
    """Distill the lqkit checkpoint ``path`` against its source model (``model``, default: the one its
    lqkit.json names) on ``calib_text`` (default: the bundled WikiText-2 validation text) and write
    the result to ``out`` (atomically; ``out`` may be ``path`` with ``overwrite``). Every input is
    checked before the models are loaded."""
    t0 = time.time()
    path = Path(path).expanduser()
    meta = checkpoint.read_meta(path)
    checkpoint.refuse_tables(meta, path, "lqkit distill")
    plan = plan_from_json(meta["plan"])
    why = nothing_to_train(plan, config)
    if why:
        raise SpecError(f"checkpoint {path} has nothing to distill: {why}")
    source = model or (meta.get("extra") or {}).get("source_model")
    if not source:
        raise CheckpointError(f"checkpoint {path} does not name the model it was compressed from; pass it with "
                              "--model, e.g. --model path/to/uncompressed")
    checkpoint.check_out_dir(out, overwrite)
    body, label = read_text(calib_text, DEFAULT_CALIB_TEXT)
    tok = load_tokenizer(str(path))
    ids = calibration_ids(tok, body, CalibConfig(config.samples + config.heldout, config.seqlen, fisher=False))
    dev = torch.device(default_device(device))
    teacher = _open_teacher(str(source), path, dev)
    student = checkpoint.load(path, dtype=teacher.dtype, device=dev, prepare=False)
    for p in student.parameters():
        p.requires_grad_(False)
    layout = stored_layout(student)
    integer_zero = _integer_zero(config, meta)
    report = distill_model(student, teacher, ids, config, integer_zero=integer_zero, progress=progress)
    _check_unchanged(student, plan, layout, meta)
    del teacher
    summary = meta.get("summary") or {}
    extra = dict(meta.get("extra") or {})
    extra["distill"] = {**report.to_dict(), "source_model": str(source), "text": label, "seconds": round(time.time() - t0, 1),
                        "device": str(dev)}
    files = {f.name: f.read_bytes() for f in path.iterdir() if f.suffix == ".png" and f.is_file()}
    checkpoint.save(student, tok, out, plan=plan, reports=meta.get("reports"), summary=summary, extra=extra,
                    overwrite=overwrite, dense_dtype=DTYPES.get(meta.get("dtype", ""), None), files=files)
    return DistillResult(str(out), str(source), report, summary.get("effective_bits"), extra)


def _check_unchanged(student: nn.Module, plan, layout: dict, meta: Mapping) -> None:
    """The plan, every stored tensor's shape and dtype, and the compressed layers' bits are the
    checkpoint's: distillation never changes the size."""
    now = {n: m.spec for n, m in compressed_modules(student).items()}
    if now != dict(plan) or stored_layout(student) != layout:
        raise LqkitError("internal error: distillation changed the plan or a stored tensor's shape or dtype")
    bits = sum(storage_bits(m.spec, m.shape) for m in compressed_modules(student).values())
    want = (meta.get("summary") or {}).get("compressed_bits")
    if want is not None and bits != want:
        raise LqkitError(f"internal error: the compressed layers hold {bits} bits, the checkpoint says {want}")


def format_result(r: DistillResult) -> str:
    rep = r.report
    lines = [f"source model      {r.source}"]
    if rep.blocks:
        kept = sum(b.kept for b in rep.blocks)
        mb = sum(b.mse_before for b in rep.blocks) / len(rep.blocks)
        ma = sum(b.mse_after for b in rep.blocks) / len(rep.blocks)
        lines.append(f"block-wise        {len(rep.blocks)} blocks x {rep.config['steps']} steps, {kept} improved; "
                     f"mean relative MSE {mb:.4g} -> {ma:.4g}")
        for b in rep.blocks:
            held = f", held-out {b.heldout_before:.4g} -> {b.heldout_after:.4g}" if b.heldout_before is not None else ""
            lines.append(f"  block {b.block:<3}       {b.mse_before:.4g} -> {b.mse_after:.4g}{held}"
                         f"{'' if b.kept else ' (not kept)'}")
    if rep.kl:
        lines.append(f"end-to-end KL     {rep.kl['before']:.4g} -> {rep.kl['after']:.4g} nats/token"
                     f"{'' if rep.kl['kept'] else ' (not kept)'}")
    n = rep.heldout_nll
    if n.get("before") is not None:
        lines.append(f"held-out loss     {n['before']:.4f} -> {n['after']:.4f} (uncompressed: {n['teacher']:.4f})")
    bits = "-" if r.effective_bits is None else f"{r.effective_bits:.3f}"
    lines += [f"effective bits    {bits} (unchanged; zero points {rep.zero_points})",
              f"time              {rep.seconds:.1f} s",
              f"checkpoint        {r.out}"]
    return "\n".join(lines)
