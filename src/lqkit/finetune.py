"""LQ-LoRA fine-tuning: train the low-rank factors L, R of a compressed model; Q stays frozen.

Only ``L`` and ``R`` of each CompressedLinear (and optionally norm weights and biases) receive
gradients. The packed codes and scales are buffers and are never written; the forward dequantizes Q
on the fly, and with gradient checkpointing (on by default) the dense deq(Q) lives only while one
decoder layer is being computed, never as a persistent full-precision copy of the model.

A run folder ``out`` holds:
- ``best/``: lqkit checkpoint with the lowest held-out loss (``last/`` when there is no held-out split);
- ``last/``: lqkit checkpoint after the final step;
- ``resume/``: the latest resumable state (trainable tensors in fp32, AdamW moments, RNG state in
  safetensors; step, data position, scheduler, optimizer scalars, losses in JSON), written every
  ``save_every`` steps with an atomic pointer swap, so a run killed at any moment resumes exactly;
- ``log.jsonl``: one line per step (loss, lr, tokens/s) and per evaluation; ``finetune.json``: the
  config, source, data and result.
Saved checkpoints store L and R in the plan's ``factor_dtype`` (float16 by default), so a reloaded
checkpoint differs from the in-training fp32 factors by that rounding; resuming uses the fp32 state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, outdir
from .errors import CheckpointError, SpecError
from .models import load_tokenizer
from .nn.linear import CompressedLinear
from .plan import plan_from_json
from .train_data import BAD_LINE_POLICIES, FORMATS, IGNORE, PackedData, load_packed

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
STATE_VERSION = 1


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 100  # optimizer steps
    seq_len: int = 512  # tokens per packed sequence (BOS included)
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 turns it off
    schedule: str = "cosine"  # after warm-up: cosine | linear decay to 0, or constant
    warmup_steps: int = 10  # linear warm-up steps
    seed: int = 0  # data order and any randomness
    precision: str = "fp32"  # fp32, or bf16 autocast (trainable masters stay fp32)
    grad_checkpointing: bool = True  # recompute activations in the backward pass (less memory)
    train_norms: bool = False  # also train norm weights
    train_biases: bool = False  # also train biases
    eval_every: int = 50  # steps between held-out evaluations (0: only after the last step)
    eval_fraction: float = 0.05  # share of packed sequences held out (the last ones)
    max_eval_sequences: int = 32  # cap on held-out sequences
    save_every: int = 50  # steps between resumable states (0: none)
    data_format: str = "auto"  # auto | text | jsonl
    on_bad_line: str = "error"  # JSONL lines that cannot be used: error | skip

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "grad_accum"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise SpecError(f"{name.replace('_', ' ')} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "max_eval_sequences"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise SpecError(f"{name.replace('_', ' ')} must be a non-negative integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise SpecError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise SpecError("weight decay and max grad norm must be non-negative")
        if self.seq_len < 2:
            raise SpecError(f"sequence length must be at least 2, got {self.seq_len}")
        if not 0 <= self.eval_fraction < 1:
            raise SpecError(f"eval fraction must be in [0, 1), got {self.eval_fraction}")
        choices = {"schedule": SCHEDULES, "precision": PRECISIONS, "data_format": FORMATS,
                   "on_bad_line": BAD_LINE_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SpecError(f"{name.replace('_', ' ')} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "FinetuneConfig":
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        return cls(**d)


# fields that may change between an interrupted run and its resumption (they do not change the losses)
RESUMABLE_CHANGES = ("eval_every", "save_every", "on_bad_line")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    losses: tuple[float, ...]  # training loss of each optimizer step (mean NLL per target token)
    evals: tuple[tuple[int, float], ...]  # (step, held-out loss)
    best_step: int | None  # step of the lowest held-out loss (None without a held-out split)
    best_eval_loss: float | None
    tokens: int  # tokens processed in this process (after any resume)
    seconds: float
    peak_memory_bytes: int  # CUDA: max allocated; CPU: the process's peak resident set size
    trainable_params: int
    resumed_from: int | None  # step a resumed run started from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    out: str
    best: str  # checkpoint folder to use
    last: str
    peft: str | None  # PEFT export folder, when asked for
    train: TrainResult
    data_sequences: int
    eval_sequences: int

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# what is trained


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower()


def trainable_parameters(model: nn.Module, train_norms: bool = False, train_biases: bool = False) -> dict[str, nn.Parameter]:
    """Name -> parameter of what fine-tuning updates: L and R of every CompressedLinear with a
    low-rank part, and optionally norm weights and biases."""
    chosen: dict[str, nn.Parameter] = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, CompressedLinear) and m.L is not None:
            chosen[prefix + "L"], chosen[prefix + "R"] = m.L, m.R
        if train_norms and _is_norm(m):
            chosen.update({prefix + n: p for n, p in m.named_parameters(recurse=False)})
    if train_biases:
        chosen.update({n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"})
    return chosen


def freeze_all_but(model: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
    keep = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def zero_init_lora(model: nn.Module, seed: int = 0) -> None:
    """QLoRA-style start: L = 0 (LoRA's B) and R random (LoRA's A, Kaiming-uniform as in peft), so the
    model starts as its quantized part alone. Used for the QLoRA baseline."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CompressedLinear) and m.L is not None:
                bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
                m.L.zero_()
                m.R.copy_(torch.empty(m.R.shape).uniform_(-bound, bound, generator=g).to(m.R))


