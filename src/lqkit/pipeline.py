"""End-to-end jobs behind the CLI: compress → save, load → evaluate, inspect."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from . import checkpoint
from .allocate import AllocationConfig, allocate, cost_table
from .calibrate import CalibConfig, CalibrationStats, calibrate as _calibrate, calibration_ids
from .compress import MatrixReport, SizeSummary, check_stats, compress_model, needed_stats, size_summary
from .core.decompose import MatrixSpec
from .core.quant import QuantSpec
from .data import DEFAULT_CALIB_TEXT, read_text
from .errors import SpecError
from .evaluate import EvalProtocol, EvalResult, perplexity, tokenize, window_starts
from .models import load_model, load_tokenizer
from .nn.surgery import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, check_plan, find_linears
from .plan import Plan, uniform_plan

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


def compress(model: str | None, spec: MatrixSpec | Plan | AllocationConfig, out: str, *, overwrite: bool = False,
             include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
             device: str | None = None, eval_protocol: EvalProtocol | None = None,
             eval_text: str | None = None, progress: bool = True, calib: CalibConfig | None = None,
             calib_text: str | None = None, stats_path: str | None = None, sequential: bool = True) -> CompressResult:
    """Load ``model``, compress it and write a checkpoint to ``out``; optionally evaluate. What each
    selected linear becomes is one spec for all, an explicit plan, or (an :class:`AllocationConfig`)
    the plan that fits a memory budget best: cost table, integer program, plan; saved with the
    allocation report and a picture of the plan. All input is checked before heavy work.

    Calibration statistics are used when the plan or the allocation needs them, or when ``calib`` /
    ``stats_path`` is given: read from ``stats_path`` if that file exists, else computed on
    ``calib_text`` (default: the bundled calibration text) and saved to ``stats_path`` (default: a
    file under $LQKIT_CACHE/stats keyed by the weights, the text and the calibration settings).
    With ``sequential`` (default) and a plan that uses H, compression runs block by block with each
    block's H recomputed from the already compressed blocks' outputs (see :func:`compress_model`)."""
    checkpoint.check_out_dir(out, overwrite)
    device = device or ("cuda" if torch.cuda.is_available() else None)  # decompositions on a GPU when present
    text = read_text(eval_text)[0] if eval_protocol else None
    loaded = load_model(model)
    m = loaded.model
    budgeted = isinstance(spec, AllocationConfig)
    if isinstance(spec, MatrixSpec):
        plan = uniform_plan(m, spec, include or DEFAULT_INCLUDE, exclude or DEFAULT_EXCLUDE)
    elif budgeted:
        plan = uniform_plan(m, MatrixSpec("quant", QuantSpec()), include or DEFAULT_INCLUDE, exclude or DEFAULT_EXCLUDE)
    else:
        plan = dict(spec)
    check_plan(m, plan)
    ids = None
    if eval_protocol:  # a too-short text fails now, not after the compression
        ids = tokenize(loaded.tokenizer, text)
        window_starts(ids.numel(), eval_protocol)
    need = spec.needs() if budgeted else needed_stats(plan)
    stats = None
    if need or calib is not None or stats_path:
        stats = obtain_stats(loaded, list(plan), need, calib, calib_text, stats_path, progress)
    alloc = None
    if budgeted:
        check_stats({n: need for n in plan}, stats)
        table, cached = cost_table(m, stats, list(plan), spec.candidates, spec.metric, device=device,
                                   workers=spec.workers, cache=spec.cache, progress=progress)
        alloc = allocate(table, spec, cached)
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
    if path.is_file():
        stats = checkpoint.load_stats(path)
        src = stats.meta.get("model")
        if explicit and src and src != loaded.source:
            log.warning("statistics in %s were computed on %s, not %s", path, src, loaded.source)
        if explicit or ("fisher" not in need or stats.fisher):
            log.info("calibration statistics from %s", path)
            return stats
    config = CalibConfig(config.samples, config.seqlen, fisher="fisher" in need)  # Fisher only when used
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
        raise checkpoint.CheckpointError(f"statistics file {out!r} already exists; pass --overwrite or choose another --out")
    body, label = read_text(text, DEFAULT_CALIB_TEXT)
    loaded = load_model(model)
    names = list(find_linears(loaded.model, include or DEFAULT_INCLUDE, exclude or DEFAULT_EXCLUDE))
    if not names:
        raise SpecError("no linear layer matches the include/exclude patterns; loosen --include/--exclude")
    stats = _calibrate(loaded.model, loaded.tokenizer, body, names, config, text_label=label,
                       model_label=loaded.source, progress=progress)
    checkpoint.save_stats(stats, out, overwrite=overwrite)
    return stats


def load_any(path: str | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, effective_bits) of an lqkit checkpoint or of a plain HF model."""
    if path is not None and checkpoint.is_checkpoint(path):
        meta = checkpoint.read_meta(path)
        model = checkpoint.load(path, dtype=dtype)
        return model, load_tokenizer(path), meta.get("summary", {}).get("effective_bits")
    loaded = load_model(path, dtype=dtype)
    return loaded.model, loaded.tokenizer, None


