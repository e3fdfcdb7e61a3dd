"""Quality benchmark: effective bits, perplexity and compression time of lqkit's methods on the
default model (google/gemma-3-270m) under the fixed evaluation protocol (40 windows x 512 tokens of
WikiText-2 test, BOS first, fp32, CPU).

Writes bench/results/quality-gemma-3-270m.json (rows + machine info) after every row, and a Markdown
table beside it. Rows already in the JSON (same protocol) are skipped, so an interrupted run resumes;
pass --fresh to start over, --only REGEX to run a subset.

    python bench/quality.py [--only 'lq|lorc'] [--fresh]
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

from lqkit.compress import compress_model, size_summary
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.data import read_text
from lqkit.evaluate import EvalProtocol, perplexity, tokenize
from lqkit.models import load_model
from lqkit.plan import uniform_plan

OUT = RESULTS / "quality-gemma-3-270m.json"


def configs() -> dict[str, MatrixSpec | None]:
    """Row name -> spec (None: full precision), most informative first."""
    c: dict[str, MatrixSpec | None] = {"fp32": None}
    rtn = {f"rtn{b}-g{g}-{d}": MatrixSpec("quant", QuantSpec("rtn", b, g, d))
           for b in (4, 3, 2) for g in (128, 64) for d in ("in", "out")}
    for bits in (3, 2):
        c[f"rtn{bits}-g128-in"] = rtn.pop(f"rtn{bits}-g128-in")  # the Q that lq/lorc rows build on
        for rank in (8, 16, 32):
            for method in ("lq", "lorc"):
                c[f"{method}-rtn{bits}-g128-r{rank}"] = MatrixSpec(method, QuantSpec("rtn", bits, 128), rank)
    c.update(rtn)
    c["nf4-g64"] = MatrixSpec("quant", QuantSpec("nf", 4, 64))
    c["nf3-g64"] = MatrixSpec("quant", QuantSpec("nf", 3, 64))
    c["nf4-g64-dq"] = MatrixSpec("quant", QuantSpec("nf", 4, 64, double_quant=True))
    for bits in (3, 2):  # rank 64 costs ~2 extra bits per parameter on this model's small matrices
        for method in ("lq", "lorc"):
            c[f"{method}-rtn{bits}-g128-r64"] = MatrixSpec(method, QuantSpec("rtn", bits, 128), 64)
    return c


def run_row(name: str, spec: MatrixSpec | None, text: str, proto: EvalProtocol) -> dict:
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    row = {"name": name, "spec": spec.to_dict() if spec else None, "label": spec.label() if spec else "fp32"}
    t0 = time.time()
    if spec is not None:
        # decompositions are many small ops: one thread avoids OpenMP barrier stalls on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            reports = compress_model(model, uniform_plan(model, spec), progress=False)
        finally:
            torch.set_num_threads(threads)
        row["compress_seconds"] = round(time.time() - t0, 1)
        row["effective_bits"] = size_summary(model).effective_bits
        row["mean_rel_error"] = sum(r.error for r in reports.values()) / len(reports)
    else:
        row["compress_seconds"] = 0.0
        row["effective_bits"] = 32.0
    r = perplexity(model, tok, text, proto, progress=False, ids=tokenize(tok, text), materialize=True)
    row.update(perplexity=r.perplexity, eval_seconds=round(r.seconds, 1), windows=r.windows,
               window_tokens=r.window_tokens, tokens_scored=r.tokens_scored)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| config | spec | effective bits | perplexity | compress time (s) |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["effective_bits"], r["name"])):
        lines.append(f"| {r['name']} | `{r['label']}` | {r['effective_bits']:.3f} | {fmt_ppl(r['perplexity'])} | {r['compress_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--windows", type=int, default=40)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    text, _ = read_text(None)
    data = {"rows": []}
    if OUT.exists() and not a.fresh:
        data = json.loads(OUT.read_text())
        if data.get("protocol", {}).get("windows") != a.windows:
            data = {"rows": []}
    done = {r["name"] for r in data["rows"]}
    for name, spec in configs().items():
        if name in done or (a.only and not re.search(a.only, name)):
            continue
        logging.info("running %s", name)
        row = run_row(name, spec, text, proto)
        logging.info("%s: %.3f bits, ppl %.3f (%.0f s compress)", name, row["effective_bits"], row["perplexity"],
                     row["compress_seconds"])
        data["rows"].append(row)
        data.update(model="google/gemma-3-270m", protocol={"windows": a.windows, "window_tokens": 512,
                    "text": "WikiText-2 raw test (bundled)", "dtype": "float32"}, machine=machine_info())
        write_json(OUT, data)
        write_text(OUT.with_suffix(".md"), table(data["rows"]))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
