"""End-to-end jobs behind the CLI: compress → save, load → evaluate, inspect."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from . import checkpoint
from .compress import MatrixReport, SizeSummary, compress_model, size_summary
from .core.decompose import MatrixSpec
from .data import read_text
from .evaluate import EvalProtocol, EvalResult, perplexity, tokenize, window_starts
from .models import load_model, load_tokenizer
from .nn.surgery import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, check_plan
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
             eval_text: str | None = None, progress: bool = True) -> CompressResult:
    """Load ``model``, compress it with one spec for every selected linear (or an explicit plan),
    optionally evaluate, and write a checkpoint to ``out``. All input is checked before heavy work."""
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
    t0 = time.time()
    reports = compress_model(m, plan, device=device, progress=progress)
    seconds = time.time() - t0
    summary = size_summary(m)
    log.info("compressed %d matrices in %.1f s: %.3f effective bits", len(plan), seconds, summary.effective_bits)
    result = perplexity(m, loaded.tokenizer, text, eval_protocol, progress, ids=ids) if eval_protocol else None
    checkpoint.save(m, loaded.tokenizer, out, plan=plan, overwrite=overwrite,
                    reports={k: r.to_dict() for k, r in reports.items()}, summary=summary.to_dict(),
                    extra={"source_model": loaded.source, "compress_seconds": seconds,
                           "eval": result.to_dict() if result else None})
    return CompressResult(str(out), loaded.source, plan, reports, summary, seconds, result)


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