def evaluate(path: str | None, protocol: EvalProtocol = EvalProtocol(), *, text: str | None = None,
             progress: bool = True) -> dict:
    """Perplexity of a checkpoint or model under ``protocol``, as a JSON-ready dict."""
    body, label = read_text(text)
    model, tok, bits = load_any(path)
    r = perplexity(model, tok, body, protocol, progress)
    return {"model": path or "google/gemma-3-270m", "text": label, "effective_bits": bits, **r.to_dict()}


def inspect(path: str) -> dict:
    """A checkpoint's metadata, plus where each matrix runs on a GPU ("gpu": module -> path_for)."""
    from . import kernels
    from .plan import plan_from_json

    meta = checkpoint.read_meta(path)
    out = {k: meta.get(k) for k in ("lqkit_version", "created", "plan", "reports", "summary", "extra")}
    out["gpu"] = {n: kernels.path_for(spec.quant) for n, spec in plan_from_json(meta.get("plan") or {}).items()}
    return out


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
        f"effective bits       {_fmt_bits(s.effective_bits)} per parameter ({s.compressed_bits / 8 / 2**20:.1f} MiB)",
        f"other parameters     {s.other_params / 1e6:.1f}M, {s.other_bits / 8 / 2**20:.1f} MiB (embeddings, norms; kept)",
        f"mean rel. error      {sum(x.error for x in r.reports.values()) / len(r.reports):.4f}",
    ]
    if r.allocation:
        lines[2:2] = [format_allocation(r.allocation)]
    if r.eval:
        lines.append(f"perplexity           {r.eval.perplexity:.3f} ({r.eval.windows} windows x {r.eval.window_tokens})")
    lines.append(f"checkpoint           {r.out}")
    return "\n".join(lines)


def format_allocation(a: dict) -> str:
    """Two lines on how a budget was spent."""
    b = a["budget"]
    asked = f"{b['bits_per_param']:g} bits/param" if b["bits_per_param"] is not None else f"{b['bytes']} bytes"
    table = "cached" if a["table_cached"] else f"{a['table_seconds']:.0f} s"
    return (f"budget               {asked} -> achieved {a['achieved_bits_per_param']:.4f} bits/param "
            f"(minimum possible {a['minimum_bits_per_param']:.3f})\n"
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
    rows.append("")
    rows.append(f"effective bits {_fmt_bits(s.get('effective_bits'))} over {s.get('compressed_params', 0) / 1e6:.1f}M "
                f"compressed params; other params {s.get('other_params', 0) / 1e6:.1f}M kept uncompressed")
    alloc = (report.get("extra") or {}).get("allocation")
    if alloc:
        rows.append(format_allocation(alloc).replace("budget      ", "allocation: budget", 1)
                    .replace("\nallocation  ", "\n            "))
    ev = (report.get("extra") or {}).get("eval")
    if ev:
        rows.append(f"perplexity {ev['perplexity']:.3f} ({ev['windows']} windows x {ev['window_tokens']} tokens)")
    return "\n".join(rows)
