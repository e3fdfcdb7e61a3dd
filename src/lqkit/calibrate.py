"""Calibration statistics of a causal LM: per linear layer, H = Σ xᵀx of its inputs, and the
empirical Fisher diagonal of its weight.

Data: ``samples`` windows of ``seqlen − 1`` tokens, evenly spaced over the tokenized calibration text
(default: the bundled WikiText-2 validation split, disjoint from the evaluation text), each with BOS
prepended (window i starts at floor(i·(N − seqlen + 1) / samples), as the evaluation protocol).

H, one decoder block at a time: the block list is the model's largest ``nn.ModuleList``. The inputs
of block 0 are captured once (a pre-hook that stops the forward), the keyword arguments each block
receives (masks, position embeddings; they differ between sliding and global layers) are recorded
in one full forward of the first window, then block k runs on the outputs of block k − 1, with
forward hooks on its linear layers feeding fp32 accumulators. Peak memory is one block's activations
plus the (samples, seqlen, hidden) hidden states. Layers that read the same input tensor (q/k/v,
gate/up) share one accumulator.

Fisher: per-example squared gradients, where an example is one calibration window: for each window
separately (batch size 1), the gradient of its mean next-token loss w.r.t. each compressed weight
is squared and accumulated; F = mean over windows. The square of a batch gradient would let
gradients of different windows cancel and underestimate sensitivity; per-token gradients would need
one backward per token. Only the compressed weights require grad (embeddings and the tied head do
not). The forward and backward run under bf16 autocast where bf16 is fast (CUDA, CPUs with
AVX-512-BF16/AMX; the Fisher is only a sensitivity estimate) and in fp32 elsewhere (``fisher_dtype``
"auto"; on AVX2-only CPUs bf16 is emulated and measured 3x+ slower); gradients and the accumulators
are always fp32. H is always computed in fp32. A window whose loss or gradients are not finite is skipped (warned); if all are, it is an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .core.stats import MatrixStats
from .errors import DataError, LqkitError
from .evaluate import bos_id, tokenize

log = logging.getLogger(__name__)


class CalibrationError(LqkitError, ValueError):
    """Calibration produced unusable statistics (non-finite activations or gradients)."""


@dataclass(frozen=True)
class CalibConfig:
    samples: int = 64  # calibration windows
    seqlen: int = 512  # tokens per window including BOS
    fisher: bool = True  # also compute the Fisher diagonal (one backward per window)
    fisher_dtype: str = "auto"  # autocast dtype of the Fisher forward/backward ("float32": none; "auto": see below)

    def __post_init__(self) -> None:
        if self.fisher_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise DataError(f"fisher dtype must be auto, bfloat16, float16 or float32, got {self.fisher_dtype!r}")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise DataError(f"calibration samples must be a positive integer, got {self.samples!r}")
        if not (isinstance(self.seqlen, int) and self.seqlen >= 2):
            raise DataError(f"calibration sequence length must be at least 2 tokens, got {self.seqlen!r}")


@dataclass
class CalibrationStats:
    """Statistics keyed by module name; ``get(name)`` gives the core's :class:`MatrixStats`."""

    h: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ xᵀx (in, in), fp32, canonical names
    count: dict[str, int] = field(default_factory=dict)  # tokens summed into h[name]
    h_alias: dict[str, str] = field(default_factory=dict)  # module -> module whose h it shares
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # mean g² (out, in), fp32
    meta: dict = field(default_factory=dict)  # model, text, samples, seqlen, timings, ...

    def names(self) -> set[str]:
        return set(self.h) | set(self.h_alias) | set(self.fisher)

    def get(self, name: str) -> MatrixStats | None:
        key = self.h_alias.get(name, name)
        h = self.h[key] / max(self.count[key], 1) if key in self.h else None
        f = self.fisher.get(name)
        return None if h is None and f is None else MatrixStats(h=h, fisher=f)

    def __contains__(self, name: str) -> bool:
        return name in self.names()


