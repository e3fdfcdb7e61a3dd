"""Sensitivity benchmark: data-aware quantizers and decompositions against their data-free
baselines on the default model (google/gemma-3-270m), under the protocol of bench/quality.py
(40 windows x 512 tokens of WikiText-2 test, BOS first, fp32, CPU; only the linear layers inside
the decoder blocks are compressed). Rows that use H compress sequentially (each block's H from the
already compressed blocks, as `lqkit compress` does).

Calibration statistics (H and Fisher; 64 x 512 tokens of the bundled WikiText-2 validation split)
are computed once and cached in $LQKIT_CACHE/stats/. Baseline rows (RTN, plain LQ/LoRC) are taken
from bench/results/quality-gemma-3-270m.json when that file has them, else run here.

Writes bench/results/sensitivity-gemma-3-270m.json after every row and a Markdown table beside it;
rows already present are skipped (resumable). --only REGEX runs a subset.

    nice -n 5 python bench/sensitivity.py [--only 'gptq'] [--fresh]
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, base_parser, fmt_ppl, machine_info, write_json, write_text  # noqa: E402

from lqkit import checkpoint
from lqkit.calibrate import CalibConfig, calibrate, calibration_ids
from lqkit.compress import compress_model, needed_stats, size_summary
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.data import DEFAULT_CALIB_TEXT, read_text
from lqkit.evaluate import EvalProtocol, perplexity, tokenize
from lqkit.models import cache_dir, load_model
from lqkit.plan import uniform_plan

OUT = RESULTS / "sensitivity-gemma-3-270m.json"
QUALITY = RESULTS / "quality-gemma-3-270m.json"
CALIB = CalibConfig(samples=64, seqlen=512)
RANK = 8


def stats_path() -> Path:
    return cache_dir() / "stats" / f"gemma-3-270m-calib{CALIB.samples}x{CALIB.seqlen}.safetensors"


def load_stats(path: str | None, progress: bool):
    """Statistics from ``path`` (e.g. H only, from `lqkit calibrate --no-fisher`), else the cached
    full statistics (computed and cached on first use)."""
    return checkpoint.load_stats(path) if path else get_stats(progress)


def q(method, bits, g=128, **kw) -> QuantSpec:
    return QuantSpec(method, bits, g, **kw)


def configs() -> dict[str, tuple[MatrixSpec, str]]:
    """Row name -> (spec, baseline row name), most informative first."""
    r = RANK
    best = dict(act_order=True, clip=True)  # lqkit's GPTQ as the allocation uses it
    return {
        "gptq3-g128": (MatrixSpec("quant", q("gptq", 3)), "rtn3-g128-in"),
        "gptq3-g128-ao-mse": (MatrixSpec("quant", q("gptq", 3, **best)), "rtn3-g128-mse"),
        "gptq2-g128": (MatrixSpec("quant", q("gptq", 2)), "rtn2-g128-in"),
        "gptq2-g128-ao-mse": (MatrixSpec("quant", q("gptq", 2, **best)), "rtn2-g128-mse"),
        "gptq3-g64": (MatrixSpec("quant", q("gptq", 3, 64)), "rtn3-g64-in"),
        "gptq2-g64": (MatrixSpec("quant", q("gptq", 2, 64)), "rtn2-g64-in"),
        "gptq3-g128-ao": (MatrixSpec("quant", q("gptq", 3, act_order=True)), "gptq3-g128"),
        "nuq3": (MatrixSpec("quant", q("nuq", 3)), "rtn3-g128-in"),
        "nuq2": (MatrixSpec("quant", q("nuq", 2)), "rtn2-g128-in"),
        "rtn3-g128-sp0.5%": (MatrixSpec("quant", q("rtn", 3, outliers=0.005)), "rtn3-g128-in"),
        "gptq3-g128-sp0.5%": (MatrixSpec("quant", q("gptq", 3, outliers=0.005)), "gptq3-g128"),
        "nuq3-sp0.5%": (MatrixSpec("quant", q("nuq", 3, outliers=0.005)), "nuq3"),
        f"lq-rtn3-g128-r{r}-fisher": (MatrixSpec("lq", q("rtn", 3), r, weighting="fisher"), f"lq-rtn3-g128-r{r}"),
        f"lq-rtn3-g128-r{r}-hessian": (MatrixSpec("lq", q("rtn", 3), r, weighting="hessian"), f"lq-rtn3-g128-r{r}"),
        f"lq-rtn3-g128-r{r}-kfac": (MatrixSpec("lq", q("rtn", 3), r, weighting="kfac"), f"lq-rtn3-g128-r{r}"),
        f"lorc-rtn3-g128-r{r}-fisher": (MatrixSpec("lorc", q("rtn", 3), r, weighting="fisher"), f"lorc-rtn3-g128-r{r}"),
        f"lorc-rtn3-g128-r{r}-hessian": (MatrixSpec("lorc", q("rtn", 3), r, weighting="hessian"),
                                         f"lorc-rtn3-g128-r{r}"),
        f"lorc-gptq3-g128-r{r}-kfac": (MatrixSpec("lorc", q("gptq", 3, **best), r, weighting="kfac"),
                                       f"lorc-rtn3-g128-r{r}"),
        "rtn3-g128-auto-hessian": (MatrixSpec("quant", q("rtn", 3, group_dim="auto"), weighting="hessian"),
                                   "rtn3-g128-in"),
        "rtn3-g128-outfeat1%": (MatrixSpec("quant", q("rtn", 3, outlier_features=0.01)), "rtn3-g128-in"),
    }


def baseline_specs() -> dict[str, MatrixSpec]:
    """The data-free baselines, as bench/quality.py defines them (run here only if missing there)."""
    b = {f"{m}-rtn3-g128-r{RANK}": MatrixSpec(m, q("rtn", 3), RANK) for m in ("lq", "lorc")}
    for bits in (3, 2):
        for g in (128, 64):
            b[f"rtn{bits}-g{g}-in"] = MatrixSpec("quant", q("rtn", bits, g))
        b[f"rtn{bits}-g128-mse"] = MatrixSpec("quant", q("rtn", bits, clip=True))
    return b


def get_stats(progress: bool):
    p = stats_path()
    if p.is_file():
        return checkpoint.load_stats(p)
    loaded = load_model(None)
    text, label = read_text(None, DEFAULT_CALIB_TEXT)
    names = list(uniform_plan(loaded.model, MatrixSpec("quant", q("rtn", 4))))
    st = calibrate(loaded.model, loaded.tokenizer, text, names, CALIB, text_label=label,
                   model_label="google/gemma-3-270m", progress=progress)
    checkpoint.save_stats(st, p)
    return st


def run_row(name: str, spec: MatrixSpec, stats, text: str, proto: EvalProtocol) -> dict:
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    row = {"name": name, "spec": spec.to_dict(), "label": spec.label()}
    t0 = time.time()
    plan = uniform_plan(model, spec)
    seq = calibration_ids(tok, read_text(None, DEFAULT_CALIB_TEXT)[0], CALIB) if "h" in needed_stats(plan) else None
    row["sequential"] = seq is not None
    reports = compress_model(model, plan, progress=False, stats=stats, sequential=seq)
    row["compress_seconds"] = round(time.time() - t0, 1)
    row["effective_bits"] = size_summary(model).effective_bits
    row["mean_rel_error"] = sum(r.error for r in reports.values()) / len(reports)
    werr = [r.weighted_error for r in reports.values() if r.weighted_error is not None]
    row["mean_weighted_error"] = sum(werr) / len(werr) if werr else None
    if spec.quant is not None and spec.quant.group_dim == "auto":
        dims = [r.spec.split("/g")[1] for r in reports.values()]
        row["group_dims"] = {d: dims.count(d) for d in sorted(set(dims))}
    r = perplexity(model, tok, text, proto, progress=False, ids=tokenize(tok, text), materialize=True)
    row.update(perplexity=r.perplexity, eval_seconds=round(r.seconds, 1), windows=r.windows,
               window_tokens=r.window_tokens, tokens_scored=r.tokens_scored)
    return row


def table(rows: list[dict], baselines: dict[str, dict]) -> str:
    lines = ["| config | spec | effective bits | perplexity | compress time (s) | baseline | baseline bits | "
             "baseline perplexity | better |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = baselines.get(r["baseline"]) or next((x for x in rows if x["name"] == r["baseline"]), None)
        bcols = (f"{r['baseline']} | {b['effective_bits']:.3f} | {fmt_ppl(b['perplexity'])} | "
                 f"{'yes' if r['perplexity'] < b['perplexity'] else 'no'}") if b else f"{r['baseline']} | - | - | -"
        lines.append(f"| {r['name']} | `{r['label']}` | {r['effective_bits']:.3f} | {fmt_ppl(r['perplexity'])} | "
                     f"{r['compress_seconds']:.0f} | {bcols} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--stats", default=None, help="statistics file to use instead of the cached full one; "
                    "rows that need a Fisher diagonal it lacks are skipped")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    text, _ = read_text(None)
    data = {"rows": [], "baselines": {}}
    if OUT.exists() and not a.fresh:
        data = json.loads(OUT.read_text())
        if data.get("protocol", {}).get("windows") != a.windows:
            data = {"rows": [], "baselines": {}}
    stats = load_stats(a.stats, progress=True)
    data.update(model="google/gemma-3-270m",
                protocol={"windows": a.windows, "window_tokens": 512, "text": "WikiText-2 raw test (bundled)",
                          "dtype": "float32", "compressed": "every nn.Linear inside the decoder blocks"})
    done = {r["name"] for r in data["rows"]}
    for name, (spec, base) in configs().items():
        if name in done or (a.only and not re.search(a.only, name)):
            continue
        if "fisher" in needed_stats({"m": spec}) and not stats.fisher:
            logging.info("skipping %s: the statistics have no Fisher diagonal", name)
            continue
        quality = json.loads(QUALITY.read_text()) if QUALITY.exists() else {"rows": []}
        if quality.get("protocol", {}).get("windows") == a.windows:
            for row in quality["rows"]:
                data["baselines"].setdefault(row["name"], dict(row, source="bench/quality.py"))
        if base not in data["baselines"] and base not in done and base in baseline_specs():
            logging.info("running baseline %s (not in %s)", base, QUALITY.name)
            data["baselines"][base] = dict(run_row(base, baseline_specs()[base], None, text, proto),
                                           source="bench/sensitivity.py")
        logging.info("running %s", name)
        row = dict(run_row(name, spec, stats, text, proto), baseline=base,
                   stats=stats.meta, sensitivity="fisher" if stats.fisher else "diag(H)")
        logging.info("%s: %.3f bits, ppl %.3f (%.0f s compress)", name, row["effective_bits"], row["perplexity"],
                     row["compress_seconds"])
        data["rows"].append(row)
        done.add(name)
        data["machine"] = machine_info()
        write_json(OUT, data)
        write_text(OUT.with_suffix(".md"), table(data["rows"], data["baselines"]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
