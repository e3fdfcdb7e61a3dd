"""The whole model under one budget (issue 26 item 4): perplexity against the total size of the
checkpoint's tensors on the default model (google/gemma-3-270m, fp32 source, CPU, fixed protocol: 40
windows x 512 tokens of WikiText-2 test, BOS first, the checkpoint reloaded from disk).

Rows, each one `lqkit compress` through the streamed pipeline (64 x 512 calibration tokens of the
bundled WikiText-2 validation text, sequential H) with the demo's compact candidates
(lqkit.demo.DEMO_CANDIDATES) so that a row takes minutes on 2 cores:
- ``linear-3.0``: today's budget, 3.0 bits/param of the linear layers (embedding kept in fp32);
- ``model-<SIZE>``: ``--budget-bytes SIZE --scope model``; the first SIZE is the most a linear-only
  3.0-bit plan's tensors can take (3.0 bits x linear params + every other tensor in fp32), so that the
  two compare at the same checkpoint size.
The rows share one calibration sweep and one cost table (the run cache): the first row pays for them.
Writes bench/results/model-scope-gemma-3-270m.json after every row (resumable; --fresh to redo), a
Markdown table beside it, and bench/results/pareto-size-gemma-3-270m.png (perplexity vs total
tensor MiB; the linear-only budget rows of bench/results/allocation-gemma-3-270m.json, full candidates,
placed at the size their recorded bits give).

    nice -n 10 python bench/model_scope.py [--sizes same,150MiB,120MiB] [--only REGEX] [--fresh]
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, base_parser, fmt_ppl, log, machine_info, write_json, write_text  # noqa: E402

from lqkit import checkpoint, pipeline
from lqkit.allocate import AllocationConfig, Budget, parse_bytes
from lqkit.demo import DEMO_CANDIDATES
from lqkit.evaluate import EvalProtocol

OUT = RESULTS / "model-scope-gemma-3-270m.json"
PLOT = RESULTS / "pareto-size-gemma-3-270m.png"
ALLOC = RESULTS / "allocation-gemma-3-270m.json"
FP32_PPL = 25.37  # the uncompressed model under the same protocol (README, ANCHORS.md)


def tensor_bytes(folder: Path) -> int:
    """Bytes of every tensor in a checkpoint's safetensors files (data only, headers aside)."""
    total = 0
    for f in checkpoint.tensor_files(checkpoint.read_meta(folder)):
        with open(folder / f, "rb") as fh:
            head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__")
    return total


def params() -> dict:
    """{"linear": parameters of the linear layers a budget compresses, "model": every parameter} of the
    default model (tied ones once)."""
    from lqkit.nn.surgery import find_linears
    from lqkit.stream import open_model

    src = open_model(None)
    names = list(find_linears(src.model))
    return {"linear": sum(src.model.get_submodule(n).weight.numel() for n in names),
            "model": sum(p.numel() for p in src.model.parameters())}


def same_size(p: dict, bits: float = 3.0) -> int:
    """The most a linear-only ``bits`` plan's tensors take on the default model (other tensors fp32)."""
    return math.floor(bits * p["linear"]) // 8 + (p["model"] - p["linear"]) * 4


