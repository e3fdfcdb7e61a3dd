"""What the rotation's block size costs in quality: the default model's 2048-input matrices (the MLP's
down projections, its largest inputs) rotated in blocks of 256 to 2048.

Two measures, CPU, fp32 (google/gemma-3-270m; the calibration statistics of bench/sensitivity.py,
64 × 512 tokens of WikiText-2 validation, cached under $LQKIT_CACHE/stats):
- ``output_error``: Σ tr(E·H·Eᵀ) / Σ tr(W·H·Wᵀ) over the 18 down projections, E the error of rtn
  b-bit g128 (along in) in the original coordinates, H the calibration second moment of the input;
  per bits and block (and unrotated);
- ``perplexity`` (``--windows`` > 0): rtn 4-bit and 3-bit g128 on every decoder linear, every input rotated
  (:func:`lqkit.plan.rotated_plan`; the other matrices in their default blocks: 128 for the 640-inputs,
  1024 for o_proj's 1024-inputs) with the down
  projections' blocks as listed (or unrotated); WikiText-2 test, ``--windows`` evenly spaced windows of
  512 tokens with BOS (bench/quality.py's protocol, fewer windows).

    PYTHONPATH=src python bench/rotation_block.py --out bench/results/rotation-block-proxy-gemma-3-270m.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, log, machine_info, write_json  # noqa: E402
from sensitivity import get_stats  # noqa: E402

from lqkit.compress import compress_model  # noqa: E402
from lqkit.core import MatrixSpec, QuantSpec  # noqa: E402
from lqkit.core.decompose import decompose  # noqa: E402
from lqkit.core.rotation import Rotation  # noqa: E402
from lqkit.data import DEFAULT_EVAL_TEXT, read_text  # noqa: E402
from lqkit.evaluate import EvalProtocol, perplexity  # noqa: E402
from lqkit.models import load_model  # noqa: E402
from lqkit.plan import rotated_plan, uniform_plan  # noqa: E402

BLOCKS = (None, 256, 512, 1024, 2048)


def output_error(model, stats, names: list[str], bits: int, block: int | None) -> float:
    num = den = 0.0
    for n in names:
        w = model.get_submodule(n).weight.detach().float()
        h = stats.get(n).h.float()
        rot = Rotation(0, block) if block else None
        e = decompose(w, MatrixSpec("quant", QuantSpec("rtn", bits, 128), rotation=rot)).reconstruct() - w
        num += float(torch.einsum("oi,ij,oj->", e, h, e))
        den += float(torch.einsum("oi,ij,oj->", w, h, w))
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "rotation-block-proxy-gemma-3-270m.json"))
    ap.add_argument("--windows", type=int, default=20, help="perplexity windows (0: none)")
    a = ap.parse_args()
    torch.manual_seed(0)
    stats = get_stats(progress=False)
    loaded = load_model(None)
    names = [n for n in uniform_plan(loaded.model, MatrixSpec("quant", QuantSpec("rtn", 3, 128)))
             if loaded.model.get_submodule(n).in_features == 2048]
    res = {"machine": machine_info(), "how": "bench/rotation_block.py " + " ".join(sys.argv[1:]), "matrices": names,
           "output_error": {}, "perplexity": {}}
    for bits in (3, 4, 2):
        for b in BLOCKS:
            res["output_error"][f"rtn{bits} block {b}"] = err = output_error(loaded.model, stats, names, bits, b)
            log(f"rtn{bits} g128, down projections in blocks of {b}: output error {100 * err:.2f} %")
    if a.windows:
        text, _ = read_text(None, DEFAULT_EVAL_TEXT)
        proto = EvalProtocol(windows=a.windows)
        for bits, b in [(bits, b) for bits in (4, 3) for b in (None, 512, 1024, 2048)]:
            model = load_model(None).model
            plan = uniform_plan(model, MatrixSpec("quant", QuantSpec("rtn", bits, 128)))
            plan = rotated_plan(model, plan)
            if b is not None:
                plan = {n: replace(s, rotation=replace(s.rotation, block=b)) if n in names else s
                        for n, s in plan.items()}
            else:  # the down projections unrotated
                plan = {n: replace(s, rotation=None) if n in names else s for n, s in plan.items()}
            t0 = time.time()
            compress_model(model, plan, progress=False)
            ppl = perplexity(model, loaded.tokenizer, text, proto, progress=False, materialize=True).perplexity
            res["perplexity"][f"rtn{bits} all rotated, down projections block {b}"] = ppl
            log(f"rtn{bits} g128, all rotated, down projections in blocks of {b}: perplexity {ppl:.3f} "
                f"({a.windows} windows, {time.time() - t0:.0f} s)")
    write_json(Path(a.out), res)


if __name__ == "__main__":
    main()
