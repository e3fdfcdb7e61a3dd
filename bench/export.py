"""Serving benchmark: what a servable plan costs, and whether the exported folder is the same model.

For each budget (bits per parameter of the linear layers in the decoder blocks), on the default
model (google/gemma-3-270m) or --model:
- ``free``: `lqkit compress --budget B` (the default candidates, no target), perplexity of the checkpoint;
- ``vllm``: `lqkit compress --budget B --target vllm` (only what vLLM/SGLang serve; q/k/v and gate/up
  tied to one scheme in the integer program), perplexity of the checkpoint;
- ``export``: that checkpoint exported with `lqkit export --format compressed-tensors`, read back
  with transformers + compressed-tensors (lqkit.export.load_compressed_tensors: compressed-tensors'
  own matching and decompressor) with the L·R adapter applied through peft; its perplexity must be
  within ±0.5 % of ``vllm``'s (``export_vs_vllm_percent``, ``within_0_5_percent``).
Protocol: lqkit's fixed one (40 windows x 512 tokens of WikiText-2 test, BOS first, fp32, CPU);
calibration 64 x 512 tokens of the bundled WikiText-2 validation split (`lqkit compress` defaults).

Writes bench/results/export-<model>.json after every row (resumable; --only REGEX, --fresh).

    nice -n 5 python bench/export.py                                   # the four budgets, default model
    python bench/export.py --model DIR --budgets 3.5 --windows 2 --calib-samples 4 --calib-seqlen 64 \\
        --out /tmp/export-tiny.json                                    # smoke, any local model
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, base_parser, machine_info, write_json  # noqa: E402

from lqkit import pipeline
from lqkit.allocate import AllocationConfig, Budget
from lqkit.calibrate import CalibConfig
from lqkit.core.costs import CandidateSet
from lqkit.data import read_text
from lqkit.evaluate import EvalProtocol, perplexity
from lqkit.export import export, load_compressed_tensors
from lqkit.models import load_tokenizer

BUDGETS = (2.5, 3.0, 3.5, 4.25)
TOLERANCE = 0.5  # percent: the exported folder against the checkpoint it came from


def compress_row(model, budget: float, target: str | None, out: Path, proto, calib) -> dict:
    t0 = time.time()
    cfg = AllocationConfig(Budget(budget), CandidateSet(target=target))
    res = pipeline.compress(model, cfg, str(out), overwrite=True, eval_protocol=proto, calib=calib, progress=True)
    a = res.allocation
    return {"budget": budget, "target": target, "perplexity": res.eval.perplexity, "nll": res.eval.nll,
            "effective_bits": res.summary.effective_bits, "achieved_bits_per_param": a["achieved_bits_per_param"],
            "objective": a["objective"], "ties": len(a.get("ties", [])),
            "schemes": sorted({s.quant.label() for s in res.plan.values() if s.quant is not None}),
            "ranks": sorted({s.rank for s in res.plan.values()}), "seconds": round(time.time() - t0, 1)}


def export_row(ckpt: Path, out: Path, text: str, proto) -> dict:
    import peft

    t0 = time.time()
    r = export(ckpt, out, "compressed-tensors", overwrite=True)
    model = load_compressed_tensors(out)
    if r.adapter:
        model = peft.PeftModel.from_pretrained(model, r.adapter).eval()
    ev = perplexity(model, load_tokenizer(str(out)), text, proto, progress=True)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    return {"perplexity": ev.perplexity, "nll": ev.nll, "schemes": r.schemes, "lora_modules": r.lora_modules,
            "ranks": r.ranks, "folder_bytes": size, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--model", default=None, help="HF folder or id (default: google/gemma-3-270m)")
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--work", default=None, help="folder for the checkpoints and exports (default: a temporary one)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/export-<model>.json)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    label = Path(a.model.rstrip("/")).name if a.model else "gemma-3-270m"
    out = Path(a.out) if a.out else RESULTS / f"export-{label}.json"
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    calib = CalibConfig(samples=a.calib_samples, seqlen=a.calib_seqlen)
    text, _ = read_text(None)
    data = json.loads(out.read_text()) if out.exists() and not a.fresh else {"rows": {}}
    data.update(model=a.model or "google/gemma-3-270m", tolerance_percent=TOLERANCE,
                protocol={"windows": a.windows, "window_tokens": 512, "text": "WikiText-2 raw test (bundled)",
                          "dtype": "float32", "calibration": f"{a.calib_samples} x {a.calib_seqlen} tokens"})
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="lqkit-bench-export-"))
    try:
        for b in (float(x) for x in a.budgets.split(",")):
            key = f"{b:g}"
            if a.only and not re.search(a.only, f"budget-{key}"):
                continue
            row = data["rows"].get(key, {})
            if "free" not in row:
                row["free"] = compress_row(a.model, b, None, work / f"free-{key}", proto, calib)
                shutil.rmtree(work / f"free-{key}", ignore_errors=True)
            if "vllm" not in row or "export" not in row:
                row["vllm"] = compress_row(a.model, b, "vllm", work / f"vllm-{key}", proto, calib)
                row["export"] = export_row(work / f"vllm-{key}", work / f"vllm-{key}-ct", text, proto)
            d = 100 * (row["export"]["perplexity"] / row["vllm"]["perplexity"] - 1)
            row.update(export_vs_vllm_percent=round(d, 4), within_0_5_percent=abs(d) <= TOLERANCE,
                       vllm_vs_free_percent=round(100 * (row["vllm"]["perplexity"] / row["free"]["perplexity"] - 1), 3))
            data["rows"][key] = row
            data["machine"] = machine_info()
            data["versions"] = {m: __import__(m).__version__ for m in ("compressed_tensors", "peft")}
            write_json(out, data)
            logging.info("budget %s: free %.3f, vllm %.3f, export %.3f (%+.3f %%)", key, row["free"]["perplexity"],
                         row["vllm"]["perplexity"], row["export"]["perplexity"], d)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
