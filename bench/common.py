"""Helpers shared by benchmark scripts: machine info and atomic JSON results."""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
_T0 = time.time()


def log(msg: str, watchdog: float = 180.0) -> None:
    """Print ``msg`` after the seconds since the script started, flushed. When nothing more is logged
    for ``watchdog`` seconds, the stacks of all threads go to stderr (and again every ``watchdog``
    seconds): a stalled phase shows where it is. 0: no watchdog."""
    print(f"[{time.time() - _T0:7.1f} s] {msg}", flush=True)
    if watchdog:
        faulthandler.dump_traceback_later(watchdog, repeat=True, file=sys.stderr)


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every resumable benchmark script shares: --only REGEX and --fresh."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="regex: run only matching row names")
    ap.add_argument("--fresh", action="store_true", help="ignore existing results")
    return ap


def by_site(blocks, top: int = 15) -> list[dict]:
    """GPU allocations (size in bytes, the allocator's recorded stack frames) summed by where lqkit made
    them — the innermost three lqkit frames — largest first (``torch.cuda.memory._record_memory_history``)."""
    groups: dict[str, list[int]] = {}
    for size, frames in blocks:
        mine = [f for f in frames if "/lqkit/" in f.get("filename", "")][:3]
        where = " < ".join(f"{f['filename'].rsplit('/lqkit/', 1)[1]}:{f['line']} {f['name']}" for f in mine) or "?"
        g = groups.setdefault(where, [0, 0])
        g[0] += size
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"where": w, "mib": round(b / 2**20), "tensors": n} for w, (b, n) in ranked]


def plan_mix(path: Path | str) -> dict:
    """How many matrices of a checkpoint's plan take each spec (label -> count, most frequent first)."""
    from lqkit import checkpoint
    from lqkit.plan import plan_from_json

    counts = collections.Counter(s.label() for s in plan_from_json(checkpoint.read_meta(path)["plan"]).values())
    return dict(counts.most_common())


def fmt_ppl(p: float) -> str:
    """Perplexity for tables: two decimals, or three significant digits once it has collapsed."""
    return f"{p:.2f}" if p < 1e4 else f"{p:.3g}"
