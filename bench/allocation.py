"""Allocation benchmark: lqkit's budget plans against the best uniform lqkit configurations on the
default model (google/gemma-3-270m), fixed protocol (40 windows x 512 tokens of WikiText-2 test,
BOS first, fp32, CPU; only the linear layers inside the decoder blocks are compressed).

Calibration statistics: 64 x 512 tokens of the bundled WikiText-2 validation split (cached, as
bench/sensitivity.py). The cost table of the default candidate set is computed once and cached;
each budget row is then a solve, a compression with the plan and an evaluation. Compression is
sequential (as `lqkit compress`: each block's H recomputed from the already compressed blocks)
wherever a plan uses H; --no-sequential uses the fixed statistics.

Writes bench/results/allocation-gemma-3-270m.json after every row and a Markdown table beside it
(resumable; --only REGEX, --fresh). Plan pictures: bench/results/plan-gemma-3-270m-<budget>.png.

    nice -n 5 python bench/allocation.py [--only 'budget'] [--metric kfac]
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, base_parser, fmt_ppl, machine_info, write_json, write_text  # noqa: E402
from sensitivity import CALIB, get_stats  # noqa: E402

from lqkit.allocate import AllocationConfig, Budget, allocate, cost_table
from lqkit.calibrate import calibration_ids
from lqkit.compress import compress_model, needed_stats, size_summary
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.core.costs import CandidateSet
from lqkit.data import DEFAULT_CALIB_TEXT, read_text
from lqkit.evaluate import EvalProtocol, perplexity, tokenize
from lqkit.models import load_model
from lqkit.plan import uniform_plan
from lqkit.report import plan_png

OUT = RESULTS / "allocation-gemma-3-270m.json"
BUDGETS = (2.25, 2.5, 2.75, 3.0, 3.5, 4.25)


def uniform_configs() -> dict[str, MatrixSpec]:
    """The uniform lqkit configurations a budget plan must beat: lqkit's best quantizers (GPTQ with
    act-order and MSE range search, SqueezeLLM-style NUQ) and data-aware LoRC, one spec for every
    matrix (approximate bits/param in the comments). Data-free uniform configurations (RTN, NF4, HQQ,
    ...) are the rows of bench/peers.py and bench/quality.py, under the same protocol."""
    def g(b, gs=128, **kw):
        return QuantSpec("gptq", b, gs, act_order=True, clip=True, **kw)

    return {  # most telling first
        "gptq2-g128": MatrixSpec("quant", g(2)),  # 2.25
        "gptq2-g64": MatrixSpec("quant", g(2, 64)),  # 2.5
        "gptq3-g128": MatrixSpec("quant", g(3)),  # 3.25
        "gptq4-g128": MatrixSpec("quant", g(4)),  # 4.25
        "gptq3-g64": MatrixSpec("quant", g(3, 64)),  # 3.5
        "nuq3": MatrixSpec("quant", QuantSpec("nuq", 3)),  # ~3.2
        "lorc-gptq2-g128-r16-kfac": MatrixSpec("lorc", g(2), 16, weighting="kfac"),  # ~2.86
        "lorc-gptq2-g128-r8-kfac": MatrixSpec("lorc", g(2), 8, weighting="kfac"),  # ~2.55
        "nuq2": MatrixSpec("quant", QuantSpec("nuq", 2)),  # ~2.1
        "gptq2-g32": MatrixSpec("quant", g(2, 32)),  # 3.0
    }


def _evaluate(model, tok, text, proto) -> dict:
    r = perplexity(model, tok, text, proto, progress=False, ids=tokenize(tok, text), materialize=True)
    return {"perplexity": r.perplexity, "eval_seconds": round(r.seconds, 1), "windows": r.windows,
            "window_tokens": r.window_tokens}


def plan_mix(plan) -> dict[str, int]:
    c = Counter(f"{s.quant.method}{s.quant.bits}/g{s.quant.group_size}{s.quant.group_dim}"
                f"{'+sp' + format(s.quant.outliers, 'g') if s.quant.outliers else ''}"
                f"{'+r' + str(s.rank) if s.rank else ''}" for s in plan.values())
    return dict(c.most_common())


def seq_ids(tok, sequential: bool):
    """Calibration windows for sequential compression (each block's H from the compressed blocks before it)."""
    return calibration_ids(tok, read_text(None, DEFAULT_CALIB_TEXT)[0], CALIB) if sequential else None


def run_budget(budget: float, table, config: AllocationConfig, stats, text, proto, sequential: bool) -> dict:
    loaded = load_model(None)
    alloc = allocate(table, AllocationConfig(Budget(budget), config.candidates, config.metric,
                                             refine_iters=config.refine_iters), table_cached=True)
    t0 = time.time()
    reports = compress_model(loaded.model, alloc.plan, progress=False, stats=stats,
                             sequential=seq_ids(loaded.tokenizer, sequential))
    row = {"name": f"budget-{budget:g}", "kind": "budget", "budget": budget, "sequential": sequential,
           "compress_seconds": round(time.time() - t0, 1),
           "effective_bits": size_summary(loaded.model).effective_bits, "plan_mix": plan_mix(alloc.plan)}
    rep = alloc.report()
    row["allocation"] = {k: rep[k] for k in ("achieved_bits_per_param", "objective", "solver_status", "optimal",
                                             "solver_seconds", "variables", "metric", "refine_iters")}
    row["mean_rel_error"] = sum(r.error for r in reports.values()) / len(reports)
    row.update(_evaluate(loaded.model, loaded.tokenizer, text, proto))
    png = plan_png(alloc.plan, {n: r.shape for n, r in reports.items()},
                   f"gemma-3-270m, budget {budget:g} -> {row['effective_bits']:.3f} bits/param, ppl {row['perplexity']:.1f}")
    (RESULTS / f"plan-gemma-3-270m-{budget:g}.png").write_bytes(png)
    return row


def run_uniform(name: str, spec: MatrixSpec, stats, text, proto, sequential: bool) -> dict:
    loaded = load_model(None)
    t0 = time.time()
    plan = uniform_plan(loaded.model, spec)
    sequential = sequential and "h" in needed_stats(plan)
    compress_model(loaded.model, plan, progress=False, stats=stats, sequential=seq_ids(loaded.tokenizer, sequential))
    row = {"name": name, "kind": "uniform", "label": spec.label(), "sequential": sequential,
           "compress_seconds": round(time.time() - t0, 1),
           "effective_bits": size_summary(loaded.model).effective_bits}
    row.update(_evaluate(loaded.model, loaded.tokenizer, text, proto))
    return row


def table_md(rows: list[dict]) -> str:
    uni = [r for r in rows if r["kind"] == "uniform"]
    lines = ["| budget (bits/param) | achieved bits | perplexity | best uniform lqkit at ≤ budget | its bits | its perplexity "
             "| plan (most used) |", "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["kind"] == "budget"), key=lambda r: r["budget"]):
        fit = [u for u in uni if u["effective_bits"] <= r["budget"] + 1e-9]
        best = min(fit, key=lambda u: u["perplexity"]) if fit else None
        mix = ", ".join(f"{k} ×{v}" for k, v in list(r["plan_mix"].items())[:4])
        b = f"{best['name']} | {best['effective_bits']:.3f} | {fmt_ppl(best['perplexity'])}" if best else "- | - | -"
        lines.append(f"| {r['budget']:g} | {r['effective_bits']:.3f} | {fmt_ppl(r['perplexity'])} | {b} | {mix} |")
    lines += ["", "| uniform config | spec | effective bits | perplexity | compress time (s) |", "|---|---|---|---|---|"]
    for u in sorted(uni, key=lambda u: u["effective_bits"]):
        lines.append(f"| {u['name']} | `{u['label']}` | {u['effective_bits']:.3f} | {fmt_ppl(u['perplexity'])} | "
                     f"{u['compress_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--metric", default="kfac", choices=("kfac", "hessian", "fisher"))
    ap.add_argument("--refine", type=int, default=0, help="LQ refinement iterations of low-rank matrices")
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--no-sequential", action="store_true", help="fixed statistics instead of sequential compression")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(a.out)
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    text, _ = read_text(None)
    data = json.loads(out.read_text()) if out.exists() and not a.fresh else {"rows": []}
    stats = get_stats(progress=True)
    config = AllocationConfig(Budget(3.0), CandidateSet(), a.metric, refine_iters=a.refine)
    loaded = load_model(None)
    names = list(uniform_plan(loaded.model, MatrixSpec("quant", QuantSpec())))
    t0 = time.time()
    table, cached = cost_table(loaded.model, stats, names, config.candidates, config.metric, progress=True)
    del loaded
    data.update(model="google/gemma-3-270m", metric=a.metric, refine_iters=a.refine,
                candidates=config.candidates.to_dict(), stats=stats.meta,
                table={"key": table.key, "seconds": table.seconds, "cached_on_this_run": cached,
                       "load_or_compute_seconds": round(time.time() - t0, 1),
                       "front_candidates": sum(len(c.specs) for c in table.costs),
                       "evaluated": sum(c.evaluated for c in table.costs)},
                protocol={"windows": a.windows, "window_tokens": 512, "text": "WikiText-2 raw test (bundled)",
                          "dtype": "float32", "compressed": "every nn.Linear inside the decoder blocks"})
    done = {r["name"] for r in data["rows"]}
    seq = not a.no_sequential
    jobs = [(f"budget-{float(b):g}", lambda b=float(b): run_budget(b, table, config, stats, text, proto, seq))
            for b in a.budgets.split(",")]
    jobs += [(n, lambda n=n, s=s: run_uniform(n, s, stats, text, proto, seq)) for n, s in uniform_configs().items()]
    for name, job in jobs:
        if name in done or (a.only and not re.search(a.only, name)):
            continue
        logging.info("running %s", name)
        row = job()
        logging.info("%s: %.3f bits, ppl %.3f", name, row["effective_bits"], row["perplexity"])
        data["rows"] = [r for r in data["rows"] if r["name"] != name] + [row]
        data["machine"] = machine_info()
        write_json(out, data)
        write_text(out.with_suffix(".md"), table_md(data["rows"]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
