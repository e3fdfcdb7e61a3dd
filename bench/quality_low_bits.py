"""Quality at 2-4.25 bits: lqkit's budget plans with and without the input rotation as a candidate
dimension, on two texts, on the default model (google/gemma-3-270m, fp32, CPU, fixed protocol: 40
windows x 512 tokens, BOS first).

Texts: WikiText-2 test (bundled) and a second text of another kind, KJV narrative prose (bundled,
public domain; src/lqkit/data/ATTRIBUTION.md), so that a gain that is only adaptation to WikiText
shows. Calibration uses only the WikiText-2 validation text (64 x 512 tokens, bench/sensitivity.py's
cached statistics).

Variants (rows are (variant, budget)):
- ``plan``: today's budget plan over the candidate set;
- ``plan+rot``: the same candidates, each also tried on the rotated matrix (``rotations=(False, True)``),
  the integer program choosing per matrix;
- ``plan+distill``, ``plan+rot+distill``: the same compressed model saved as a checkpoint, then
  ``lqkit distill`` (``lqkit.distill.distill``: block-wise output matching against the uncompressed
  model, ``--distill-kl`` end-to-end KL steps after) on WikiText-2 validation windows, at the same
  bits; the distilled checkpoint is loaded and evaluated.

Each variant's cost table is computed once (cached as ``lqkit compress`` caches it) and its time
recorded; each row is then a solve, a compression and two evaluations. ``--candidates compact``
(default: the demo's set, rtn/nf/gptq x 2/3/4/8 bits x groups 64/128 along "in" x ranks 0/16) keeps a
run within an hour on 2 cores; ``--candidates default`` is ``lqkit compress --budget``'s set.
Compression uses the fixed statistics unless ``--sequential``.

    python bench/quality_low_bits.py [--budgets 2.5,3.0,3.5,2.25,4.25] [--only REGEX] [--fresh]

``--keep`` leaves each distilled row's checkpoints (before and after) in ``--work`` for further probes
(e.g. ``bench/kl_probe.py``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocation import plan_mix, seq_ids  # noqa: E402
from common import RESULTS, base_parser, fmt_ppl, machine_info, write_json, write_text  # noqa: E402
from sensitivity import get_stats  # noqa: E402

from lqkit.allocate import AllocationConfig, Budget, allocate, cost_table
from lqkit.compress import compress_model, size_summary
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.core.costs import CandidateSet
from lqkit.data import read_text
from lqkit.demo import DEMO_CANDIDATES
from lqkit.distill import DistillConfig
from lqkit.evaluate import EvalProtocol, perplexity, tokenize
from lqkit.models import load_model
from lqkit.plan import uniform_plan

OUT = RESULTS / "quality-low-bits-gemma-3-270m.json"
BUDGETS = (2.5, 3.0, 3.5, 2.25, 4.25)  # most telling first
TEXTS = {"wikitext2": None, "kjv": "kjv-narrative.txt"}
TARGETS = {2.25: 90, 2.5: 60, 3.0: 36, 3.5: 31, 4.25: 27}  # the issue's, WikiText-2 test
CANDIDATES = {"compact": DEMO_CANDIDATES, "default": CandidateSet()}


def texts() -> dict[str, str]:
    from lqkit.data import DEFAULT_EVAL_TEXT

    return {k: read_text(None, v or DEFAULT_EVAL_TEXT)[0] for k, v in TEXTS.items()}


def evaluate_all(model, tok, txts: dict[str, str], proto: EvalProtocol) -> dict:
    res = {}
    for k, t in txts.items():
        r = perplexity(model, tok, t, proto, progress=False, ids=tokenize(tok, t), materialize=True)
        res[k] = {"perplexity": r.perplexity, "eval_seconds": round(r.seconds, 1)}
    return res


def variants(base: CandidateSet) -> dict[str, CandidateSet]:
    plain, rot = replace(base, rotations=(False,)), replace(base, rotations=(False, True))
    return {"plan": plain, "plan+rot": rot, "plan+distill": plain, "plan+rot+distill": rot}


def distilled(model, tok, plan, cfg: DistillConfig, work: Path, keep: bool = False) -> tuple[torch.nn.Module, dict]:
    """``model`` (compressed by ``plan``) saved, distilled by ``lqkit.distill.distill`` against the default
    model, and loaded again: (the distilled model, what the distillation reported). ``keep``: both
    checkpoints stay in ``work`` (else it is removed)."""
    from lqkit import checkpoint
    from lqkit.distill import distill
    from lqkit.models import DEFAULT_MODEL

    shutil.rmtree(work, ignore_errors=True)
    checkpoint.save(model, tok, work / "ck", plan=plan, extra={"source_model": DEFAULT_MODEL})
    res = distill(work / "ck", work / "distilled", cfg, device="cpu", progress=True)
    out = checkpoint.load(work / "distilled", dtype=torch.float32, device="cpu")
    rep = res.extra["distill"]
    blocks = rep.get("blocks") or []
    summary = {"config": cfg.to_dict(), "seconds": rep.get("seconds"), "heldout_nll": rep.get("heldout_nll"),
               "kl": rep.get("kl"), "blocks_kept": sum(1 for b in blocks if b.get("kept")), "blocks": len(blocks)}
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out, summary


def row_md(r: dict) -> str:
    p = r["perplexity"]
    tgt = TARGETS.get(r.get("budget"))
    return (f"| {r['variant']} | {r.get('budget', '-')} | {r.get('effective_bits', 32):.3f} | {fmt_ppl(p['wikitext2'])} "
            f"| {fmt_ppl(p['kjv'])} | {tgt if tgt else '-'} | {r.get('rotated', '-')} | {r.get('compress_seconds', '-')} |")


def table_md(rows: list[dict]) -> str:
    lines = ["| variant | budget | bits/param | WikiText-2 ppl | KJV ppl | issue target (WikiText-2) | rotated matrices "
             "| compress s |", "|---|---|---|---|---|---|---|---|"]
    rows = sorted(rows, key=lambda r: (r.get("budget", 0), r["variant"]))
    return "\n".join(lines + [row_md(r) for r in rows]) + "\n"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    ap.add_argument("--candidates", default="compact", choices=sorted(CANDIDATES))
    ap.add_argument("--variants", default="plan,plan+rot")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--sequential", action="store_true", help="each block's H from the compressed blocks before it")
    ap.add_argument("--int-zero", action="store_true",
                    help="rtn/gptq candidates with integer zero points (QuantSpec.int_zero: same values, fewer bits)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--distill-steps", type=int, default=40, help="distill variants: block-wise steps per block")
    ap.add_argument("--distill-samples", type=int, default=32, help="distill variants: training windows")
    ap.add_argument("--distill-seqlen", type=int, default=256, help="distill variants: tokens per window")
    ap.add_argument("--distill-kl", type=int, default=0, help="distill variants: end-to-end KL steps after")
    ap.add_argument("--distill-kl-lr", type=float, default=DistillConfig.kl_lr,
                    help="distill variants: KL learning rate")
    ap.add_argument("--distill-kl-batch", type=int, default=DistillConfig.kl_batch_size,
                    help="distill variants: windows per KL step")
    ap.add_argument("--distill-heldout", type=int, default=4,
                    help="distill variants: held-out windows (never trained on)")
    ap.add_argument("--work", default="/tmp/lqkit-quality-low-bits", help="distill variants: checkpoints go here")
    ap.add_argument("--keep", action="store_true",
                    help="distill variants: keep each row's checkpoints (WORK/VARIANT-BUDGET/ck and .../distilled)")
    a = ap.parse_args()
    dcfg = DistillConfig(steps=a.distill_steps, samples=a.distill_samples, seqlen=a.distill_seqlen,
                         heldout=a.distill_heldout, kl_steps=a.distill_kl, kl_lr=a.distill_kl_lr,
                         kl_batch_size=a.distill_kl_batch)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(a.out)
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    txts = texts()
    data = json.loads(out.read_text()) if out.exists() and not a.fresh else {"rows": [], "tables": {}}
    data.update(model="google/gemma-3-270m", candidates=a.candidates, sequential=a.sequential, int_zero=a.int_zero,
                protocol={"windows": a.windows, "window_tokens": 512, "dtype": "float32",
                          "texts": {"wikitext2": "WikiText-2 raw test (bundled)",
                                    "kjv": "KJV narrative prose (bundled, public domain)"},
                          "calibration": "WikiText-2 validation, 64 x 512 tokens"})
    done = {(r["variant"], r.get("budget")) for r in data["rows"]}

    def save() -> None:
        data["machine"] = machine_info()
        write_json(out, data)
        write_text(out.with_suffix(".md"), table_md(data["rows"]))

    if ("fp32", None) not in done:
        loaded = load_model(None)
        data["rows"].append({"variant": "fp32", "perplexity": {k: v["perplexity"] for k, v in
                                                            evaluate_all(loaded.model, loaded.tokenizer, txts, proto).items()}})
        save()
    stats = get_stats(progress=True)
    for vname, cands in variants(replace(CANDIDATES[a.candidates], int_zero=a.int_zero)).items():
        if vname not in a.variants.split(","):
            continue
        budgets = [float(b) for b in a.budgets.split(",")
                   if (vname, float(b)) not in done and not (a.only and not re.search(a.only, f"{vname}-{b}"))]
        if not budgets:
            continue
        loaded = load_model(None)
        names = list(uniform_plan(loaded.model, MatrixSpec("quant", QuantSpec())))
        t0 = time.time()
        table, cached = cost_table(loaded.model, stats, names, cands, "kfac", progress=True)
        data["tables"][vname] = {"key": table.key, "seconds": table.seconds, "cached_on_this_run": cached,
                                 "load_or_compute_seconds": round(time.time() - t0, 1),
                                 "front_candidates": sum(len(c.specs) for c in table.costs)}
        save()
        del loaded
        for b in budgets:
            logging.info("%s at %g bits/param", vname, b)
            loaded = load_model(None)
            alloc = allocate(table, AllocationConfig(Budget(b), cands, "kfac"), table_cached=True)
            t1 = time.time()
            compress_model(loaded.model, alloc.plan, progress=False, stats=stats,
                           sequential=seq_ids(loaded.tokenizer, a.sequential))
            row = {"variant": vname, "budget": b, "compress_seconds": round(time.time() - t1, 1),
                   "effective_bits": size_summary(loaded.model).effective_bits, "plan_mix": plan_mix(alloc.plan),
                   "rotated": sum(1 for s in alloc.plan.values() if getattr(s, "rotation", None) is not None),
                   "matrices": len(alloc.plan)}
            model = loaded.model
            if vname.endswith("+distill"):
                t2 = time.time()
                model, row["distill"] = distilled(model, loaded.tokenizer, alloc.plan, dcfg,
                                                   Path(a.work) / f"{vname}-{b:g}" if a.keep else Path(a.work), a.keep)
                row["distill_seconds"] = round(time.time() - t2, 1)
                row["effective_bits_after_distill"] = size_summary(model).effective_bits
            ev = evaluate_all(model, loaded.tokenizer, txts, proto)
            row["perplexity"] = {k: v["perplexity"] for k, v in ev.items()}
            row["eval_seconds"] = {k: v["eval_seconds"] for k, v in ev.items()}
            logging.info("%s %g: %.3f bits, ppl %s", vname, b, row["effective_bits"], row["perplexity"])
            data["rows"] = [r for r in data["rows"] if (r["variant"], r.get("budget")) != (vname, b)] + [row]
            save()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