def calibration_ids(tokenizer, text: str, config: CalibConfig) -> torch.Tensor:
    """(samples, seqlen) token ids: evenly spaced windows of the text, BOS first."""
    ids = tokenize(tokenizer, text)
    span = config.seqlen - 1
    if ids.numel() < span:
        raise DataError(f"the calibration text has {ids.numel()} tokens; at least {span} are needed for one "
                        f"sequence of {config.seqlen} (with BOS): pass a longer --calib or --calib-seqlen "
                        f"{ids.numel() + 1} or less")
    starts = [i * (ids.numel() - span) // config.samples for i in range(config.samples)]
    bos = torch.full((1,), bos_id(tokenizer), dtype=torch.long)
    return torch.stack([torch.cat([bos, ids[s:s + span]]) for s in starts])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ``nn.ModuleList`` holding the most parameters (architecture-free)."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise CalibrationError("the model has no nn.ModuleList of decoder blocks; block-wise calibration "
                               "cannot find its layers")
    return best


class _Stop(Exception):
    pass


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class HessianAccumulator:
    """Σ xᵀx (fp32) of the inputs of the given linear layers, fed by forward hooks registered in
    :meth:`hooks`. Layers that receive the very same input tensor as an earlier layer in the same
    call (q/k/v, gate/up) are recorded as aliases on the first call and skipped afterwards."""

    def __init__(self, linears: Mapping[str, nn.Linear]):
        self.linears = dict(linears)
        self.h: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}

    def mean(self, name: str) -> torch.Tensor | None:
        """E[xᵀx] of ``name``'s inputs (shared with the layer it aliases), or None."""
        key = self.alias.get(name, name)
        return self.h[key] / max(self.count[key], 1) if key in self.h else None

    def means(self, names) -> dict[str, torch.Tensor | None]:
        """:meth:`mean` of each name, the sums divided in place (no second copy: a 28672-wide H is 3.3 GB;
        the accumulator is done after this); layers that share an input share one tensor (their identity
        says who reads one input, e.g. for the allocation's ties)."""
        done: dict[str, torch.Tensor | None] = {}
        for n in names:
            key = self.alias.get(n, n)
            if key not in done:
                if key in self.h:
                    self.h[key].div_(max(self.count[key], 1))
                    self.count[key] = 1
                done[key] = self.h.get(key)
        return {n: done[self.alias.get(n, n)] for n in names}

    def new_call(self) -> None:
        """Mark the start of one forward call (input identities are matched within a call)."""
        self._seen = {}

    def _hook(self, name: str):
        def hook(mod, args, output):
            if name in self.alias:
                return
            x = args[0]
            # the same tensor object (held here, so its id cannot be reused within the call)
            first = self._seen.setdefault(id(x), (x, name))[1]
            if first != name and name not in self.h:
                self.alias[name] = first
                return
            x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            if name not in self.h:
                self.h[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                self.count[name] = 0
            self.h[name].addmm_(x.t(), x)
            self.count[name] += x.shape[0]
        return hook

    def hooks(self) -> "contextlib.AbstractContextManager[HessianAccumulator]":
        return forward_hooks(self, self.linears, self._hook)


@contextmanager
def forward_hooks(acc, modules: Mapping[str, nn.Module], make: Callable[[str], Callable]) -> Iterator:
    """``make(name)`` registered as a forward hook of each named module while the block runs; yields ``acc``."""
    handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
    try:
        yield acc
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def _block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, device
                  ) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """(hidden states entering block 0 for every window (samples, seqlen, hidden), and the
    (args, kwargs) every block receives, recorded in one full forward of the first window)."""
    calls: list[tuple[tuple, dict] | None] = [None] * len(blocks)

    def record(i):
        def pre(mod, args, kwargs):
            calls[i] = (args, kwargs)
        return pre

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(input_ids=ids[:1].to(device), use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    if any(c is None for c in calls):
        raise CalibrationError("not every decoder block ran in a forward pass; cannot calibrate block-wise")

    hidden = []

    def stop(mod, args, kwargs):
        hidden.append(_hidden_of(args, kwargs).detach())
        raise _Stop

    hd = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for i in range(ids.shape[0]):
            try:
                model(input_ids=ids[i:i + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        hd.remove()
    return torch.cat(hidden), calls


@torch.no_grad()
def hessians(model: nn.Module, ids: torch.Tensor, names: Iterable[str], progress: bool = True,
             on_block: Callable[[int, HessianAccumulator], None] | None = None) -> HessianAccumulator:
    """Σ xᵀx of the inputs of the named linear layers, computed one decoder block at a time.

    ``on_block(k, acc_k)``, if given, is called once block k's statistics are complete and before
    its outputs are computed for block k + 1: it may replace the block's layers (sequential
    compression, as GPTQ does: every block then sees the inputs that the compressed blocks before
    it produce). That costs a second pass over each block."""
    device = next(model.parameters()).device
    prefix, blocks = find_blocks(model)
    names = list(names)
    hidden, calls = _block_inputs(model, blocks, ids, device)  # (samples, seqlen, hidden)
    acc = HessianAccumulator({n: model.get_submodule(n) for n in names})
    outside = [n for n in names if not any(n.startswith(f"{prefix}.{k}.") for k in range(len(blocks)))]
    if outside:
        log.warning("no input statistics for %d linear layer(s) outside the decoder blocks: %s",
                    len(outside), ", ".join(outside[:3]))
    desc = "calibrate H" if on_block is None else "compress block"
    for k, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress)):
        mine = {n: m for n, m in acc.linears.items() if n.startswith(f"{prefix}.{k}.")}
        sub = HessianAccumulator(mine)
        args, kwargs = calls[k]
        with sub.hooks():
            _run_block(block, hidden, args, kwargs, sub, keep=on_block is None)
        _check_finite(sub)
        if on_block is not None:
            on_block(k, sub)
            _run_block(block, hidden, args, kwargs, None, keep=True)
        acc.h.update(sub.h)
        acc.count.update(sub.count)
        acc.alias.update(sub.alias)
    return acc


def _run_block(block, hidden: torch.Tensor, args, kwargs, acc: HessianAccumulator | None, keep: bool) -> None:
    """Run ``block`` on every window of ``hidden``; with ``keep`` its outputs replace ``hidden``."""
    for i in range(hidden.shape[0]):
        if acc is not None:
            acc.new_call()
        a, kw = _with_hidden(args, kwargs, hidden[i:i + 1])
        out = _first_output(block(*a, **kw))
        if keep:
            hidden[i:i + 1] = out


def _check_finite(acc: HessianAccumulator) -> None:
    for name, h in acc.h.items():
        if not torch.isfinite(h).all():
            raise CalibrationError(f"the inputs of {name} are not finite on the calibration text: the model "
                                   "produces NaN/inf activations; check the model or use another dtype")


def fisher_diagonal(model: nn.Module, ids: torch.Tensor, names: Iterable[str], progress: bool = True,
                    dtype: str = "float32") -> tuple[dict[str, torch.Tensor], int]:
    """(mean over windows of the squared per-window gradient of each named weight, windows used)."""
    device = next(model.parameters()).device
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    acc = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    used = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for i in tqdm(range(ids.shape[0]), desc="calibrate Fisher", unit="seq", disable=not progress):
            x = ids[i:i + 1].to(device)
            with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
                logits = model(input_ids=x, use_cache=False).logits  # (1, T, V)
            loss = F.cross_entropy(logits[0, :-1].float(), x[0, 1:])
            del logits
            grads = torch.autograd.grad(loss, list(weights.values())) if torch.isfinite(loss) else None
            if grads is None or not all(torch.isfinite(g).all() for g in grads):
                log.warning("calibration window %d gives a non-finite loss or gradient; skipped", i)
                continue
            for n, g in zip(weights, grads):
                acc[n].addcmul_(g.float(), g.float())
            used += 1
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    if used == 0:
        raise CalibrationError("every calibration window gave a non-finite loss or gradient; the model "
                               "produces NaN/inf: no Fisher statistics can be computed")
    return {n: a / used for n, a in acc.items()}, used


def fast_autocast_dtype(device: torch.device) -> str:
    """"bfloat16" where bf16 matmuls are fast (CUDA; CPUs with AVX-512-BF16 or AMX), else "float32":
    on plain AVX2 CPUs bf16 autocast is emulated and several times slower than fp32."""
    if device.type == "cuda":
        return "bfloat16"
    cpu = getattr(torch, "cpu", None)
    fast = [getattr(cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bfloat16" if device.type == "cpu" and any(f is not None and f() for f in fast) else "float32"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibrate(model: nn.Module, tokenizer, text: str, names: Iterable[str], config: CalibConfig = CalibConfig(),
              *, text_label: str = "", model_label: str = "", progress: bool = True) -> CalibrationStats:
    """H (block-wise) and, if ``config.fisher``, the Fisher diagonal of the named linear layers."""
    names = list(names)
    ids = calibration_ids(tokenizer, text, config)
    was_training = model.training
    model.eval()
    t0 = time.time()
    acc = hessians(model, ids, names, progress)
    t_h = time.time() - t0
    fisher, used = ({}, 0)
    fdtype = config.fisher_dtype
    if fdtype == "auto":
        fdtype = fast_autocast_dtype(next(model.parameters()).device)
    if config.fisher:
        t1 = time.time()
        fisher, used = fisher_diagonal(model, ids, names, progress, fdtype)
        t_f = time.time() - t1
    model.train(was_training)
    meta = {
        "model": model_label, "text": text_label, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "samples": config.samples, "seqlen": config.seqlen, "tokens": int(ids.numel()),
        "fisher": f"per-window squared gradients (batch size 1), mean; {fdtype} autocast"
        if config.fisher else None,
        "fisher_windows": used, "seconds_h": round(t_h, 1),
        "seconds_fisher": round(t_f, 1) if config.fisher else None, "peak_rss_mb": round(_peak_rss_mb()),
        "torch_threads": torch.get_num_threads(),
    }
    log.info("calibration: H in %.0f s%s; peak RSS %.0f MiB", t_h,
             f", Fisher in {t_f:.0f} s" if config.fisher else "", meta["peak_rss_mb"])
    return CalibrationStats(h=acc.h, count=acc.count, h_alias=acc.alias, fisher=fisher, meta=meta)


# ----------------------------------------------------------------------------------------------
# Streamed calibration: the model's blocks need not all be in memory. Only the part outside the
# blocks (embeddings, final norm, head) is real while these run; each block is loaded by the caller
# (lqkit.stream) for its turn. Windows run in batches (the keyword arguments recorded for one window,
# masks and position embeddings of shape (1, ...), broadcast over a batch).


@contextmanager
def replaced_forwards(blocks: nn.ModuleList, fn: Callable) -> Iterator[None]:
    """Within the block, block k's forward is ``fn(k, *args, **kwargs)`` (the blocks may be on the
    meta device: they do not run). Restored on exit."""
    try:
        for k, b in enumerate(blocks):
            b.forward = functools.partial(fn, k)
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


def windows_per_call(seqlen: int, device: torch.device, tokens: int | None = None) -> int:
    """Windows per block forward: about 16k tokens on a GPU, 4k on a CPU."""
    tokens = tokens or (1 << 14 if device.type == "cuda" else 1 << 12)
    return max(1, tokens // max(seqlen, 1))


@torch.no_grad()
def block_calls(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, device) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) every block receives, recorded in one forward of the first window in
    which no block runs (each passes its input on)."""
    calls: list[tuple[tuple, dict] | None] = [None] * len(blocks)
    last = len(blocks) - 1

    def record(k, *args, **kwargs):
        calls[k] = (args, kwargs)
        if k == last:
            raise _Stop
        return _hidden_of(args, kwargs)

    with replaced_forwards(blocks, record):
        try:
            model(input_ids=ids[:1].to(device), use_cache=False)
        except _Stop:
            pass
    if any(c is None for c in calls):
        raise CalibrationError("not every decoder block ran in a forward pass; cannot calibrate block-wise")
    return calls


@torch.no_grad()
def first_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, device, chunk: int) -> torch.Tensor:
    """(samples, seqlen, hidden): what block 0 receives for every window (no block runs)."""
    out: list[torch.Tensor] = []

    def stop(k, *args, **kwargs):
        out.append(_hidden_of(args, kwargs).detach())
        raise _Stop

    with replaced_forwards(blocks, stop):
        for i in range(0, ids.shape[0], chunk):
            try:
                model(input_ids=ids[i:i + chunk].to(device), use_cache=False)
            except _Stop:
                pass
    return torch.cat(out)


def forward_block(block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict], chunk: int,
                  acc: HessianAccumulator | None = None, keep: bool = True) -> torch.Tensor:
    """Run ``block`` on every window of x (samples, seqlen, hidden), ``chunk`` windows per call;
    with ``acc``, its hooks (registered by the caller) see every call. With ``keep`` the outputs
    replace x (returned)."""
    args, kwargs = call
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            if acc is not None:
                acc.new_call()
            a, kw = _with_hidden(args, kwargs, x[i:i + chunk])
            y = _first_output(block(*a, **kw))
            if keep:
                x[i:i + chunk] = y
    return x


def _window_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each window (b,) from logits (b, T, V) and ids (b, T)."""
    b, t, v = logits.shape
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(b, t - 1).mean(dim=1)


def tail_grads(model: nn.Module, blocks: nn.ModuleList, x: torch.Tensor, ids: torch.Tensor, chunk: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, used): g = d(loss_w)/d(x_w) of each window's mean next-token loss with respect to the
    hidden states x (samples, seqlen, hidden) that leave the last block, computed by the model's own
    code after the blocks (final norm, head, softcapping, ...: block 0 hands x on, the others pass it
    through); used (samples,) bool marks windows whose loss is finite (the others get g = 0)."""
    g = torch.zeros_like(x)
    used = torch.zeros(x.shape[0], dtype=torch.bool)
    for i in range(0, x.shape[0], chunk):
        h = x[i:i + chunk].detach().requires_grad_(True)
        with replaced_forwards(blocks, lambda k, *a, **kw: h if k == 0 else _hidden_of(a, kw)):
            logits = model(input_ids=ids[i:i + chunk].to(x.device), use_cache=False).logits
        losses = _window_losses(logits, ids[i:i + chunk].to(x.device))
        del logits
        ok = torch.isfinite(losses)
        for j in torch.nonzero(~ok).flatten().tolist():
            log.warning("calibration window %d gives a non-finite loss; skipped", i + j)
        if ok.any():
            losses[ok].sum().backward()
            g[i:i + chunk] = torch.where(ok.view(-1, 1, 1), h.grad, 0)
        used[i:i + chunk] = ok.cpu()
    return g, used


class FisherAccumulator:
    """Σ over windows of the squared per-window gradient of each linear layer's weight, from what
    its forward saw and its output's gradient: g_w = Σ_t δ_{w,t}ᵀ·a_{w,t} for window w (inputs a,
    output gradients δ), squared and summed in fp32. Fed by hooks registered in :meth:`hooks`
    around a forward and backward over a batch of windows (one window a row)."""

    def __init__(self, linears: Mapping[str, nn.Linear], max_elems: int = 1 << 27):
        self.linears = dict(linears)
        self.sq: dict[str, torch.Tensor] = {}
        self.max_elems = max_elems  # elements of the (windows, out, in) per-window gradients at once

    def _add(self, name: str, a: torch.Tensor, d: torch.Tensor) -> None:
        a = a.reshape(a.shape[0], -1, a.shape[-1])  # (B, T, in)
        d = d.reshape(d.shape[0], -1, d.shape[-1])  # (B, T, out)
        acc = self.sq.get(name)
        if acc is None:
            acc = self.sq[name] = torch.zeros(d.shape[-1], a.shape[-1], dtype=torch.float32, device=a.device)
        per = max(1, self.max_elems // (d.shape[-1] * a.shape[-1]))
        for b in range(0, a.shape[0], per):
            g = torch.bmm(d[b:b + per].transpose(1, 2).float(), a[b:b + per].float())  # (b, out, in)
            acc += g.square_().sum(dim=0)

    def _hook(self, name: str):
        def hook(mod, args, out):
            a = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda d: self._add(name, a, d))
        return hook

    def hooks(self) -> "contextlib.AbstractContextManager[FisherAccumulator]":
        return forward_hooks(self, self.linears, self._hook)


class TableAccumulator:
    """Statistics of the embedding table and the output head (:class:`lqkit.core.embed.TableStats`)
    from the streamed Fisher sweep. Head side, from the model's tail (hooks of :meth:`head_hooks` on
    the head): H = E[x·xᵀ] of its input, and the row sensitivity ρ_v = Σ_j F_vj / tr H with the head's
    per-window Fisher row sums estimated as Σ_t δ_{t,v}²·‖x_t‖² (δ the gradient of the window's loss
    at the head's output; the cross terms between positions of a window are left out: the exact sums
    need a (vocab × tokens) product per window). Lookup side (:meth:`add_lookup`): the exact per-window
    Fisher diagonal of the rows the text reads, from the gradient at the embedding's output."""

    def __init__(self, head: nn.Module | None):
        self.head = head
        self.h: torch.Tensor | None = None  # Σ x·xᵀ of the head's inputs
        self.tokens = 0
        self.rows: torch.Tensor | None = None  # Σ over windows of the estimated Fisher row sums
        self.lookup_rows: torch.Tensor | None = None
        self.lookup_sq: torch.Tensor | None = None

    def _add_head(self, x: torch.Tensor, d: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-1])  # (tokens, dim)
        d = d.float().reshape(-1, d.shape[-1])  # (tokens, rows)
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.rows = torch.zeros(d.shape[1], dtype=torch.float64, device=d.device)
        self.h.addmm_(x.t(), x)
        self.tokens += x.shape[0]
        self.rows += (x.square().sum(dim=1) @ d.square()).double()  # Σ_t ‖x_t‖²·δ_tv²

    def _hook(self, name: str):
        def hook(mod, args, out):
            x = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda d: self._add_head(x, d))
        return hook

    def head_hooks(self) -> "contextlib.AbstractContextManager[TableAccumulator]":
        """While the model's tail runs forward and backward: feed the head side."""
        return forward_hooks(self, {"head": self.head} if self.head is not None else {}, self._hook)

    def add_lookup(self, ids: torch.Tensor, g: torch.Tensor, scale: float) -> None:
        """``g`` (windows, seqlen, dim): the gradient of each window's loss at the embedding's output
        (``scale`` times the rows of ``ids``); row i's per-window gradient is scale·Σ_{t: ids=i} g_t."""
        ids = ids.to(g.device)
        rows = ids.unique()  # sorted
        sq = torch.zeros(rows.numel(), g.shape[-1], dtype=torch.float32, device=g.device)
        for w in range(ids.shape[0]):
            u, inv = ids[w].unique(return_inverse=True)
            grad = torch.zeros(u.numel(), g.shape[-1], device=g.device).index_add_(0, inv, g[w].float()) * scale
            sq[torch.searchsorted(rows, u)] += grad.square()
        self.lookup_rows, self.lookup_sq = rows, sq

    def stats(self, windows: int, lookup: bool, head: bool):
        """The :class:`~lqkit.core.embed.TableStats` of a table read by lookup and/or as the head."""
        from .core.embed import TableStats

        kw = {}
        if lookup:
            if self.lookup_rows is None:
                raise CalibrationError("no gradient reached the embedding: its lookup statistics are missing")
            kw.update(lookup_rows=self.lookup_rows.cpu(), lookup_fisher=(self.lookup_sq / windows).cpu())
        if head:
            if self.h is None:
                raise CalibrationError("the output head never ran in the calibration sweep: its statistics are missing")
            h = self.h / max(self.tokens, 1)
            rho = self.rows / windows / float(torch.diagonal(h).clamp_min(0).sum().clamp_min(1e-30))
            kw.update(head_h=h.cpu(), head_rows=rho.float().cpu())
        return TableStats(**kw)


def backward_block(block: nn.Module, x: torch.Tensor, g: torch.Tensor, call: tuple[tuple, dict], chunk: int,
                   hacc: HessianAccumulator | None = None, facc: FisherAccumulator | None = None) -> torch.Tensor:
    """Recompute ``block`` on its inputs x (samples, seqlen, hidden) and back-propagate the gradient
    g of its outputs: returns the gradient of its inputs. The accumulators' hooks (registered here)
    gather H from the recomputed inputs and the per-window squared weight gradients on the way."""
    args, kwargs = call
    out = torch.empty_like(g)
    from contextlib import ExitStack

    with ExitStack() as stack:
        if hacc is not None:
            stack.enter_context(hacc.hooks())
        if facc is not None:
            stack.enter_context(facc.hooks())
        for i in range(0, x.shape[0], chunk):
            if hacc is not None:
                hacc.new_call()
            h = x[i:i + chunk].detach().requires_grad_(True)
            a, kw = _with_hidden(args, kwargs, h)
            with torch.enable_grad():
                y = _first_output(block(*a, **kw))
                torch.autograd.backward(y, g[i:i + chunk])
            out[i:i + chunk] = h.grad
    return out