# ----------------------------------------------------------------------------------------------
# memory


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new peak-memory measurement (CUDA allocator, or Linux's VmHWM via /proc/self/clear_refs)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak stays the process's lifetime peak


def peak_memory(device: torch.device | str = "cpu") -> int:
    """Peak bytes since the last reset: CUDA max allocated, or the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------
# the loop


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return 1 - p
    return 1.0


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(micro: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Training-sequence indices of micro-batch number ``micro``: a fresh permutation every epoch,
    fixed by the seed, so the data position is just the number of micro-batches consumed."""
    out = []
    for g in range(micro * batch_size, (micro + 1) * batch_size):
        epoch, i = divmod(g, n)
        out.append(int(_epoch_order(n, seed, epoch)[i]))
    return out


def _autocast(cfg: FinetuneConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


LOSS_CHUNK_ELEMENTS = 1 << 24  # logits per loss chunk (64 MiB in fp32)


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(decoder body, output head, final logit soft-cap) when the model is the usual
    ``lm_head(model.model(x))``; None otherwise (then the full logits are used)."""
    try:
        body, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    if body is None or body is model or not isinstance(head, nn.Linear):
        return None
    return body, head, getattr(model.config, "final_logit_softcapping", None)


def _chunk_nll(h: torch.Tensor, t: torch.Tensor, head: nn.Module, cap: float | None) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, t, reduction="sum")


def _nll_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig,
             split: tuple | None = None) -> torch.Tensor:
    """Summed next-token NLL of the target tokens of a batch.

    With ``split`` (see :func:`_split_head`) only the hidden states of target positions go through the
    output head, in chunks that are recomputed in the backward pass: the (B, T, vocab) logits are
    never held at once (for gemma-3's 262k vocabulary they would be the largest activation)."""
    target = torch.cat([y[:, 1:], torch.full_like(y[:, :1], IGNORE)], dim=1)  # (B, T): next token
    with _autocast(cfg, x.device):
        if split is None:
            logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
        body, head, cap = split
        h = body(input_ids=x, use_cache=False).last_hidden_state  # (B, T, H)
        keep = target != IGNORE
        h, t = h[keep], target[keep]  # (n, H), (n,)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // head.out_features)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, t.numel(), chunk):
            if torch.is_grad_enabled():
                total = total + torch.utils.checkpoint.checkpoint(_chunk_nll, h[i:i + chunk], t[i:i + chunk], head,
                                                                  cap, use_reentrant=False)
            else:
                total = total + _chunk_nll(h[i:i + chunk], t[i:i + chunk], head, cap)
        return total


@torch.no_grad()
def loss_split(model: nn.Module, x: torch.Tensor, cfg: FinetuneConfig) -> tuple | None:
    """The chunked-loss split of ``model`` if it reproduces the model's own logits on ``x``, else None."""
    split = _split_head(model)
    if split is None:
        return None
    was_training = model.training
    model.eval()
    y = x.clone()
    try:
        ref = _nll_sum(model, x, y, cfg)
        got = _nll_sum(model, x, y, cfg, split)
    except Exception as e:  # an unusual architecture: keep the plain path
        log.info("chunked loss unavailable (%s); using full logits", e)
        return None
    finally:
        model.train(was_training)
    if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
        log.info("the model post-processes its logits; using full logits for the loss")
        return None
    return split


@torch.no_grad()
def heldout_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig,
                 split: tuple | None = None) -> float:
    """Mean NLL per target token of the held-out sequences."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, x.shape[0], cfg.batch_size):
        xb, yb = x[i:i + cfg.batch_size].to(device), y[i:i + cfg.batch_size].to(device)
        total += float(_nll_sum(model, xb, yb, cfg, split))
        count += int((yb[:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = float(v) if torch.is_tensor(v) else v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for idx, sc in meta["scalars"].items():
        for k, v in sc.items():
            state.setdefault(int(idx), {})[k] = torch.tensor(v, dtype=torch.float32) if k == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors() -> dict[str, torch.Tensor]:
    t = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        t.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return t


def _restore_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _set_checkpointing(model: nn.Module, on: bool) -> bool:
    """Turn gradient (activation) checkpointing of a transformers model on or off, non-reentrant
    (transformers >= 5 names it ``activation_checkpointing_*``; older ones ``gradient_checkpointing_*``)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing; training without it", type(model).__name__)
        return False
    new_api = hasattr(model, "activation_checkpointing_enable")
    if on and new_api:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
    return True


def _check_resume(meta: dict, cfg: FinetuneConfig, data: PackedData, params: Mapping[str, nn.Parameter]) -> None:
    if meta.get("state_version") != STATE_VERSION:
        raise CheckpointError(f"training state version {meta.get('state_version')} is not {STATE_VERSION}; start again")
    old = FinetuneConfig.from_dict(meta["config"]).to_dict()
    new = cfg.to_dict()
    changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        diffs = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise SpecError(f"cannot resume with different settings ({diffs}); repeat the original options")
    if meta["data_sha256"] != data.sha256:
        raise SpecError("the data file changed since the run started; resume with the same --data")
    if meta["params"] != list(params):
        raise CheckpointError("the training state's parameters do not match the model; start again without --resume")


def _restore(root: Path, cfg: FinetuneConfig, data: PackedData, params: Mapping[str, nn.Parameter],
             opt: torch.optim.Optimizer, sched) -> dict:
    """Load the latest state under ``root`` into params, optimizer, scheduler and RNG; return its JSON."""
    tensors, meta = checkpoint.load_state(root)
    _check_resume(meta, cfg, data, params)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    _load_optimizer_state(opt, tensors, meta["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    _restore_rng(tensors)
    return meta


def _open_log(run_dir: Path, step: int):
    """``run_dir/log.jsonl`` for appending, without lines of steps after ``step`` (written after the
    state a resumed run starts from)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = run_dir / "log.jsonl"
    kept = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step] \
        if step and f.exists() else []
    f.write_text("".join(ln + "\n" for ln in kept))
    return f.open("a")


def _accumulate(model: nn.Module, data: PackedData, batches: list[list[int]], cfg: FinetuneConfig, split,
                device: torch.device) -> float:
    """Forward and backward over the micro-batches of one optimizer step; gradients are those of the
    mean NLL over all their target tokens. Returns that mean."""
    targets = max(1, sum(int((data.labels[b, 1:] != IGNORE).sum()) for b in batches))
    loss_sum = 0.0
    for b in batches:
        x, y = data.input_ids[b].to(device), data.labels[b].to(device)  # (B, T)
        nll = _nll_sum(model, x, y, cfg, split)
        (nll / targets).backward()
        loss_sum += float(nll.detach())
    return loss_sum / targets


def train(model: nn.Module, data: PackedData, cfg: FinetuneConfig, *, params: Mapping[str, nn.Parameter] | None = None,
          run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          on_step: Callable[[dict], None] | None = None,
          on_best: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fine-tune ``params`` (default: :func:`trainable_parameters`) of ``model`` in place.

    ``run_dir``: where ``resume/`` states and ``log.jsonl`` go (None: nothing is written).
    ``on_step``: called with each step's log record (after any state save); ``on_best``: called with
    (step, loss) whenever the held-out loss reaches a new minimum."""
    device = next(model.parameters()).device
    params = dict(params if params is not None else trainable_parameters(model, cfg.train_norms, cfg.train_biases))
    if not params:
        raise CheckpointError("the model has nothing to train: no low-rank factors (rank 0 everywhere)")
    freeze_all_but(model, params)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg=cfg))
    step, micro, losses, evals, best = 0, 0, [], [], (None, math.inf)
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume:
        meta = _restore(run_dir / "resume", cfg, data, params, opt, sched)
        step, micro, losses = meta["step"], meta["micro_batches"], meta["losses"]
        evals = [tuple(e) for e in meta["evals"]]
        best = (meta["best_step"], meta["best_eval_loss"] if meta["best_eval_loss"] is not None else math.inf)
        log.info("resuming at step %d (micro-batch %d)", step, micro)
    resumed_from = step if resume else None
    log_file = _open_log(run_dir, step) if run_dir is not None else None

    checkpointing = cfg.grad_checkpointing and _set_checkpointing(model, True)
    model.train()
    n = data.input_ids.shape[0]
    has_eval = data.eval_input_ids.shape[0] > 0
    n_trainable = sum(p.numel() for p in params.values())
    log.info("training %d tensors (%.2fM parameters) on %d sequences of %d tokens; %d held out",
             len(params), n_trainable / 1e6, n, data.seq_len, data.eval_input_ids.shape[0])

    def save_state() -> None:
        tensors = {f"param.{k}": p.detach().float() for k, p in params.items()}
        opt_tensors, opt_meta = _optimizer_state(opt)
        tensors.update(opt_tensors)
        tensors.update(_rng_tensors())
        meta = {"state_version": STATE_VERSION, "config": cfg.to_dict(), "data_sha256": data.sha256,
                "params": list(params), "step": step, "micro_batches": micro,
                "samples_seen": micro * cfg.batch_size, "epoch": micro * cfg.batch_size // n,
                "optimizer": opt_meta, "scheduler": sched.state_dict(), "losses": losses,
                "evals": [list(e) for e in evals], "best_step": best[0],
                "best_eval_loss": None if best[0] is None else best[1]}
        checkpoint.save_state(run_dir / "resume", f"step-{step:08d}", tensors, meta)

    split = loss_split(model, data.input_ids[:1, :16].to(device), cfg)
    reset_peak_memory(device)
    t0, tokens = time.time(), 0
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", unit="step", disable=not progress)
    try:
        while step < cfg.steps:
            batches = [batch_indices(micro + k, cfg.batch_size, n, cfg.seed) for k in range(cfg.grad_accum)]
            lr = opt.param_groups[0]["lr"]
            loss = _accumulate(model, data, batches, cfg, split, device)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, micro = step + 1, micro + cfg.grad_accum
            tokens += len(batches) * cfg.batch_size * data.seq_len
            losses.append(loss)
            tok_s = tokens / max(time.time() - t0, 1e-9)
            record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s}
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            if has_eval and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                ev = heldout_loss(model, data.eval_input_ids, data.eval_labels, cfg, split)
                evals.append((step, ev))
                record["eval_loss"] = ev
                log.info("step %d: held-out loss %.4f", step, ev)
                if ev < best[1]:
                    best = (step, ev)
                    if on_best is not None:
                        on_best(step, ev)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if run_dir is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_state()
            if on_step is not None:
                on_step(record)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        if checkpointing:
            _set_checkpointing(model, False)
        model.eval()
    return TrainResult(step, tuple(losses), tuple(evals), best[0], None if best[0] is None else best[1], tokens,
                       time.time() - t0, peak_memory(device), n_trainable, resumed_from)


# ----------------------------------------------------------------------------------------------
# the job behind `lqkit finetune`


def check_low_rank(path: str | Path) -> dict:
    """The checkpoint's metadata; CheckpointError when no matrix has a low-rank part."""
    meta = checkpoint.read_meta(path)
    checkpoint.refuse_tables(meta, path, "lqkit finetune")
    plan = plan_from_json(meta["plan"])
    if not any(spec.rank for spec in plan.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} has no low-rank part (rank 0 in every layer), so there is "
                              "nothing to fine-tune; compress with a low-rank part, e.g. lqkit compress --method lq "
                              "--rank 16 ...")
    return meta


