"""``make demo`` (``lqkit demo``): compress the default model to a memory budget and report the result.

Runs on google/gemma-3-270m: full-precision perplexity (cached after the first run; the first time in a
background process at the lowest priority, beside the compression), calibration
(16 x 512 tokens of the bundled WikiText-2 validation split; cached), the cost table of a compact
candidate set (cached), the integer program for the budget, compression with the chosen plan, save,
reload from disk and perplexity of the reloaded checkpoint, all under lqkit's fixed evaluation
protocol. Measured from a fresh clone (venv, model conversion, everything) on 2 otherwise idle CPU
cores: 11 min 11 s wall, perplexity 45.55 at 3.250 bits/param. The full candidate
set and 64 x 512 calibration tokens are `lqkit compress --budget`'s defaults.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time

from . import checkpoint, pipeline
from .allocate import AllocationConfig, Budget
from .calibrate import CalibConfig
from .core.costs import CandidateSet
from .data import read_text
from .evaluate import EvalProtocol, perplexity, tokenize
from .models import cache_dir, default_model_dir, load_model, resolve

log = logging.getLogger("lqkit.demo")

DEMO_BUDGET = 3.25  # bits per parameter, all stored bits counted (RTN/GPTQ 3-bit with groups of 128 are 3.25)
DEMO_CANDIDATES = CandidateSet(quantizers=("rtn", "nf", "gptq"), bits=(2, 3, 4, 8), group_sizes=(64, 128),
                               group_dims=("in",), ranks=(0, 16), outliers=(0.0,))
DEMO_CALIB = CalibConfig(samples=16, seqlen=512)


def _baseline_key(proto: EvalProtocol) -> dict:
    return {"model": resolve(None), "windows": proto.windows, "window_tokens": proto.window_tokens}


def _baseline_path():
    return cache_dir() / "baseline-gemma-3-270m.json"


def _cached_baseline(proto: EvalProtocol) -> dict | None:
    path = _baseline_path()
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == _baseline_key(proto):
            return cached["result"]
    return None


def baseline(proto: EvalProtocol, text: str, progress: bool = False, done=None) -> dict:
    """Full-precision perplexity of the default model, cached by model and protocol. ``done``: an
    event; once it is set, the evaluation goes on with every thread (see :func:`_background_baseline`)."""
    cached = _cached_baseline(proto)
    if cached is not None:
        return cached
    loaded = load_model(None)
    if done is not None:
        import torch

        forward, threads = loaded.model.forward, os.cpu_count() or 1

        def forward_then_widen(*a, **kw):
            if done.is_set() and torch.get_num_threads() < threads:
                torch.set_num_threads(threads)
            return forward(*a, **kw)

        loaded.model.forward = forward_then_widen
    r = perplexity(loaded.model, loaded.tokenizer, text, proto, progress=progress,
                   ids=tokenize(loaded.tokenizer, text)).to_dict()
    path = _baseline_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(path, json.dumps({"key": _baseline_key(proto), "result": r}).encode())
    return r


def _background_baseline(proto: EvalProtocol, text: str, done) -> None:
    """:func:`baseline` at the lowest CPU priority, on one thread until ``done`` is set (this process
    has nothing else to do), then on all: it takes the cycles that the compression leaves idle (a fifth of two cores
    on average: GPTQ's column loops, the solver, Python between kernels, ...) and the rest after it."""
    os.nice(19)
    import torch

    torch.set_num_threads(1)
    baseline(proto, text, done=done)


def run(out: str = "out/gemma-3-270m-budget", windows: int = 40, budget: float = DEMO_BUDGET) -> str:
    """Run the demo and return its report (a Markdown table and a few lines)."""
    t0 = time.time()
    proto = EvalProtocol(windows=windows, batch_size=4)
    text, _ = read_text(None)
    default_model_dir()  # converted once, before anything reads it
    side, ctx = None, multiprocessing.get_context("spawn")
    done = ctx.Event()
    if _cached_baseline(proto) is None:
        log.info("step 1/3: full-precision baseline, in a background process at low priority")
        side = ctx.Process(target=_background_baseline, args=(proto, text, done), daemon=True)
        side.start()
    log.info("step 2/3: calibrate, cost table, allocate %.2f bits/param, compress", budget)
    config = AllocationConfig(Budget(budget), DEMO_CANDIDATES)
    try:
        res = pipeline.compress(None, config, out, overwrite=True, calib=DEMO_CALIB)
    except BaseException:
        if side is not None:
            side.terminate()
        raise
    log.info("step 3/3: reload %s from disk and evaluate", out)
    comp = pipeline.evaluate(out, proto)
    done.set()
    if side is not None:
        log.info("step 1/3: waiting for the background baseline")
        side.join()
    base = baseline(proto, text, progress=True)  # cached by the background process (computed here if it failed)
    size_mib = checkpoint.read_meta(out)["files"][checkpoint.TENSOR_FILE]["bytes"] / 2**20
    s, a = res.summary, res.allocation
    kinds = {}
    for spec in res.plan.values():
        key = f"{spec.quant.method}{spec.quant.bits}/g{spec.quant.group_size}" + (f"+r{spec.rank}" if spec.rank else "")
        kinds[key] = kinds.get(key, 0) + 1
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    table = "cached" if a["table_cached"] else f"{a['table_seconds']:.0f} s"
    return "\n".join([
        "",
        f"google/gemma-3-270m, WikiText-2 test, {proto.windows} windows x {proto.window_tokens} tokens "
        "(fixed protocol, fp32, CPU)",
        "",
        "| model | linear-layer bits/param | linear layers (MiB) | perplexity |",
        "|---|---|---|---|",
        f"| full precision (fp32) | 32 | {s.compressed_params * 4 / 2**20:.1f} | {base['perplexity']:.2f} |",
        f"| lqkit, budget {budget:g} bits/param | {s.effective_bits:.3f} | {s.compressed_bits / 8 / 2**20:.1f} "
        f"| {comp['perplexity']:.2f} |",
        "",
        f"plan: {mix}",
        f"solver: {a['solver_status']} ({a['variables']} candidates); cost table {table}",
        f"checkpoint: {out} ({size_mib:.0f} MiB on disk, embeddings kept in fp32; plan drawn in {out}/plan.png); "
        f"compression {res.seconds:.0f} s; total {time.time() - t0:.0f} s",
        f"next: lqkit inspect {out}    lqkit eval {out} --json",
    ])
