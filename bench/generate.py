"""Generation speed where users meet it: transformers ``generate()`` on a bf16 model and on lqkit checkpoints of it.

One script, no downloads: a random-initialised Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32
layers, 32 heads, vocab 32000; ``--shape llama3-8b``: MLP 14336, 8 key/value heads, vocab 128256) is
built on the GPU in bf16 and saved as a user's model folder
(safetensors, with a small BPE tokenizer trained on the bundled WikiText-2 text), or ``--model DIR``
is used; each row is that folder itself (bf16, loaded by transformers) or an lqkit checkpoint of it
made by ``lqkit.pipeline.compress`` (data-free: rtn 4-bit g128, rtn 3-bit g128, rtn 3-bit g128 + a
rank-16 LoRC factor pair) or, for the budget rows, by the command a user runs (``lqkit compress --model MODEL
--budget 3.0 [--target lqkit-gpu]``: calibration, cost table and integer program; the row records the plan's
mix of formats) and loaded by ``lqkit.checkpoint.load(..., dtype=bf16, device="cuda")``
(which prepares it: kernel layouts, stacked q/k/v and gate/up, one-token calls bound). Every row is
then driven by the same code: ``model.generate(ids, max_new_tokens=N, min_new_tokens=N,
do_sample=False)`` from a P-token prompt (random token ids, the same for every row), eager (dynamic
cache) and compiled (transformers' recipe: ``cache_implementation="static"`` and a ``compile_config``
— torch.compile of the decoding step, fullgraph, mode "reduce-overhead", i.e. CUDA graphs), at each
batch size; one untimed call warms up (compiles, records the graphs), then the median of ``--reps``
timed calls. ``--modes loop``: lqkit's compiled greedy loop (``lqkit generate --compile``: the prompt's
forward and the one-token step compiled); ``loop-eager-prefill``: the same with the prompt's forward
eager, as the loop ran until 2026-12-06. ``--modes eager-interleaved``: every row loaded at once (the
7B-shaped bf16 model and four rtn rows take about 27 GB) and their eager calls made in turn,
``--rounds`` rounds, so that a host whose speed drifts between calls (eager decoding is host-bound)
slows every row alike; ``vs_bf16_paired`` is the median over rounds of bf16's seconds over the row's in
the same round (also recorded: the ratio of the fastest calls, ``vs_bf16_best``, and of the calls'
thread CPU time, ``vs_bf16_cpu``). tokens/s = batch x N /
seconds of a generate() call (prefill included). The bandwidth fraction of a decoding step = (bytes
of every weight a step reads / measured copy bandwidth) / (seconds / N), the KV cache not counted.
Each lqkit row of the eager, compiled and loop modes records the one-token launch configuration of each
distinct kernel call (``launches_1token``: tuned or the default; untuned rows drop the process's earlier
tuned choices first). Rows, batches and modes are selectable, checkpoints and the built model are
reused from ``--work`` when present, a failing row is recorded and the next one runs. ``--tiny``: a
2-layer tiny llama on the CPU (torch path), to check the script's logic.

Every phase prints a line with the seconds since the start (a stack dump follows when nothing is
printed for 180 s). Rows already in ``--out`` for the same model shape are kept unless re-run, so the
table can be filled by several shorter invocations (``--rows``, ``--batches``, ``--modes``) that
share ``--work``. Where the time goes (not yet measured on a GPU; the script prints each): building
and saving the bf16 folder once; ``pipeline.compress`` per lqkit row (it loads the model in fp32 on
the CPU); loading (an lqkit row's first kernel compilations included); a torch.compile per row and
batch size (the static cache's shape is part of the graph); then seconds per timed call.

Usage (H200): PYTHONPATH=src python bench/generate.py --out bench/results/generate-h200.json
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, machine_info, plan_mix, write_json  # noqa: E402
from lqkit.core import MatrixSpec, QuantSpec  # noqa: E402
from lqkit.core.rotation import Rotation  # noqa: E402
from synth import SHAPES as BUILT, VOCAB  # noqa: E402

@dataclass(frozen=True)
class BudgetRow:
    """A checkpoint made as a user makes one under a budget: ``lqkit compress --model MODEL --budget BITS *args``."""

    bits: float
    args: tuple[str, ...] = ()

    def label(self) -> str:
        return " ".join((f"--budget {self.bits:g}",) + self.args)


ROWS = {  # name -> spec of every decoder linear, or a budget run (None: the bf16 model itself)
    "bf16": None,
    "rtn4": MatrixSpec("quant", QuantSpec("rtn", 4, 128)),
    "rtn3": MatrixSpec("quant", QuantSpec("rtn", 3, 128)),
    "rtn3-r16": MatrixSpec("lorc", QuantSpec("rtn", 3, 128), rank=16),
    # every matrix's input rotated (blocks of 256: they divide 4096 and 11008): a launch of its own
    # before each rotated call (one per stack). generate-h100-32layers-eager-rot.json (2026-12-05
    # 12:31) predates this: the GEMV rotated inside its own launch then
    "rtn4-rot256": MatrixSpec("quant", QuantSpec("rtn", 4, 128), rotation=Rotation(1, 256)),
    # the issue's budget row: default candidates (codebooks, outliers, groups along out may be chosen),
    # and the same budget kept to what the fragment GEMV reads, q/k/v and gate/up tied (stackable)
    "budget3": BudgetRow(3.0),
    "budget3-gpu": BudgetRow(3.0, ("--target", "lqkit-gpu")),
}
SHAPES = {n: {"vocab_size": VOCAB, **BUILT[n]} for n in ("llama2-7b", "llama3-8b")}  # what --shape builds
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# the model folder


def build_model(out: Path, shape: dict, layers: int, device: str) -> Path:
    """A random-initialised Llama of ``shape`` (bench/synth.py) in bf16 (fp32 on the CPU), built on
    ``device`` and saved to ``out``; reused when ``out`` already holds it."""
    from synth import build

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        log(f"model folder {out} exists: reused")
        return out
    t = time.time()
    build(shape, layers, out, device, vocab=shape["vocab_size"])
    gc.collect()
    log(f"random {layers}-layer model built on {device} and saved to {out} ({time.time() - t:.1f} s)")
    return out


# ----------------------------------------------------------------------------------------------
# rows


def checkpoint_for(name: str, spec, model_dir: Path, work: Path, device: str, fresh: bool) -> Path:
    """The lqkit checkpoint of ``model_dir`` under ``spec`` (a MatrixSpec: pipeline.compress; a
    BudgetRow: the CLI), reused when present."""
    from lqkit import checkpoint, pipeline
    from lqkit.plan import plan_from_json

    out = work / f"ck-{name}"
    if isinstance(spec, BudgetRow):
        return budget_checkpoint(name, spec, model_dir, out, device, fresh)
    if not fresh and checkpoint.is_checkpoint(out):
        meta = checkpoint.read_meta(out)
        same = (meta.get("extra") or {}).get("source_model") == str(model_dir)
        if same and {s.label() for s in plan_from_json(meta["plan"]).values()} == {spec.label()}:
            log(f"{name}: checkpoint {out} exists: reused")
            return out
    t = time.time()
    res = pipeline.compress(str(model_dir), spec, str(out), overwrite=True, device=device if device == "cuda" else None,
                            progress=False)
    log(f"{name}: compressed with pipeline.compress in {time.time() - t:.1f} s ({len(res.plan)} matrices, "
        f"{res.summary.effective_bits:.3f} bits/param) -> {out}")
    return out


def budget_checkpoint(name: str, row: BudgetRow, model_dir: Path, out: Path, device: str, fresh: bool) -> Path:
    """``lqkit compress --model MODEL --budget BITS ...`` in a child process, as a user runs it (its
    progress bars go to this script's stderr, its summary to stdout; this script's watchdog is off
    meanwhile); reused when ``out`` holds a checkpoint the same command made (recorded beside it in
    ``<out>.row.json``)."""
    from lqkit import checkpoint

    stamp = out.parent / f"{out.name}.row.json"
    want = {"source_model": str(model_dir), "command": row.label()}
    if not fresh and checkpoint.is_checkpoint(out) and stamp.exists() and json.loads(stamp.read_text()) == want:
        log(f"{name}: checkpoint {out} exists: reused")
        return out
    cmd = [sys.executable, "-m", "lqkit", "compress", "--model", str(model_dir), "--budget", f"{row.bits:g}", *row.args,
           "--out", str(out), "--overwrite"] + (["--device", "cpu"] if device == "cpu" else [])
    log(f"{name}: {' '.join(cmd[1:])}")
    t = time.time()
    paths = [str(Path(__file__).resolve().parents[1] / "src"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    faulthandler.cancel_dump_traceback_later()  # the child shows its own progress (log() arms it again)
    subprocess.run(cmd, check=True, env=env)
    stamp.write_text(json.dumps(want))
    log(f"{name}: compressed in {time.time() - t:.1f} s -> {out}")
    return out


def load_row(name: str, path: Path, device: str, tune: bool = False):
    """(model, seconds): bf16 through transformers, lqkit checkpoints through lqkit.checkpoint.load
    (``tune``: with the one-token launch configurations timed on this GPU, ``load(tune=True)``)."""
    from lqkit import checkpoint

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = time.time()
    if ROWS[name] is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device).eval()
    else:
        if not tune and device == "cuda":  # launch choices are per process: an untuned row must not inherit
            from lqkit.kernels import _triton  # a tuned row's (triton: the GPU extra)

            _triton.forget_tuned()
        model = checkpoint.load(path, dtype=dtype, device=device, tune=tune)
    sync(device)
    return model, time.time() - t


def weight_bytes(model) -> int:
    """Bytes of every weight one decoding step reads: all parameters and buffers (packed codes, scales,
    factors of the compressed layers as stored) except the input embedding table, of which a step reads
    a row per sequence (counted when it is tied to the output head); shared tensors once."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    skip = set() if head is not None and head.weight is emb else {emb.data_ptr()}
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.data_ptr() in seen or t.data_ptr() in skip:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def prepared_info(model) -> dict:
    from lqkit.nn import compressed_modules

    mods = compressed_modules(model).values()
    return {"compressed_layers": len(mods), "kernel_layers": sum(m._runner is not None for m in mods),
            "stacks": len({id(m._group) for m in mods if m._group is not None})}