RUN_MARKERS = ("finetune.json", "log.jsonl", "resume", "best", "last", "peft")  # what a fine-tuning run folder holds


def _check_replaceable_run(out: Path, source: Path) -> None:
    """``--overwrite`` replaces only an earlier fine-tuning run: never the checkpoint being tuned, a
    folder holding it, or a folder of other files (nothing is deleted before this holds)."""
    if not out.exists():
        return
    o, s = out.resolve(), source.resolve()
    if o == s or o in s.parents or s in o.parents:
        raise CheckpointError(f"--out {str(out)!r} would replace the checkpoint being fine-tuned ({str(source)!r}) "
                              "or a folder holding it; choose another --out, e.g. runs/ft")
    others = [p.name for p in o.iterdir() if p.name not in RUN_MARKERS and not p.name.startswith(".")]
    if others or not any((o / m).exists() for m in RUN_MARKERS):
        raise CheckpointError(f"--out {str(out)!r} is not a fine-tuning run folder (it holds {others[:3] or 'nothing of a run'}); "
                              "--overwrite replaces only an earlier run: remove it yourself or choose another --out, "
                              f"e.g. --out {str(out).rstrip('/')}-2")


def finetune(path: str | Path, data: str | Path, out: str | Path, config: FinetuneConfig = FinetuneConfig(), *,
             resume: bool = False, overwrite: bool = False, export_peft: bool = False,
             device: str | None = None, progress: bool = True,
             on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune the low-rank part of the lqkit checkpoint ``path`` on ``data``; write the run to ``out``
    (see module docstring). Every input is checked before the model is loaded."""
    out = Path(out).expanduser()
    meta = check_low_rank(path)
    if resume:
        if not (out / "resume" / checkpoint.STATE_POINTER).exists():
            raise CheckpointError(f"{str(out)!r} holds no resumable state; run without --resume to start")
        outdir.claim_dir(out)  # one run at a time
    else:
        checkpoint.check_out_dir(out, overwrite)
        _check_replaceable_run(out, Path(path).expanduser())
    tok = load_tokenizer(str(path))
    packed = load_packed(data, tok, config.seq_len, fmt=config.data_format, on_bad_line=config.on_bad_line,
                         eval_fraction=config.eval_fraction, max_eval_sequences=config.max_eval_sequences)
    if not resume and out.exists():  # every input checked, and out is an earlier run's folder (above)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model = checkpoint.load(path, device=device or "cpu", prepare=False)  # trained: no inference snapshot
    plan = plan_from_json(meta["plan"])
    run = {"source": str(path), "data": str(data), "data_sha256": packed.sha256, "config": config.to_dict(),
           "sequences": packed.input_ids.shape[0], "eval_sequences": packed.eval_input_ids.shape[0],
           "skipped_lines": list(packed.skipped_lines)}

    def save(name: str, step: int, loss: float | None) -> None:
        extra = dict(meta.get("extra") or {}, finetune={**run, "step": step, "eval_loss": loss})
        checkpoint.save(model, tok, out / name, plan=plan, reports=meta.get("reports"), summary=meta.get("summary"),
                        extra=extra, overwrite=True)

    res = train(model, packed, config, run_dir=out, resume=resume, progress=progress, on_step=on_step,
                on_best=lambda step, loss: save("best", step, loss))
    save("last", res.steps, res.evals[-1][1] if res.evals else None)
    best = out / ("best" if res.best_step is not None and (out / "best").exists() else "last")
    peft_dir = None
    if export_peft:
        from .export import export_peft as _export

        peft_dir = str(_export(best, out / "peft", overwrite=True).out)
    result = FinetuneResult(str(out), str(best), str(out / "last"), peft_dir, res, run["sequences"],
                            run["eval_sequences"])
    tmp = out / ".finetune.json.tmp"
    tmp.write_text(json.dumps({**run, "result": result.to_dict()}, indent=1))
    os.replace(tmp, out / "finetune.json")
    return result


def format_result(r: FinetuneResult) -> str:
    t = r.train
    lines = [
        f"steps             {t.steps}" + (f" (resumed from {t.resumed_from})" if t.resumed_from is not None else ""),
        f"trainable params  {t.trainable_params / 1e6:.3f}M",
        f"train loss        {t.losses[0]:.4f} -> {t.losses[-1]:.4f}" if t.losses else "train loss        -",
    ]
    if t.evals:
        lines.append(f"held-out loss     {t.evals[0][1]:.4f} (step {t.evals[0][0]}) -> best {t.best_eval_loss:.4f} "
                     f"(step {t.best_step})")
    lines += [
        f"tokens            {t.tokens} in {t.seconds:.1f} s ({t.tokens / max(t.seconds, 1e-9):.0f} tokens/s)",
        f"peak memory       {t.peak_memory_bytes / 2**20:.0f} MiB",
        f"best checkpoint   {r.best}",
        f"last checkpoint   {r.last}",
    ]
    if r.peft:
        lines.append(f"PEFT export       {r.peft}")
    return "\n".join(lines)
