"""End-to-end jobs behind the CLI: compress → save, load → evaluate, inspect."""

from __future__ import annotations

import collections
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from . import blockwise, checkpoint
from .allocate import (AllocationConfig, CostTable, allocate, check_reachable, cost_table, groups_by_identity,
                       input_groups, model_scope)
from .calibrate import CalibConfig, CalibrationStats, calibrate as _calibrate, calibration_ids, fast_autocast_dtype
from .compress import MatrixReport, SizeSummary, check_stats, compress_model, full_fisher, needed_stats, size_summary
from .core import embed
from .core.decompose import MatrixSpec
from .core.embed import RowSpec
from .core.quant import QuantSpec
from .data import DEFAULT_CALIB_TEXT, read_text
from .dist import SINGLE, Group, default_device
from .errors import CheckpointError, SpecError
from .evaluate import EvalProtocol, EvalResult, perplexity, tokenize, window_starts
from .models import load_model, load_tokenizer
from .nn.embedding import build_tables
from .nn.surgery import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, check_plan, find_linears
from .outdir import check_free_space
from .plan import Plan, no_layer_matches, plan_to_json, uniform_plan
from .stream import open_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressResult:
    out: str
    source: str
    plan: Plan
    reports: dict[str, MatrixReport]
    summary: SizeSummary
    seconds: float
    eval: EvalResult | None
    allocation: dict | None = None  # AllocationResult.report() when the plan came from a budget
    stage_seconds: dict | None = None  # wall time of each stage (open, calibrate, cost_table, solve, compress, save, eval)
    distill: dict | None = None  # the distillation report, when distilled after compressing (lqkit.distill)


def _first_plan(model, spec: MatrixSpec | Plan | AllocationConfig, include, exclude,
                stored: torch.dtype | None = None) -> Plan:
    """The plan a compression starts from (checked against the model): one spec for every selected
    linear, the given plan, or for a budget the selected linears (their specs come from the solve).
    ``stored``: the dtype the model's other tensors are stored in (for a whole-model budget)."""
    config = spec if isinstance(spec, AllocationConfig) else None
    if config is not None:
        spec = MatrixSpec("quant", QuantSpec())
    plan = uniform_plan(model, spec, include or DEFAULT_INCLUDE, exclude or DEFAULT_EXCLUDE) \
        if isinstance(spec, MatrixSpec) else dict(spec)
    check_plan(model, plan)
    if config is not None:  # a budget no candidate can reach: said now, not after calibration and costs
        scope = model_scope(model, list(plan), stored) if config.budget.scope == "model" else None
        if scope is not None:
            for name, shape in zip(scope.tables, scope.shapes):
                for s in config.tables.specs():
                    s.check_shape(shape, name)
        check_reachable(config, {n: tuple(model.get_submodule(n).weight.shape) for n in plan}, scope)
    return plan


def _eval_ids(tokenizer, text: str | None, protocol: EvalProtocol | None) -> torch.Tensor | None:
    """The evaluation text's token ids, checked long enough for ``protocol`` now, not after the work."""
    if not protocol:
        return None
    ids = tokenize(tokenizer, text)
    window_starts(ids.numel(), protocol)
    return ids


def limit_gpu_memory(device: str | None, nbytes: int) -> None:
    """Hold this process to ``nbytes`` of its GPU (``device``, default the current CUDA device): PyTorch
    raises out-of-memory rather than take more, and lqkit sizes its GPU work (GPTQ stacks) to what is
    left under the limit, as on a GPU of that size."""
    if nbytes <= 0:
        raise SpecError(f"--max-gpu-memory must be positive, e.g. 40GB; got {nbytes} bytes")
    dev = torch.device(default_device(device))
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise SpecError(f"--max-gpu-memory limits a CUDA GPU's memory, but this run is on {dev.type} "
                        f"(CUDA available: {torch.cuda.is_available()}); drop it or give --device cuda")
    if dev.index is None:  # "cuda": set_per_process_memory_fraction wants an index
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    if nbytes < total:
        torch.cuda.set_per_process_memory_fraction(nbytes / total, dev)
    log.info("GPU memory held to %.1f GiB of %s's %.1f GiB", min(nbytes, total) / 2**30, dev, total / 2**30)