def launches(model) -> dict:
    """The one-token launch configuration each distinct kernel call of ``model`` takes now, by layer
    shape and format: ``tuned`` (timed by load(tune=True) or read from its table) or the default."""
    from dataclasses import asdict

    from lqkit.nn import compressed_modules
    from lqkit.nn.inference import _compute_dtype

    runners = {id(m._runner): m._runner for m in compressed_modules(model).values() if m._runner is not None}
    if not runners:  # no kernel calls (bf16, or the torch path on a CPU): nothing to import triton for
        return {}
    from lqkit.kernels import _triton

    dtype = _compute_dtype(model)
    out = {}
    for run in runners.values():
        rank = run.L.shape[1] if run.L is not None and run.R is not None else 0
        tuned = _triton.tuned_choice(run.kw, 1, rank > 0, dtype) is not None
        name = f"{run.n}x{run.k} {run.kw.spec.label()}" + (f" rank {rank}" if rank else "")
        out[name] = {"tuned": tuned, **asdict(_triton.chosen_config(run.kw, 1, rank > 0, dtype))}
    return out


def kernel_check(model, device: str) -> float | None:
    """Largest relative error of the prepared layers of block 0 against deq(Q) + L·R in fp32, at 1, 16
    and 128 tokens (the kernel path as loaded; None without compressed layers)."""
    from lqkit.nn import compressed_modules

    mods = [m for n, m in compressed_modules(model).items() if ".0." in n]
    if not mods:
        return None
    g = torch.Generator(device=device).manual_seed(0)
    worst = 0.0
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for m in (1, 16, 128):
            xs = {k: torch.randn(m, k, device=device, generator=g).to(dtype) for k in {d.in_features for d in mods}}
            for mod in mods:  # one input per width: stacked layers all take theirs (nothing left pending)
                x = xs[mod.in_features]
                ref = x.float() @ mod.merged_weight().t() + (mod.bias.float() if mod.bias is not None else 0)
                y = mod(x).float()
                worst = max(worst, float((y - ref).norm() / ref.norm()))
    return worst


KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins
    ("lqkit", ("_frag_kernel", "_gemv_kernel", "_mma_kernel", "_gemm_kernel", "_dequant_kernel", "_sparse_add")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("gemm", ("gemm", "gemv", "nvjet", "sm90_xmma", "cutlass", "splitk", "dot_kernel")),
    ("inductor", ("triton_",)),
    ("copy/fill", ("copy", "memcpy", "memset", "fill", "cat")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((k for k, subs in KERNEL_KINDS if any(s in low for s in subs)), "other")


def profile_generate(once, new: int) -> dict:
    """One generate() call under torch.profiler: wall seconds, GPU kernel time (sum of the kernels'
    durations, one stream) per new token and by kind, and the top kernels. Wall minus kernel time is what
    the GPU waits on the host (generate's Python loop, launches, synchronisations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = once()
    by_name: dict[str, list[float]] = {}
    steps: list[float] = []  # end of each step's argmax kernel (µs): one per generated token
    first = None
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.device_time_total > 0:
            v = by_name.setdefault(e.name, [0.0, 0])
            v[0] += e.device_time_total / 1e3  # ms
            v[1] += 1
            first = e.time_range.start if first is None else min(first, e.time_range.start)
            if "ArgMax" in e.name:
                steps.append(e.time_range.end)
    kinds: dict[str, float] = {}
    for name, (ms, _) in by_name.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    gpu_ms = sum(kinds.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    steps.sort()
    gaps = [(b - a) / 1e3 for a, b in zip(steps, steps[1:])]
    cpu = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return {"wall_s": round(wall, 4), "gpu_kernel_ms": round(gpu_ms, 2),
            "gpu_ms_per_token": round(gpu_ms / new, 4), "wall_ms_per_token": round(wall * 1e3 / new, 4),
            "gpu_busy_fraction": round(gpu_ms / (wall * 1e3), 3),
            "prefill_ms": round((steps[0] - first) / 1e3, 3) if steps and first is not None else None,
            "step_ms_median": round(statistics.median(gaps), 4) if gaps else None,
            "step_ms_min": round(min(gaps), 4) if gaps else None,
            "ms_per_token_by_kind": {k: round(v / new, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:120], "ms": round(ms, 2), "calls": c} for n, (ms, c) in top],
            "top_cpu_self": [{"name": e.key[:100], "ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
                             for e in cpu[:20]]}


LOOPS = {"loop": True, "loop-eager-prefill": False}  # lqkit's greedy loop: mode -> the prompt's forward compiled


def time_generate(model, ids: torch.Tensor, mode: str, new: int, reps: int, device: str, backend: str,
                  profile: bool = False) -> dict:
    from transformers import CompileConfig

    kw = greedy_kwargs(new)
    if mode == "compiled":
        cc = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                           mode="reduce-overhead" if device == "cuda" and backend == "inductor" else "default")
        cc._compile_all_devices = True  # also on the CPU (--tiny)
        kw.update(cache_implementation="static", compile_config=cc)
    mask = torch.ones_like(ids)

    def once(args: dict = kw) -> tuple[float, torch.Tensor]:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            if mode in LOOPS:  # lqkit's decoding loop (lqkit generate --compile)
                from lqkit.generate import greedy_loop

                out = greedy_loop(model, ids, new, backend=backend, compile_prefill=LOOPS[mode])
            else:
                out = model.generate(input_ids=ids, attention_mask=mask, **args)
        sync(device)
        return time.perf_counter() - t, out

    if mode == "compiled" or mode in LOOPS:  # the full length: the static cache's size is part of the compiled graph
        warm, _ = once()
    else:  # binds the kernel calls of the prefill and of one decoding step
        warm, _ = once(dict(kw, max_new_tokens=2, min_new_tokens=2))
    log(f"    warm-up {warm:.1f} s" + (" (compiles" + (", records CUDA graphs)" if device == "cuda" else ")")
                                      if mode != "eager" else ""))
    times = []
    for i in range(reps):
        s, out = once()
        if out.shape[1] != ids.shape[1] + new:
            raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens instead of {new}")
        times.append(s)
        log(f"    run {i + 1}/{reps}: {s:.3f} s ({ids.shape[0] * new / s:.1f} tokens/s)")
    t = statistics.median(times)
    prof = None
    if profile and device == "cuda":
        prof = profile_generate(once, new)
        log(f"    profiled: {prof['wall_ms_per_token']} ms/token wall, {prof['gpu_ms_per_token']} ms/token of kernels, "
            f"step {prof['step_ms_median']} ms (median), prefill {prof['prefill_ms']} ms "
            f"{prof['ms_per_token_by_kind']}")
    return {**({"profile": prof} if prof else {}), "mode": mode, "batch": ids.shape[0],
            "prompt_tokens": ids.shape[1], "new_tokens": new,
            "seconds": round(t, 4), "times": [round(s, 4) for s in times], "warmup_seconds": round(warm, 2),
            "tokens_per_s": round(ids.shape[0] * new / t, 1), "ms_per_token": round(t / new * 1e3, 3),
            "tokens": out[0, ids.shape[1]:ids.shape[1] + 8].tolist()}


def greedy_kwargs(new: int) -> dict:
    """``generate()``'s arguments for exactly ``new`` greedy tokens (every row and mode)."""
    return dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def eager_call(model, ids: torch.Tensor, new: int, device: str) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one eager ``generate()`` call of ``new`` tokens
    (greedy, dynamic cache). The CPU time is the host work of the call, less the time the thread was
    not running (another tenant's, the scheduler's); it includes the waits at the call's syncs when the
    CUDA runtime spins in them."""
    sync(device)
    t, c = time.perf_counter(), time.thread_time()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **greedy_kwargs(new))
    sync(device)
    wall, cpu = time.perf_counter() - t, time.thread_time() - c
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens instead of {new}")
    return wall, cpu


def eager_seconds(model, ids: torch.Tensor, new: int, device: str) -> float:
    """Seconds of one eager ``generate()`` call of ``new`` tokens (greedy, dynamic cache)."""
    return eager_call(model, ids, new, device)[0]


def eager_interleaved(models: dict, ids: torch.Tensor, new: int, rounds: int, device: str) -> dict:
    """Eager ``generate()`` of every loaded row in turn, ``rounds`` times (after one untimed call of
    the same length each; each round starts one row further on): a host that speeds up or slows down
    between calls does so for every row alike. Per row: the calls' seconds and thread CPU seconds
    (:func:`eager_call`), their medians, and against bf16: the median over rounds of the paired ratio
    (``vs_bf16_paired``), the ratio of the fastest calls (``vs_bf16_best``: interference only adds
    time) and the paired ratio of CPU time (``vs_bf16_cpu``: the host work of a call)."""
    for model in models.values():
        # full length: after a 2-token warm-up, bf16's first timed 128-token call on an H100 took 10.6 s
        # (batch 1) and 13.6 s (batch 8) against 3.5-4.8 s later (generate-h100-32layers-eager-interleaved.json)
        eager_seconds(model, ids, new, device)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            wall, cpu = eager_call(models[name], ids, new, device)
            times[name].append(wall)
            cpus[name].append(cpu)
        rates = ", ".join(f"{n} {ids.shape[0] * new / t[-1]:.1f}" for n, t in times.items())
        log(f"    round {i + 1}/{rounds}: {rates} tokens/s")
    out = {}
    for name, ts in times.items():
        t, cs = statistics.median(ts), cpus[name]
        r = {"mode": "eager-interleaved", "batch": ids.shape[0], "prompt_tokens": ids.shape[1], "new_tokens": new,
             "rounds": rounds, "seconds": round(t, 4), "times": [round(x, 4) for x in ts],
             "cpu_seconds": [round(x, 4) for x in cs], "cpu_ms_per_token": round(statistics.median(cs) / new * 1e3, 3),
             "tokens_per_s": round(ids.shape[0] * new / t, 1), "ms_per_token": round(t / new * 1e3, 3)}
        if "bf16" in times:
            r["vs_bf16_paired"] = round(statistics.median(b / x for b, x in zip(times["bf16"], ts)), 3)
            r["vs_bf16_best"] = round(min(times["bf16"]) / min(ts), 3)
            r["vs_bf16_cpu"] = round(statistics.median(b / x for b, x in zip(cpus["bf16"], cs)), 3)
        out[name] = r
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second (GB/s), median of 20 copies."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    ts = []
    for _ in range(23):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * n / statistics.median(ts[3:]) / 1e9


# ----------------------------------------------------------------------------------------------


def run_interleaved(rows: list, model_dir: Path, work: Path, device: str, args, prompts, batches, result: dict,
                    out: Path) -> None:
    """The eager-interleaved mode: every row (untuned) loaded at once, then :func:`eager_interleaved` at
    each batch size; rows appended to ``result`` and written to ``out``."""
    log("== eager-interleaved: " + ", ".join(rows))
    models, paths, mixes = {}, {}, {}
    for name in rows:  # every checkpoint first (a budget row's compression needs the GPU to itself)
        try:
            paths[name] = model_dir if ROWS[name] is None else checkpoint_for(name, ROWS[name], model_dir, work,
                                                                              device, args.fresh)
            if isinstance(ROWS[name], BudgetRow):
                mixes[name] = {"plan_mix": plan_mix(paths[name])}
        except Exception as e:  # recorded; the other rows run
            traceback.print_exc()
            result["rows"].append({"row": name, "mode": "eager-interleaved", "error": f"{type(e).__name__}: {e}"[:800]})
    for name, path in paths.items():
        try:
            models[name], load_s = load_row(name, path, device)
            log(f"  {name}: loaded in {load_s:.1f} s")
        except Exception as e:  # recorded; the other rows run
            traceback.print_exc()
            result["rows"].append({"row": name, "mode": "eager-interleaved", "error": f"{type(e).__name__}: {e}"[:800]})
    for b in batches:
        try:
            res = eager_interleaved(models, prompts[:b].to(device), args.new, args.rounds, device)
        except Exception as e:
            traceback.print_exc()
            res = {name: {"mode": "eager-interleaved", "batch": b, "error": f"{type(e).__name__}: {e}"[:800]}
                   for name in models}
        for name, r in res.items():  # (earlier runs' rows of these rows, batches and mode: dropped in main)
            result["rows"].append({"row": name, "spec": ROWS[name].label() if ROWS[name] else "bf16",
                                   **mixes.get(name, {}), **r})
            if "tokens_per_s" in r:
                log(f"  {name} batch {b} eager-interleaved: {r['tokens_per_s']} tokens/s"
                    + (f", {r['vs_bf16_paired']}x bf16 (paired by round; fastest calls {r['vs_bf16_best']}x, "
                       f"CPU time {r['vs_bf16_cpu']}x)" if "vs_bf16_paired" in r else ""))
        write_json(out, result)
    del models
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="bench/results/generate-h200.json", help="result JSON")
    ap.add_argument("--model", default=None, help="an existing bf16 HF model folder (default: build one)")
    ap.add_argument("--work", default="/tmp/lqkit-generate", help="where the built model and checkpoints go")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b",
                    help="the built model's shape (default llama2-7b; ignored with --model or --tiny)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the built model (default 32)")
    ap.add_argument("--rows", default=",".join(n for n, r in ROWS.items() if not isinstance(r, BudgetRow)),
                    help=f"comma-separated rows of {', '.join(ROWS)} (default: all but the budget rows, whose "
                         "compression takes about 20 min each on the 7B shape)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--modes", default="eager,compiled,loop",
                    help="of eager, compiled (generate() with a static cache and compile_config), loop (lqkit's "
                         "compiled greedy loop, lqkit.generate.greedy_loop; loop-eager-prefill: the same with the "
                         "prompt's forward eager) and eager-interleaved (every row loaded at once, eager calls of "
                         "the rows in turn, --rounds times: for hosts whose speed drifts); "
                         "default the first three")
    ap.add_argument("--tune", default="off", choices=("off", "on", "both"),
                    help="lqkit rows loaded with load(tune=True) (row name + '+tuned'), without, or both (default off)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens per call (default 128)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per measurement, median (default 3)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds of eager-interleaved (default 9)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny aot_eager)")
    ap.add_argument("--fresh", action="store_true", help="rebuild the model folder's checkpoints even if present")
    ap.add_argument("--fresh-results", action="store_true",
                    help="start --out afresh (default: rows of earlier runs of the same shape are kept unless re-run)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, one more call under torch.profiler: kernel time per token by kind, top kernels")
    ap.add_argument("--tiny", action="store_true", help="2-layer tiny llama on the CPU: checks the script's logic")
    args = ap.parse_args()

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny to check the script on the CPU")
    backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in ("eager", "compiled", "eager-interleaved", *LOOPS)]
    if unknown:
        sys.exit(f"unknown modes {unknown}; choose from eager, compiled, {', '.join(LOOPS)}, eager-interleaved")
    interleave = "eager-interleaved" in modes
    tunes = {"off": (False,), "on": (True,), "both": (False, True)}[args.tune]
    runs = [(n, t) for n in rows for t in ((False,) if ROWS[n] is None else tunes)]  # (row, tuned) per load
    modes = [m for m in modes if m != "eager-interleaved"]
    work = Path(args.work) / ("tiny" if args.tiny else f"{args.shape}-L{args.layers}")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    info = machine_info()
    if device == "cuda":
        import triton

        info["triton"] = triton.__version__
    info["lqkit_env"] = {k: v for k, v in os.environ.items() if k.startswith("LQKIT_")}  # e.g. LQKIT_PDL
    log(f"machine: {info}")
    shape = TINY if args.tiny else SHAPES[args.shape]
    shape_info = {**shape, "layers": TINY["num_hidden_layers"] if args.tiny else args.layers}
    result = {"env": info, "args": vars(args), "shape": shape_info,
              "notes": "random weights (speed only; the text is meaningless); tokens/s = batch x new tokens / "
                       "seconds of one generate() call (prefill included), median of reps after one warm-up; "
                       "compiled = static cache + generate's compile_config (fullgraph, reduce-overhead); "
                       "bandwidth_fraction = weight bytes per step / copy bandwidth / (seconds / new tokens), "
                       "the KV cache not counted.", "rows": []}
    if out.exists() and not args.fresh_results:  # keep earlier invocations' rows of the same model shape
        old = json.loads(out.read_text())
        if old.get("shape") == shape_info:
            rerun = {(n + ("+tuned" if t else ""), m) for n, t in runs for m in modes}
            rerun |= {(n, "eager-interleaved") for n in rows} if interleave else set()  # (always untuned)
            result["rows"] = [r for r in old.get("rows", []) if (r.get("row"), r.get("mode")) not in rerun
                              or r.get("batch", batches[0]) not in batches]
            result["earlier"] = old.get("earlier", []) + [{"env": old.get("env"), "args": old.get("args")}]
    layers = TINY["num_hidden_layers"] if args.tiny else args.layers
    model_dir = Path(args.model) if args.model else build_model(work / "bf16", shape, layers, device)
    if device == "cuda":
        bw = copy_bandwidth()
        result["copy_bandwidth_gb_s"] = round(bw, 1)
        log(f"copy bandwidth {bw:.0f} GB/s (read + write)")
    else:
        bw = None
    g = torch.Generator().manual_seed(0)
    vocab = min(1000, shape["vocab_size"])  # ids the tokenizer has (every row gets the same prompts)
    prompts = torch.randint(4, vocab, (max(batches), args.prompt), generator=g)

    for name, tune in runs if modes else []:
        label = name + ("+tuned" if tune else "")
        log(f"== {label}")
        try:
            path = model_dir if ROWS[name] is None else checkpoint_for(name, ROWS[name], model_dir, work, device,
                                                                        args.fresh)
            model, load_s = load_row(name, path, device, tune)
            wb = weight_bytes(model)
            info_row = {"row": label, "tuned": tune, "spec": ROWS[name].label() if ROWS[name] else "bf16",
                        "path": str(path),
                        **({"plan_mix": plan_mix(path)} if isinstance(ROWS[name], BudgetRow) else {}),
                        "load_seconds": round(load_s, 1), "weight_bytes": wb, **prepared_info(model),
                        "launches_1token": launches(model)}
            err = kernel_check(model, device)
            info_row["layer_rel_err"] = err
            log(f"{name}: loaded in {load_s:.1f} s; {wb / 1e6:.1f} MB of weights per step; {prepared_info(model)}"
                + (f"; block-0 layers vs deq(Q)+LR: rel. err {err:.2e}" if err is not None else ""))
        except Exception as e:
            traceback.print_exc()
            result["rows"].append({"row": label, "error": f"{type(e).__name__}: {e}"[:800]})
            write_json(out, result)
            continue
        for b in batches:
            for mode in modes:
                log(f"  {name} batch {b} {mode}")
                r = dict(info_row)
                try:
                    r.update(time_generate(model, prompts[:b].to(device), mode, args.new, args.reps, device, backend,
                                           args.profile))
                    if bw:
                        r["copy_bandwidth_gb_s"] = round(bw, 1)
                        floor = wb / (bw * 1e9)
                        r["floor_ms_per_step"] = round(floor * 1e3, 3)
                        r["bandwidth_fraction"] = round(floor / (r["seconds"] / args.new), 3)
                    log(f"  {name} batch {b} {mode}: {r['tokens_per_s']} tokens/s, {r['ms_per_token']} ms/token"
                        + (f", {r['bandwidth_fraction']:.0%} of the bandwidth floor" if bw else ""))
                except Exception as e:
                    traceback.print_exc()
                    r["error"] = f"{type(e).__name__}: {e}"[:800]
                result["rows"].append(r)
                write_json(out, result)
        del model
        gc.collect()
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()

    if interleave:
        run_interleaved(rows, model_dir, work, device, args, prompts, batches, result, out)

    base = {(r["batch"], r["mode"]): r["tokens_per_s"] for r in result["rows"]
            if r["row"] == "bf16" and "tokens_per_s" in r}
    for r in result["rows"]:
        b = base.get((r.get("batch"), r.get("mode")))
        if b and "tokens_per_s" in r:
            r["vs_bf16"] = round(r["tokens_per_s"] / b, 2)
    write_json(out, result)
    log(f"wrote {out}")
    print("| row | mode | batch | tokens/s | ms/token | x bf16 | bandwidth fraction |\n|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "tokens_per_s" in r:
            print(f"| {r['row']} | {r['mode']} | {r['batch']} | {r['tokens_per_s']} | {r['ms_per_token']} | "
                  f"{r.get('vs_bf16', '-')} | {r.get('bandwidth_fraction', '-')} |")
        else:
            print(f"| {r['row']} | {r.get('mode', '-')} | {r.get('batch', '-')} | error: {r['error'][:80]} | | | |")


if __name__ == "__main__":
    main()
