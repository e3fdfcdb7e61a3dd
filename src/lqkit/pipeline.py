"""End-to-end jobs behind the CLI: compress → save, load → evaluate, inspect."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from . import checkpoint
from .calibrate import CalibConfig, CalibrationStats, calibrate as _calibrate
from .compress import MatrixReport, SizeSummary, compress_model, needed_stats, size_summary
from .core.decompose import MatrixSpec
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


def compress(model: str | None, spec: MatrixSpec | Plan, out: str, *, overwrite: bool = False,
             include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
             device: str | None = None, eval_protocol: EvalProtocol | None = None,
             eval_text: str | None = None, progress: bool = True, calib: CalibConfig | None = None,
             calib_text: str | None = None, stats_path: str | None = None) -> CompressResult:
    """Load ``model``, compress it with one spec for every selected linear (or an explicit plan),
    optionally evaluate, and write a checkpoint to ``out``. All input is checked before heavy work.

    Calibration statistics are used when the plan needs them (data-aware quantizers, weightings) or
    ``calib`` / ``stats_path`` is given: read from ``stats_path`` if that file exists, else computed
    on ``calib_text`` (default: the bundled calibration text) and, with ``stats_path``, saved there."""
    checkpoint.check_out_dir(out, overwrite)
    text = read_text(eval_text)[0] if eval_protocol else None
    loaded = load_model(model)
    m = loaded.model
    if isinstance(spec, MatrixSpec):
        plan = uniform_plan(m, spec, include or DEFAULT_INCLUDE, exclude or DEFAULT_EXCLUDE)
    else:
        plan = dict(spec)
    check_plan(m, plan)
    ids = None
    if eval_protocol:  # a too-short text fails now, not after the compression
        ids = tokenize(loaded.tokenizer, text)
        window_starts(ids.numel(), eval_protocol)
    need = needed_stats(plan)
    stats = None
    if need or calib is not None or stats_path:
        stats = obtain_stats(loaded, plan, need, calib, calib_text, stats_path, progress)
    t0 = time.time()
    reports = compress_model(m, plan, device=device, progress=progress, stats=stats)
    seconds = time.time() - t0
    plan = {n: m.get_submodule(n).spec for n in plan}  # concrete specs (group dim "auto" resolved)
    summary = size_summary(m)
    log.info("compressed %d matrices in %.1f s: %.3f effective bits", len(plan), seconds, summary.effective_bits)
    result = perplexity(m, loaded.tokenizer, text, eval_protocol, progress, ids=ids) if eval_protocol else None
    checkpoint.save(m, loaded.tokenizer, out, plan=plan, overwrite=overwrite,
                    reports={k: r.to_dict() for k, r in reports.items()}, summary=summary.to_dict(),
                    extra={"source_model": loaded.source, "compress_seconds": seconds,
                           "eval": result.to_dict() if result else None})
    return CompressResult(str(out), loaded.source, plan, reports, summary, seconds, result)


def obtain_stats(loaded, plan, need: set[str], calib: CalibConfig | None, calib_text: str | None,
                 stats_path: str | None, progress: bool = True) -> CalibrationStats:
    """Statistics for ``plan``: loaded from ``stats_path`` if it exists, else computed (and saved there)."""
    from pathlib import Path

    if stats_path and Path(stats_path).expanduser().is_file():
        stats = checkpoint.load_stats(stats_path)
        src = stats.meta.get("model")
        if src and src != loaded.source:
            log.warning("statistics in %s were computed on %s, not %s", stats_path, src, loaded.source)
        return stats
    body, label = read_text(calib_text, DEFAULT_CALIB_TEXT)
    config = calib or CalibConfig()
    config = CalibConfig(config.samples, config.seqlen, fisher="fisher" in need)  # Fisher only when used
    stats = _calibrate(loaded.model, loaded.tokenizer, body, list(plan), config, text_label=label,
                       model_label=loaded.source, progress=progress)
    if stats_path:
        checkpoint.save_stats(stats, stats_path)
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
    meta = checkpoint.read_meta(path)
    return {k: meta.get(k) for k in ("lqkit_version", "created", "plan", "reports", "summary", "extra")}


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
    if r.eval:
        lines.append(f"perplexity           {r.eval.perplexity:.3f} ({r.eval.windows} windows x {r.eval.window_tokens})")
    lines.append(f"checkpoint           {r.out}")
    return "\n".join(lines)


def format_inspect(report: dict) -> str:
    rows = [f"{'module':<48} {'spec':<28} {'shape':>11} {'bits/param':>10} {'rel.err':>8}"]
    for name, r in report["reports"].items():
        shape = "x".join(str(v) for v in r["shape"])
        rows.append(f"{name:<48} {r['spec']:<28} {shape:>11} {r['bits_per_param']:>10.3f} {r['error']:>8.4f}")
    s = report.get("summary") or {}
    rows.append("")
    rows.append(f"effective bits {_fmt_bits(s.get('effective_bits'))} over {s.get('compressed_params', 0) / 1e6:.1f}M "
                f"compressed params; other params {s.get('other_params', 0) / 1e6:.1f}M kept uncompressed")
    ev = (report.get("extra") or {}).get("eval")
    if ev:
        rows.append(f"perplexity {ev['perplexity']:.3f} ({ev['windows']} windows x {ev['window_tokens']} tokens)")
    return "\n".join(rows)
