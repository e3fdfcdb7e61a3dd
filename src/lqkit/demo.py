"""``make demo`` (``lqkit demo``): compress the default model end to end and report the result table.

Runs on google/gemma-3-270m: full-precision perplexity (cached after the first run), LQ
decomposition (3-bit RTN groups of 128 + rank-16 L·R), save, reload from disk, perplexity of the
reloaded checkpoint, all under lqkit's fixed evaluation protocol.
"""

from __future__ import annotations

import json
import logging
import time

from . import checkpoint, pipeline
from .core import MatrixSpec, QuantSpec
from .data import read_text
from .evaluate import EvalProtocol, perplexity, tokenize
from .models import cache_dir, load_model, resolve

log = logging.getLogger("lqkit.demo")

DEMO_SPEC = MatrixSpec("lq", QuantSpec("rtn", 3, 128), rank=16)


def baseline(proto: EvalProtocol, text: str) -> dict:
    """Full-precision perplexity of the default model, cached by model and protocol."""
    path = cache_dir() / "baseline-gemma-3-270m.json"
    key = {"model": resolve(None), "windows": proto.windows, "window_tokens": proto.window_tokens}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["result"]
    loaded = load_model(None)
    r = perplexity(loaded.model, loaded.tokenizer, text, proto, ids=tokenize(loaded.tokenizer, text)).to_dict()
    path.write_text(json.dumps({"key": key, "result": r}))
    return r


def run(out: str = "out/gemma-3-270m-lq3", windows: int = 40) -> str:
    """Run the demo and return its report (a Markdown table and two lines)."""
    t0 = time.time()
    proto = EvalProtocol(windows=windows, batch_size=4)
    text, _ = read_text(None)
    log.info("step 1/3: full-precision baseline")
    base = baseline(proto, text)
    log.info("step 2/3: compress with %s", DEMO_SPEC.label())
    res = pipeline.compress(None, DEMO_SPEC, out, overwrite=True)
    log.info("step 3/3: reload %s from disk and evaluate", out)
    comp = pipeline.evaluate(out, proto)
    size_mib = checkpoint.read_meta(out)["files"][checkpoint.TENSOR_FILE]["bytes"] / 2**20
    s = res.summary
    return "\n".join([
        "",
        f"google/gemma-3-270m, WikiText-2 test, {proto.windows} windows x {proto.window_tokens} tokens "
        "(fixed protocol, fp32, CPU)",
        "",
        "| model | linear-layer bits/param | linear layers (MiB) | perplexity |",
        "|---|---|---|---|",
        f"| full precision (fp32) | 32 | {s.compressed_params * 4 / 2**20:.1f} | {base['perplexity']:.2f} |",
        f"| lqkit {DEMO_SPEC.label()} | {s.effective_bits:.3f} | {s.compressed_bits / 8 / 2**20:.1f} "
        f"| {comp['perplexity']:.2f} |",
        "",
        f"checkpoint: {out} ({size_mib:.0f} MiB on disk, embeddings kept in fp32); "
        f"compression {res.seconds:.0f} s; total {time.time() - t0:.0f} s",
        f"next: lqkit inspect {out}    lqkit eval {out} --json",
    ])