def run_row(name: str, budget: Budget, work: Path) -> dict:
    out = work / name
    t0 = time.time()
    res = pipeline.compress(None, AllocationConfig(budget, DEMO_CANDIDATES), str(out), overwrite=True,
                            eval_protocol=EvalProtocol(), progress=False)
    s, a = res.summary, res.allocation
    meta = checkpoint.read_meta(out)
    row = {"name": name, "budget": budget.to_dict(), "perplexity": res.eval.perplexity,
           "tensor_bytes": tensor_bytes(out), "files_bytes": sum(f["bytes"] for f in meta["files"].values()),
           "model_bits": s.model_bits, "model_bits_per_param": s.model_bits_per_param,
           "linear_bits_per_param": s.effective_bits, "table_bits": s.table_bits, "tables": meta.get("tables", {}),
           "allocation_model": a.get("model"), "stage_seconds": res.stage_seconds, "seconds": round(time.time() - t0, 1)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def table_md(rows: list[dict]) -> str:
    lines = [("| row | budget | tensors (MiB) | whole-model bits/param | linear-layer bits/param | embedding | "
              "WikiText-2 ppl |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["budget"]
        asked = f"{b['bits_per_param']:g} bits" if b["bits_per_param"] is not None else f"{b['bytes']} B"
        emb = next(iter(r["tables"].values()), None)
        emb = "fp32 (kept)" if emb is None else f"int{emb['spec']['bits']} {'sym' if emb['spec']['symmetric'] else 'asym'}/row"
        lines.append(f"| {r['name']} | {asked} ({b['scope']}) | {r['tensor_bytes'] / 2**20:.1f} | "
                     f"{r['model_bits_per_param']:.3f} | {r['linear_bits_per_param']:.3f} | {emb} | "
                     f"{fmt_ppl(r['perplexity'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    model = sorted((r["tensor_bytes"] / 2**20, r["perplexity"]) for r in rows if r["budget"]["scope"] == "model")
    linear = sorted((r["tensor_bytes"] / 2**20, r["perplexity"]) for r in rows if r["budget"]["scope"] == "linear")
    if ALLOC.exists():  # today's linear-only plans (full candidates), at the size their recorded bits give
        other = p["model"] - p["linear"]  # kept in fp32
        pts = sorted(((r["effective_bits"] * p["linear"] / 8 + other * 4) / 2**20, r["perplexity"])
                     for r in json.loads(ALLOC.read_text())["rows"] if r.get("kind") == "budget" and r.get("perplexity"))
        ax.plot(*zip(*pts), color="gray", marker="o", lw=1, label="lqkit linear-only budgets (full candidates)")
    if linear:
        ax.scatter(*zip(*linear), color="C1", marker="s", s=60, zorder=4, label="lqkit linear-only (compact candidates)")
    if model:
        ax.plot(*zip(*model), color="C0", marker="o", lw=2, zorder=5, label="lqkit --scope model (compact candidates)")
    ax.axhline(FP32_PPL, color="gray", ls="--", lw=1, label=f"fp32 ({FP32_PPL})")
    ax.axvline(p["model"] * 2 / 2**20, color="gray", ls=":", lw=1, label="bf16 model size")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint tensors (MiB): every stored byte of the model")
    ax.set_ylabel("WikiText-2 test perplexity (log scale)")
    ax.set_title("google/gemma-3-270m: perplexity vs total checkpoint size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--sizes", default="same,150MiB", help="whole-model budgets: sizes, 'same' = the linear-only "
                    "3.0-bit plan's most (default %(default)s)")
    ap.add_argument("--work", default="out/model-scope", help="where checkpoints are written (removed after each row)")
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args()
    data = json.loads(OUT.read_text()) if OUT.exists() and not a.fresh else {"rows": []}
    data.setdefault("params", params())
    if not a.plot_only:
        data["machine"] = machine_info()
        todo = []
        for size in a.sizes.split(","):
            n = same_size(data["params"]) if size == "same" else parse_bytes(size)
            todo.append((f"model-{n}", Budget(bytes=n, scope="model")))
        todo.insert(1, ("linear-3.0", Budget(3.0)))  # after the first row: the calibration is shared
        for name, budget in todo:
            if any(r["name"] == name for r in data["rows"]) or (a.only and not re.search(a.only, name)):
                continue
            log(f"row {name}: {budget.label()}")
            data["rows"].append(run_row(name, budget, Path(a.work)))
            write_json(OUT, data)
            log(f"  -> {data['rows'][-1]['tensor_bytes'] / 2**20:.1f} MiB, ppl {data['rows'][-1]['perplexity']:.3f}")
    write_text(OUT.with_suffix(".md"), table_md(data["rows"]))
    plot(data["rows"], data["params"], PLOT)
    print(table_md(data["rows"]))


if __name__ == "__main__":
    main()
