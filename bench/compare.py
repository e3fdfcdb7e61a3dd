"""Side-by-side summary of lqkit's budget plans against existing tools and lqkit's uniform configurations,
from results already measured under the same protocol on the same machine (nothing is recomputed):

- bench/results/allocation-gemma-3-270m.json (bench/allocation.py): lqkit budget plans and uniform
  data-aware configurations;
- bench/results/peers-gemma-3-270m.json (bench/peers.py): HQQ, GPTQModel, peft NF / LoftQ, bitsandbytes;
- bench/results/quality-gemma-3-270m.json (bench/quality.py): lqkit's data-free RTN / NF rows (the
  "RTN (lqkit)" series; bench/peers.py computes the same RTN and is not rerun for it).

For every peer configuration it names the lqkit budget plan with the same or fewer effective bits
(the largest budget not above the peer's bits) and says whether that plan has lower perplexity. For
every budget it names the best uniform lqkit configuration that fits in it. Writes
bench/results/compare-gemma-3-270m.md and the Pareto plot bench/results/pareto-gemma-3-270m.png.

    python bench/compare.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fmt_ppl, write_text  # noqa: E402

ALLOC = RESULTS / "allocation-gemma-3-270m.json"
PEERS = RESULTS / "peers-gemma-3-270m.json"
QUALITY = RESULTS / "quality-gemma-3-270m.json"
EPS = 1e-9


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _ok(r: dict) -> bool:
    return not r.get("error") and r.get("perplexity") is not None and math.isfinite(r["perplexity"])


def quality_rows() -> list[dict]:
    """lqkit's data-free uniform rows of bench/quality.py as peer-style rows (input-dim groups)."""
    out = []
    for r in _rows(QUALITY):
        spec = r.get("spec") or {}
        q = spec.get("quant") or {}
        if spec.get("method") == "quant" and q.get("method") in ("rtn", "nf") and q.get("group_dim") == "in":
            tool = "RTN (lqkit)" if q["method"] == "rtn" else "NF (lqkit)"
            out.append({"name": r["name"], "tool": tool, "effective_bits": r["effective_bits"],
                        "perplexity": r["perplexity"], "source": "bench/quality.py"})
    return out


def peer_rows() -> list[dict]:
    rows = [r for r in _rows(PEERS) if _ok(r) and r.get("tool") != "full precision"]
    return rows + [r for r in quality_rows() if _ok(r)]


def table(alloc: list[dict], peers: list[dict]) -> str:
    budgets = sorted((r for r in alloc if r["kind"] == "budget" and _ok(r)), key=lambda r: r["budget"])
    uniform = [r for r in alloc if r["kind"] == "uniform" and _ok(r)]
    lines = ["### lqkit budget plans vs the best uniform lqkit configuration that fits", "",
             "| budget | achieved bits | lqkit plan ppl | best uniform lqkit ≤ budget | its bits | its ppl | plan better |",
             "|---|---|---|---|---|---|---|"]
    for b in budgets:
        fit = [u for u in uniform if u["effective_bits"] <= b["budget"] + EPS]
        best = min(fit, key=lambda u: u["perplexity"]) if fit else None
        if best:
            lines.append(f"| {b['budget']:g} | {b['effective_bits']:.3f} | {fmt_ppl(b['perplexity'])} | {best['name']} "
                         f"| {best['effective_bits']:.3f} | {fmt_ppl(best['perplexity'])} "
                         f"| {'yes' if b['perplexity'] < best['perplexity'] else '**no**'} |")
        else:
            lines.append(f"| {b['budget']:g} | {b['effective_bits']:.3f} | {fmt_ppl(b['perplexity'])} | (none fits) | | | |")
    lines += ["", "### Every peer configuration vs the lqkit budget plan with the same or fewer bits", "",
              "| tool | configuration | effective bits | perplexity | lqkit plan (budget) | its bits | its ppl | lqkit better |",
              "|---|---|---|---|---|---|---|---|"]
    wins = total = 0
    for p in sorted(peers, key=lambda r: (r["effective_bits"], r["tool"])):
        fit = [b for b in budgets if b["effective_bits"] <= p["effective_bits"] + EPS]
        if not fit:
            lines.append(f"| {p['tool']} | {p['name']} | {p['effective_bits']:.3f} | {fmt_ppl(p['perplexity'])} "
                         "| (no plan at ≤ these bits) | | | |")
            continue
        b = fit[-1]
        better = b["perplexity"] < p["perplexity"]
        wins += better
        total += 1
        lines.append(f"| {p['tool']} | {p['name']} | {p['effective_bits']:.3f} | {fmt_ppl(p['perplexity'])} "
                     f"| {b['budget']:g} | {b['effective_bits']:.3f} | {fmt_ppl(b['perplexity'])} "
                     f"| {'yes' if better else '**no**'} |")
    lines += ["", f"lqkit's plan at the same or fewer bits has lower perplexity than {wins} of {total} peer "
              "configurations compared."]
    return "\n".join(lines) + "\n"


def main() -> None:
    alloc, peers = _rows(ALLOC), peer_rows()
    md = table(alloc, peers)
    out = RESULTS / "compare-gemma-3-270m.md"
    write_text(out, md)
    print(md)
    from peers import plot  # noqa: E402  (matplotlib only needed here)

    fp = [r for r in _rows(PEERS) if r.get("tool") == "full precision"]
    plot(fp + peers, alloc, RESULTS / "pareto-gemma-3-270m.png")
    print(f"wrote {out} and {RESULTS / 'pareto-gemma-3-270m.png'}")


if __name__ == "__main__":
    main()