def compress(model: str | None, spec: MatrixSpec | Plan | AllocationConfig, out: str, *, overwrite: bool = False,
             include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
             device: str | None = None, eval_protocol: EvalProtocol | None = None,
             eval_text: str | None = None, progress: bool = True, calib: CalibConfig | None = None,
             calib_text: str | None = None, stats_path: str | None = None, sequential: bool = True,
             group: Group | None = None, dtype: torch.dtype | None = None,
             max_shard_bytes: int = checkpoint.MAX_SHARD_BYTES, distill=None) -> CompressResult:
    """Compress ``model`` (a folder, Hub id, or None for the default model) and write a checkpoint to
    ``out``; optionally evaluate. What each selected linear becomes is one spec for all, an explicit
    plan, or (an :class:`AllocationConfig`) the plan that fits a memory budget best: cost table,
    integer program, plan; saved with the allocation report and a picture of the plan. All input is
    checked before heavy work.

    The model is streamed one decoder block at a time (:mod:`lqkit.blockwise`): the skeleton lives on
    the meta device and each block is read from the folder's safetensors files when its turn comes,
    so memory is bounded by a block, not by the model. Every stage runs on ``device`` (default: CUDA
    when present), blocks in ``dtype`` (default: the stored 16-bit type on a GPU, fp32 on a CPU).
    Calibration runs only when the plan or the allocation needs statistics (``calib``: its settings;
    default 64 x 512 tokens of ``calib_text``, the bundled WikiText-2 validation text); statistics
    and cost-table rows are cached per block and a killed run resumes. With ``sequential`` (default)
    and a plan that uses H, each block's H is recomputed from what the already compressed blocks
    produce. ``group``: the process group of a ``torchrun`` launch (see :mod:`lqkit.dist`).
    ``stats_path``: a statistics file (``lqkit calibrate``) to use instead, read or written whole.
    ``distill``: a :class:`lqkit.distill.DistillConfig`: the compressed model is then distilled against
    the source model on the same calibration text (:func:`lqkit.distill.distill`) before it lands in
    ``out``."""
    checkpoint.check_out_dir(out, overwrite, claim=group is None or group.main)  # claimed by the writing process
    whole = isinstance(spec, AllocationConfig) and spec.budget.scope == "model"
    if whole and (distill is not None or stats_path is not None):
        raise SpecError("a whole-model budget (--scope model) runs in the streamed pipeline without --distill and "
                        "--stats; drop them, or use --scope linear")
    if distill is not None:
        return _compress_distilled(model, spec, out, distill, overwrite=overwrite, include=include, exclude=exclude,
                                   device=device, eval_protocol=eval_protocol, eval_text=eval_text, progress=progress,
                                   calib=calib, calib_text=calib_text, stats_path=stats_path, sequential=sequential,
                                   group=group, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if stats_path is not None:
        return _compress_whole(model, spec, out, overwrite=overwrite, include=include, exclude=exclude, device=device,
                               eval_protocol=eval_protocol, eval_text=eval_text, progress=progress, calib=calib,
                               calib_text=calib_text, stats_path=stats_path, sequential=sequential)
    group = group or SINGLE
    dev = torch.device(default_device(device))
    text = read_text(eval_text)[0] if eval_protocol else None
    t_start = time.time()
    src = open_model(model, dev, dtype)
    m = src.model
    budgeted = isinstance(spec, AllocationConfig)
    plan = _first_plan(m, spec, include, exclude, src.stored_dtype)
    ids = _eval_ids(src.tokenizer, text, eval_protocol)
    need = spec.needs() if budgeted else needed_stats(plan)
    scope = model_scope(m, list(plan), src.stored_dtype) if whole else None
    by_block, outside = blockwise.block_linears(src, plan)
    if outside and need:
        raise SpecError(f"{outside[0]} lies outside the decoder blocks, where no calibration statistics are "
                        f"gathered; exclude it (e.g. --exclude '{re.escape(outside[0])}$') or use a data-free method "
                        "(e.g. --method rtn)")
    calib_ids = None
    if need:
        body = read_text(calib_text, DEFAULT_CALIB_TEXT)[0]
        calib_ids = calibration_ids(src.tokenizer, body, calib or CalibConfig())
    sweep = blockwise.Sweep.for_source(src, calib_ids.shape[1] if calib_ids is not None else 512, group, progress)
    timings: dict[str, float] = {"open": round(time.time() - t_start, 1)}
    other = blockwise.other_params(src, plan)
    provider, alloc = None, None
    if budgeted or "fisher" in need or ("h" in need and not sequential):
        provider, alloc, stage = _statistics_and_costs(src, spec, plan, need, calib_ids, calib, sequential, group,
                                                       sweep, by_block, scope)
        timings.update(stage)
        plan = alloc.plan if alloc is not None else plan
    seq_ids = calib_ids if sequential and "h" in needed_stats(plan) else None
    t0 = time.time()
    tables, tied = (alloc.tables, _tied_to(alloc)) if alloc is not None else ({}, {})
    if tables:  # the tables' rows quantized now: pass 2's sequential statistics see them
        src.load_rest()
        build_tables(m, tables, tied, dtype=src.dtype, quantize=True)
    if group.main:  # the checkpoint's size is known now: a disk without room for it is said before the work
        expected = blockwise.size_summary(src, plan, other, tables)
        check_free_space(out, expected.model_bits // 8)
    writer = checkpoint.CheckpointWriter(out, overwrite, max_shard_bytes) if group.main else None
    try:
        reports = blockwise.compress_blocks(src, plan, stats=provider, seq_ids=seq_ids, writer=writer, sweep=sweep,
                                            device=dev)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    seconds = time.time() - t0
    timings["compress"] = round(seconds, 1)
    plan = {n: m.get_submodule(n).spec for n in plan}  # concrete specs (group dim "auto" resolved)
    summary = blockwise.size_summary(src, plan, other, tables)
    log.info("compressed %d matrices in %.1f s: %.3f effective bits", len(plan), seconds, summary.effective_bits)
    report = alloc.report() if alloc else None
    result = None
    if group.main:
        files = _plan_picture(plan, {n: r.shape for n, r in reports.items()},
                              f"{src.source}: {alloc.config.budget.label()} -> {summary.effective_bits:.3f} bits/param"
                              ) if alloc else {}
        extra = {"source_model": src.source, "compress_seconds": seconds, "eval": None, "allocation": report,
                 "device": str(dev), "dtype": str(src.dtype).removeprefix("torch."), "processes": group.world,
                 "stage_seconds": timings}
        t0 = time.time()
        writer.finish(m.config, src.tokenizer, plan=plan, reports={k: r.to_dict() for k, r in reports.items()},
                      summary=summary.to_dict(), extra=extra, dtype=src.stored_dtype,
                      generation_config=getattr(m, "generation_config", None), files=files, overwrite=overwrite,
                      tables={n: (s, m.get_submodule(n).shape) for n, s in tables.items()}, tied=tied)
        timings["save"] = round(time.time() - t0, 1)
        if eval_protocol:
            t0 = time.time()
            back = checkpoint.load(out, dtype=src.dtype, device=dev)
            result = perplexity(back, src.tokenizer, text, eval_protocol, progress, ids=ids)
            del back
            timings["eval"] = round(time.time() - t0, 1)
        timings["total"] = round(time.time() - t_start, 1)
        checkpoint.update_extra(out, {"eval": result.to_dict() if result else None, "stage_seconds": timings,
                                      **peak_memory(dev)})
    group.barrier()
    return CompressResult(str(out), src.source, plan, reports, summary, seconds, result, report, timings)


def _compress_distilled(model, spec, out: str, config, *, overwrite: bool, eval_protocol, eval_text, progress,
                        group, **kw) -> CompressResult:
    """:func:`compress` into a temporary folder beside ``out``, then :func:`lqkit.distill.distill` from
    there into ``out`` (so ``out`` only ever holds the distilled checkpoint), then the evaluation."""
    import dataclasses
    import shutil
    from pathlib import Path

    from .distill import distill
    from .outdir import make_temp_dir

    if group is not None and group.world > 1:
        raise SpecError("--distill runs in one process; compress under torchrun without it, then run "
                        "`lqkit distill CHECKPOINT --out DIR` on the result")
    text = read_text(eval_text)[0] if eval_protocol else None  # a missing --text is said now
    tmp = make_temp_dir(Path(out).expanduser())
    try:
        res = compress(model, spec, str(tmp), overwrite=True, progress=progress, group=group, **kw)
        d = distill(tmp, out, config, calib_text=kw.get("calib_text"), device=kw.get("device"), overwrite=overwrite,
                    progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = None
    if eval_protocol:
        t0 = time.time()
        back = checkpoint.load(out, device=kw.get("device") or "cpu")
        tok = load_tokenizer(str(out))
        result = perplexity(back, tok, text, eval_protocol, progress, ids=_eval_ids(tok, text, eval_protocol))
        checkpoint.update_extra(out, {"eval": result.to_dict(), "eval_seconds": round(time.time() - t0, 1)})
    return dataclasses.replace(res, out=str(out), eval=result, distill=d.report.to_dict())


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process and, on a GPU, the most the allocator held (MiB)."""
    import resource

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device.type == "cuda":
        out["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20)
        out["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def _tied_to(alloc) -> dict[str, str]:
    """{head: table} of the heads tied to a table the allocation quantizes."""
    if alloc.scope is None:
        return {}
    return {h: t for h, t in alloc.scope.tied if t in alloc.tables}


def _table_costs(src, scope, spec, store, tabs) -> tuple:
    """The cost rows of the scope's tables (cached in the run's store), in scope order."""
    from .core.embed import table_costs

    cached = store.load_costs(spec.tables)
    if cached is not None and set(cached) >= set(scope.tables):
        return tuple(cached[n] for n in scope.tables)
    stats = tabs.load_stats() if not isinstance(tabs, dict) else tabs
    src.load_rest()
    out = {}
    for name, keep in zip(scope.tables, scope.keep_bits):
        t0 = time.time()
        w = src.model.get_submodule(name).weight.detach()
        out[name] = table_costs(w, stats[name].to(w.device), spec.tables, keep)
        log.info("cost rows of %s (%dx%d): %.1f s", name, *w.shape, time.time() - t0)
    store.save_costs(out, spec.tables)
    return tuple(out[n] for n in scope.tables)


def _statistics_and_costs(src, spec, plan: Plan, need: set[str], calib_ids: torch.Tensor, calib: CalibConfig | None,
                          sequential: bool, group: Group, sweep, by_block, scope=None) -> tuple:
    """Pass 1 of the streamed pipeline: each block's statistics, saved per block as they complete,
    and (a budget) its cost-table rows; then the solve. With a whole-model budget (``scope``), the
    embedding's and head's statistics come from the same sweep and their cost rows join the solve.
    Returns (block k -> its stored statistics, the AllocationResult or None, stage timings)."""
    m, dev = src.model, src.device
    budgeted = isinstance(spec, AllocationConfig)
    timings: dict[str, float] = {}
    fisher, keep_h = "fisher" in need, "h" in need and not sequential
    fdtype = torch.float32 if src.dtype == torch.float32 else torch.bfloat16  # stored Fisher (as precise as the compute)
    alloc = None
    autocast = (calib or CalibConfig()).fisher_dtype  # the Fisher's backward sweep
    autocast = fast_autocast_dtype(dev) if autocast == "auto" else autocast
    autocast = "float32" if autocast == str(src.dtype).removeprefix("torch.") else autocast
    parts = {"fisher": fisher, "keep_h": keep_h, "fisher_dtype": str(fdtype), "autocast": autocast,
             **({"candidates": spec.candidates.to_dict(), "metric": spec.metric} if budgeted
                else {"plan": plan_to_json(plan)})}
    key = blockwise.run_key(src, list(plan), calib_ids, parts)
    store = blockwise.RunStore(blockwise.run_dir(key), writer=group.main)
    tstore = blockwise.TableStore(store.root, writer=group.main) if scope is not None else None
    done = set(group.broadcast_object([k for k in by_block if store.done(k, costs=budgeted)], 0))
    todo = [k for k in by_block if k not in done]
    tabs = None
    if tstore is not None and tstore.load_stats() is None:  # the tables' statistics need the sweep from block 0
        from .calibrate import TableAccumulator

        todo = list(by_block)  # (blocks already done keep their statistics and rows: see on_block)
        tabs = TableAccumulator(m.get_output_embeddings() if any(scope.head) else None)
    costs: dict = {}
    t_costs = [0.0]
    per = len(spec.candidates.quant_specs()) * len(spec.candidates.rotations) if budgeted else 0
    cbar = tqdm(total=len(plan) * per, desc="cost table", unit="cand", disable=not (budgeted and sweep.progress))

    pool = None
    if budgeted and dev.type == "cpu":
        from .allocate import default_workers

        workers = spec.workers or default_workers(sum(m.get_submodule(n).weight.numel() for n in plan), None)
        pool = blockwise.CostPool(workers) if workers > 1 else None

    def on_block(k: int, stats: dict) -> None:
        if k in done:  # swept again for the tables only
            return
        if budgeted:
            t0 = time.time()
            # the costs see what is stored: the Fisher rounded where it is (no second copy of it beside the sweep's)
            stats = blockwise.stored_stats(stats, lambda n: True, True, fdtype, inplace=True)
            c = blockwise.block_costs(src, by_block[k], stats, spec.candidates, spec.metric, group, cbar, pool)
            t_costs[0] += time.time() - t0
            log.info("cost table of block %d (%d matrices): %.1f s", k, len(c), time.time() - t0)
            full = lambda n: spec.metric == "fisher" or any(full_fisher(s) for s in c[n].specs)  # noqa: E731
            costs.update(c)
        else:
            c, full = None, lambda n: full_fisher(plan[n])  # noqa: E731
        store.save(k, blockwise.stored_stats(stats, full, keep_h, fdtype), c, shared=groups_by_identity(stats))

    t0 = time.time()
    try:
        info = blockwise.statistics(src, calib_ids, by_block, fisher, todo, on_block, sweep, store.root,
                                    autocast=autocast, tables=tabs)
    finally:
        cbar.close()
        if pool is not None:
            pool.close()
    group.barrier()  # rank 0's files are complete
    timings.update(calibrate=round(time.time() - t0 - t_costs[0], 1), cost_table=round(t_costs[0], 1),
                   calibrate_forward=info["seconds_forward"], calibrate_backward=info["seconds_backward"])
    provider = lambda k: store.load_stats(k, dev)  # noqa: E731
    if budgeted:
        for k in by_block:
            if k in done:
                costs.update(store.load_costs(k))
        names = list(plan)
        table = CostTable(tuple(names), tuple(tuple(m.get_submodule(n).weight.shape) for n in names),
                          tuple(costs[n] for n in names), spec.metric, spec.candidates, key, t_costs[0])
        if group.main and spec.cache:
            from .allocate import table_path

            checkpoint.write_atomic(table_path(key), json.dumps(table.to_json()).encode())
        tcosts = ()
        if scope is not None:
            t0 = time.time()
            if tabs is not None:
                tstats = {n: tabs.stats(info["windows"], lk, hd) for n, lk, hd in zip(scope.tables, scope.lookup,
                                                                                       scope.head)}
                tstore.save_stats(tstats)
                tstore.save_costs({}, spec.tables)  # costs of earlier statistics are stale
            tcosts = _table_costs(src, scope, spec, tstore, tstats if tabs is not None else tstore)
            timings["table_rows"] = round(time.time() - t0, 1)
        t0 = time.time()
        ties = [g for k in by_block for g in store.shared(k)]
        alloc = allocate(table, spec, done >= set(by_block), ties=ties, scope=scope, table_costs=tcosts)
        timings["solve"] = round(time.time() - t0, 1)
        check_plan(m, alloc.plan)
    return provider, alloc, timings


def _compress_whole(model: str | None, spec: MatrixSpec | Plan | AllocationConfig, out: str, *, overwrite: bool,
                    include, exclude, device, eval_protocol, eval_text, progress, calib, calib_text, stats_path,
                    sequential) -> CompressResult:
    """:func:`compress` with the whole model in memory and statistics from (or saved to) one file."""
    device = device or ("cuda" if torch.cuda.is_available() else None)  # decompositions on a GPU when present
    text = read_text(eval_text)[0] if eval_protocol else None
    loaded = load_model(model)
    m = loaded.model
    budgeted = isinstance(spec, AllocationConfig)
    plan = _first_plan(m, spec, include, exclude)
    ids = _eval_ids(loaded.tokenizer, text, eval_protocol)
    need = spec.needs() if budgeted else needed_stats(plan)
    stats = None
    if need or calib is not None or stats_path:
        stats = obtain_stats(loaded, list(plan), need, calib, calib_text, stats_path, progress)
    alloc = None
    if budgeted:
        check_stats({n: need for n in plan}, stats)
        table, cached = cost_table(m, stats, list(plan), spec.candidates, spec.metric, device=device,
                                   workers=spec.workers, cache=spec.cache, progress=progress)
        alloc = allocate(table, spec, cached, ties=input_groups(stats.h_alias, list(plan)))
        plan = alloc.plan
    seq_ids = None
    if sequential and stats is not None and "h" in (need | needed_stats(plan)):
        seq_ids = calibration_ids(loaded.tokenizer, read_text(calib_text, DEFAULT_CALIB_TEXT)[0], calib or CalibConfig())
    t0 = time.time()
    reports = compress_model(m, plan, device=device, progress=progress, stats=stats, sequential=seq_ids)
    seconds = time.time() - t0
    plan = {n: m.get_submodule(n).spec for n in plan}  # concrete specs (group dim "auto" resolved)
    summary = size_summary(m)
    log.info("compressed %d matrices in %.1f s: %.3f effective bits", len(plan), seconds, summary.effective_bits)
    result = perplexity(m, loaded.tokenizer, text, eval_protocol, progress, ids=ids) if eval_protocol else None
    report = alloc.report() if alloc else None
    files = _plan_picture(plan, {n: r.shape for n, r in reports.items()},
                          f"{loaded.source}: {alloc.config.budget.label()} -> {summary.effective_bits:.3f} bits/param"
                          ) if alloc else {}
    checkpoint.save(m, loaded.tokenizer, out, plan=plan, overwrite=overwrite,
                    reports={k: r.to_dict() for k, r in reports.items()}, summary=summary.to_dict(),
                    extra={"source_model": loaded.source, "compress_seconds": seconds,
                           "eval": result.to_dict() if result else None, "allocation": report},
                    files=files)
    return CompressResult(str(out), loaded.source, plan, reports, summary, seconds, result, report)


PLAN_PICTURE = "plan.png"


def _plan_picture(plan, shapes, title: str) -> dict[str, bytes]:
    """{"plan.png": bytes}, or {} (logged) without matplotlib."""
    from .errors import LqkitError
    from .report import plan_png

    try:
        return {PLAN_PICTURE: plan_png(plan, shapes, title)}
    except LqkitError as e:
        log.info("no %s in the checkpoint: %s", PLAN_PICTURE, e)
        return {}


def default_stats_path(loaded, names: list[str], text: str, config: CalibConfig):
    """Where the statistics of this model (its selected weights), text and settings are cached."""
    import hashlib

    from .allocate import weights_fingerprint
    from .models import cache_dir

    key = hashlib.sha256(f"{weights_fingerprint(loaded.model, names)}|{hashlib.sha256(text.encode()).hexdigest()}|"
                         f"{config.samples}x{config.seqlen}".encode()).hexdigest()[:24]
    return cache_dir() / "stats" / f"{key}.safetensors"


def obtain_stats(loaded, names: list[str], need: set[str], calib: CalibConfig | None, calib_text: str | None,
                 stats_path: str | None, progress: bool = True) -> CalibrationStats:
    """Statistics of the named layers: from ``stats_path`` (default: the cache) if it has what is
    needed, else computed and saved there."""
    from pathlib import Path

    body, label = read_text(calib_text, DEFAULT_CALIB_TEXT)
    config = calib or CalibConfig()
    explicit = stats_path is not None
    path = Path(stats_path).expanduser() if explicit else default_stats_path(loaded, names, body, config)
    stats = None
    if path.is_file():
        try:
            stats = checkpoint.load_stats(path)
        except CheckpointError as e:
            if explicit:
                raise
            log.warning("the cached statistics %s are damaged (%s); computing them again", path, e)
            path.unlink(missing_ok=True)  # a damaged cache file is computed again, not an error forever
    if stats is not None:
        src = stats.meta.get("model")
        if explicit and src and src != loaded.source:
            log.warning("statistics in %s were computed on %s, not %s", path, src, loaded.source)
        if explicit or ("fisher" not in need or stats.fisher):
            log.info("calibration statistics from %s", path)
            return stats
    config = CalibConfig(config.samples, config.seqlen, fisher="fisher" in need,  # Fisher only when used
                         fisher_dtype=config.fisher_dtype)
    stats = _calibrate(loaded.model, loaded.tokenizer, body, names, config, text_label=label,
                       model_label=loaded.source, progress=progress)
    checkpoint.save_stats(stats, path, overwrite=not explicit)
    return stats


def calibrate(model: str | None, out: str, *, text: str | None = None, config: CalibConfig = CalibConfig(),
              include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
              overwrite: bool = False, progress: bool = True) -> CalibrationStats:
    """Compute calibration statistics of the selected linear layers of ``model`` and save them to ``out``."""
    from pathlib import Path

    if Path(out).expanduser().exists() and not overwrite:
        stem = Path(out).expanduser()
        raise checkpoint.CheckpointError(f"statistics file {out!r} already exists; pass --overwrite or choose another "
                                         f"--out, e.g. --out {stem.with_name(stem.stem + '-2' + stem.suffix)}")
    body, label = read_text(text, DEFAULT_CALIB_TEXT)
    loaded = load_model(model)
    names = list(find_linears(loaded.model, include or DEFAULT_INCLUDE, exclude or DEFAULT_EXCLUDE))
    if not names:
        raise no_layer_matches(loaded.model)
    stats = _calibrate(loaded.model, loaded.tokenizer, body, names, config, text_label=label,
                       model_label=loaded.source, progress=progress)
    checkpoint.save_stats(stats, out, overwrite=overwrite)
    return stats


def load_any(path: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, effective_bits) of an lqkit checkpoint or of a plain HF model."""
    if path is not None and checkpoint.is_checkpoint(path):
        meta = checkpoint.read_meta(path)
        model = checkpoint.load(path, dtype=dtype, device=device)
        return model, load_tokenizer(path), meta.get("summary", {}).get("effective_bits")
    loaded = load_model(path, dtype=dtype)
    return loaded.model.to(device), loaded.tokenizer, None


def evaluate(path: str | None, protocol: EvalProtocol = EvalProtocol(), *, text: str | None = None,
             progress: bool = True, device: str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Perplexity of a checkpoint or model under ``protocol``, as a JSON-ready dict."""
    body, label = read_text(text)
    model, tok, bits = load_any(path, dtype or torch.float32, device)
    r = perplexity(model, tok, body, protocol, progress)
    return {"model": path or "google/gemma-3-270m", "text": label, "effective_bits": bits, **r.to_dict()}


def inspect(path: str) -> dict:
    """A checkpoint's metadata, plus where each matrix runs on a GPU ("gpu": module -> path_for)."""
    from . import kernels
    from .plan import plan_from_json

    meta = checkpoint.read_meta(path)
    out = {k: meta.get(k) for k in ("lqkit_version", "created", "plan", "reports", "summary", "extra")}
    out["tables"] = meta.get("tables") or {}
    s = out["summary"] or {}
    if s and "model_bits" not in s:  # a checkpoint from before the whole-model figures: they follow from the rest
        s = dict(s, table_params=0, table_bits=0)
        s["model_params"] = s.get("compressed_params", 0) + s.get("other_params", 0)
        s["model_bits"] = s.get("compressed_bits", 0) + s.get("other_bits", 0)
        s["model_bits_per_param"] = s["model_bits"] / s["model_params"] if s["model_params"] else None
        out["summary"] = s
    plan = plan_from_json(meta.get("plan") or {})
    out["gpu"] = {n: kernels.path_for(spec.quant) for n, spec in plan.items()}
    out["gpu_summary"] = gpu_summary(out["gpu"], plan, budget=bool((meta.get("extra") or {}).get("allocation")))
    return out


def gpu_summary(paths: Mapping[str, str], plan: Mapping[str, MatrixSpec], budget: bool = False) -> dict:
    """How many matrices run on each GPU path (``kernels.path_for``), how many of those on the
    kernels add a sparse pass for exactly kept outliers (or feature columns) or rotate their input
    first, and whether the plan came from a budget (which ``--target lqkit-gpu`` can restrict)."""
    on_kernels = [s for n, s in plan.items() if paths.get(n, "torch") != "torch" and s.quant is not None]
    return {"paths": dict(collections.Counter(paths.values()).most_common()),
            "outlier_pass": sum(1 for s in on_kernels if s.quant.outliers or s.quant.outlier_features),
            "rotated": sum(1 for s in on_kernels if s.rotation is not None), "budget": budget}


_GPU_PATHS = {"triton/frag": "on the tensor-core GEMV (fragment layout)",
              "triton/interleaved": "on the interleaved kernels (codebooks, groups along out or 8 bits: slower)",
              "torch": "in PyTorch (no quantized part or no kernel format)"}


def format_gpu_summary(g: Mapping) -> str:
    """One line: where a checkpoint's matrices run on a CUDA GPU, and how to keep its matrices on the
    fastest path when some are not there."""
    paths = g.get("paths") or {}
    parts = [f"{n} {_GPU_PATHS.get(p, p)}" for p, n in paths.items()]
    if g.get("outlier_pass"):
        parts.append(f"{g['outlier_pass']} of them with one sparse outlier pass more")
    if g.get("rotated"):
        parts.append(f"{g['rotated']} rotating their input first")
    slow = sum(n for p, n in paths.items() if p != "triton/frag") + g.get("outlier_pass", 0) + g.get("rotated", 0)
    hint = ""
    if slow:
        hint = ("; compress with --target lqkit-gpu to keep a budget plan on the fastest path" if g.get("budget") else
                "; rtn or gptq codes of 2-7 bits with groups along in, no outliers, no rotation run fastest")
    return "on a CUDA GPU: " + ", ".join(parts) + hint


def plot_plan(path: str, png: str) -> None:
    """Draw a checkpoint's plan to ``png`` (written atomically)."""
    from .plan import plan_from_json
    from .report import plan_png

    meta = checkpoint.read_meta(path)
    shapes = {n: tuple(r["shape"]) for n, r in meta["reports"].items()}
    s = meta.get("summary") or {}
    title = f"{(meta.get('extra') or {}).get('source_model', path)}: {s.get('effective_bits', 0):.3f} bits/param"
    checkpoint.write_atomic(png, plan_png(plan_from_json(meta["plan"]), shapes, title))


def _fmt_bits(b) -> str:
    return "-" if b is None else f"{b:.3f}"


def format_summary(r: CompressResult) -> str:
    s = r.summary
    lines = [
        f"model                {r.source}",
        f"compressed matrices  {len(r.plan)} ({s.compressed_params / 1e6:.1f}M params) in {r.seconds:.1f} s",
        (f"effective bits       {_fmt_bits(s.effective_bits)} per parameter ({s.compressed_bits / 8 / 2**20:.1f} MiB), "
         "linear layers"),
        *([(f"tables               {s.table_params / 1e6:.1f}M entries as quantized rows, "
            f"{s.table_bits / 8 / 2**20:.1f} MiB")] if s.table_params else []),
        (f"other parameters     {s.other_params / 1e6:.1f}M, {s.other_bits / 8 / 2**20:.1f} MiB ("
         f"{'norms, ...' if s.table_params else 'embeddings, norms'}; kept)"),
        (f"whole model          {_fmt_bits(s.model_bits_per_param)} bits per parameter over {s.model_params / 1e6:.1f}M, "
         f"{s.model_bits // 8} bytes ({s.model_bits / 8 / 2**20:.1f} MiB) of tensors"),
        f"mean rel. error      {sum(x.error for x in r.reports.values()) / len(r.reports):.4f}",
    ]
    if r.allocation:
        lines[2:2] = [format_allocation(r.allocation)]
    if r.distill:
        blocks = r.distill["blocks"]
        if blocks:
            mb = sum(b["mse_before"] for b in blocks) / len(blocks)
            ma = sum(b["mse_after"] for b in blocks) / len(blocks)
            lines.append(f"distilled            {len(blocks)} blocks x {r.distill['config']['steps']} steps: mean "
                         f"relative block MSE {mb:.4g} -> {ma:.4g}")
        if r.distill["kl"]:
            lines.append(f"distilled (KL)       {r.distill['kl']['before']:.4g} -> {r.distill['kl']['after']:.4g} nats/token")
        n = r.distill["heldout_nll"]
        if n.get("before") is not None:
            lines.append(f"held-out calib loss  {n['before']:.4f} -> {n['after']:.4f} (uncompressed {n['teacher']:.4f})")
    if r.eval:
        lines.append(f"perplexity           {r.eval.perplexity:.3f} ({r.eval.windows} windows x {r.eval.window_tokens})")
    lines.append(f"checkpoint           {r.out}")
    return "\n".join(lines)


def format_allocation(a: dict) -> str:
    """Two lines on how a budget was spent (three for a whole-model budget)."""
    b = a["budget"]
    asked = f"{b['bits_per_param']:g} bits/param" if b["bits_per_param"] is not None else f"{b['bytes']} bytes"
    table = "cached" if a["table_cached"] else f"{a['table_seconds']:.0f} s"
    mdl = a.get("model")
    if mdl:
        picks = ", ".join(f"{n} {t['spec']}" for n, t in mdl["tables"].items())
        head = (f"budget               {asked} for the whole model -> achieved {mdl['achieved_bytes']} bytes, "
                f"{mdl['achieved_bits_per_param']:.4f} bits/param over {mdl['params']} params (minimum possible "
                f"{mdl['minimum_bits_per_param']:.3f}); linear layers {a['achieved_bits_per_param']:.4f} bits/param; "
                f"{picks}\n")
    else:
        head = (f"budget               {asked} -> achieved {a['achieved_bits_per_param']:.4f} bits/param "
                f"(minimum possible {a['minimum_bits_per_param']:.3f})\n")
    return (head +
            f"allocation           {a['metric']} error {a['objective']:.4g}, solver: {a['solver_status']} "
            f"({'optimal' if a['optimal'] else 'not proven optimal'}, {a['variables']} candidates, "
            f"{a['solver_seconds']:.2f} s); cost table {table}")


def format_inspect(report: dict) -> str:
    gpu = report.get("gpu") or {}
    rows = [f"{'module':<48} {'spec':<28} {'shape':>11} {'bits/param':>10} {'rel.err':>8}  {'on GPU'}"]
    for name, r in report["reports"].items():
        shape = "x".join(str(v) for v in r["shape"])
        rows.append(f"{name:<48} {r['spec']:<28} {shape:>11} {r['bits_per_param']:>10.3f} {r['error']:>8.4f}  "
                    f"{gpu.get(name, '-')}")
    s = report.get("summary") or {}
    for name, t in (report.get("tables") or {}).items():
        tied = f", tied to {', '.join(t['tied'])}" if t.get("tied") else ""
        rows.append(f"{name:<48} {RowSpec.from_dict(t['spec']).label():<28} {'x'.join(map(str, t['shape'])):>11} "
                    f"{embed.storage_bits(RowSpec.from_dict(t['spec']), tuple(t['shape'])) / (t['shape'][0] * t['shape'][1]):>10.3f}"
                    f"  (table{tied})")
    rows.append("")
    rows.append(f"effective bits {_fmt_bits(s.get('effective_bits'))} over {s.get('compressed_params', 0) / 1e6:.1f}M "
                f"compressed params (linear layers); other params {s.get('other_params', 0) / 1e6:.1f}M kept uncompressed"
                + (f"; tables {s['table_params'] / 1e6:.1f}M as quantized rows" if s.get("table_params") else ""))
    if s.get("model_bits") is not None:
        rows.append(f"whole model {s['model_bits_per_param']:.3f} bits/param over {s['model_params'] / 1e6:.1f}M params, "
                    f"{s['model_bits'] // 8} bytes ({s['model_bits'] / 8 / 2**20:.1f} MiB) of tensors")
    if report.get("gpu_summary") and (report["gpu_summary"].get("paths") or {}):
        rows.append(format_gpu_summary(report["gpu_summary"]))
    alloc = (report.get("extra") or {}).get("allocation")
    if alloc:
        rows.append(format_allocation(alloc).replace("budget      ", "allocation: budget", 1)
                    .replace("\nallocation  ", "\n            "))
    dist = (report.get("extra") or {}).get("distill")
    if dist:
        blocks = dist.get("blocks") or []
        what = f"{len(blocks)} blocks x {dist['config']['steps']} steps" if blocks else "no block-wise stage"
        kl = f", KL {dist['config']['kl_steps']} steps" if dist.get("kl") else ""
        n = dist.get("heldout_nll") or {}
        held = (f"; held-out loss {n['before']:.4f} -> {n['after']:.4f}" if n.get("before") is not None else "")
        rows.append(f"distilled against {dist.get('source_model')}: {what}{kl}{held}")
    ev = (report.get("extra") or {}).get("eval")
    if ev:
        rows.append(f"perplexity {ev['perplexity']:.3f} ({ev['windows']} windows x {ev['window_tokens']} tokens)")
    return "\n".join(rows)
