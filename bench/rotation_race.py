"""Race check of the one-launch rotation (``LQKIT_ROT_LAUNCH=one``) on a CUDA GPU.

In that design a rotated one-token call is one launch: its first programs write x' = R·x and count
themselves in, the GEMV's programs wait for the count before they read x'. A read before the write, or
a count not set back to 0 for the next call, shows as a result that differs from the default chained
launches' (rotation, then GEMV) for the same input. Per shape: ``--inputs`` inputs in turn, ``--rounds``
rounds of bound calls eagerly, then 2 x ``--rounds`` replays of one CUDA graph with the inputs copied in
in turn; the largest relative difference of each, and the counters after.

Usage: PYTHONPATH=src python bench/rotation_race.py --out bench/results/rotation-race-h200.json
(``rotation-onelaunch-race-h100.json`` came from this script's first form, which wrote another layout.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402
from lqkit import kernels  # noqa: E402
from lqkit.core import quant as qmod  # noqa: E402
from lqkit.core.quant import QuantSpec  # noqa: E402
from lqkit.core.rotation import Rotation  # noqa: E402
from lqkit.kernels import _frag, _triton  # noqa: E402

SHAPES = [(14336, 4096, 4096), (4096, 14336, 2048), (4096, 4096, 256), (11008, 4096, 256), (4096, 11008, 256)]


def rel(y: torch.Tensor, w: torch.Tensor) -> float:
    return float((y.float() - w).abs().max() / w.abs().max())


def check(n: int, k: int, block: int, inputs: int, rounds: int) -> dict:
    spec = QuantSpec("rtn", 4, 128)
    q = qmod.quantize(torch.randn(n, k) * 0.02, spec)
    kw = kernels.prepare(q.packed, q.aux, qmod.kernel_spec(spec), (n, k), "cuda")
    r = kernels.rotation(Rotation(5, block), k, "cuda")
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(inputs)]
    os.environ.pop("LQKIT_ROT_LAUNCH", None)
    cfg = _frag._plain()  # a launch that can rotate inside (the default on few-row 4-bit layers, kwarps=1, cannot)
    want = [kernels.linear(x, kw, config=cfg, rotation=r).float() for x in xs]  # the default: chained launches
    os.environ["LQKIT_ROT_LAUNCH"] = "one"
    try:
        if not _frag.rotates_inside(r, False):
            raise SystemExit(f"{n}x{k}: blocks of {block} do not take the one-launch rotation")
        bound, _ = kernels.bind(xs[0], kw, config=cfg, rotation=r)
        if bound.general is not None or bound.pre is not None:
            raise SystemExit(f"{n}x{k}: the one-launch rotation was not bound as one launch")
    finally:
        del os.environ["LQKIT_ROT_LAUNCH"]
    eager = max(rel(bound(x), w) for _ in range(rounds) for x, w in zip(xs, want))
    xin, out = xs[0].clone(), {}
    g = _triton._graph([lambda: out.update(y=bound(xin))])  # out["y"]: the captured call's output
    graph = 0.0
    for i in range(2 * rounds):
        xin.copy_(xs[i % inputs])
        g.replay()
        graph = max(graph, rel(out["y"], want[i % inputs]))
    torch.cuda.synchronize()
    return {"shape": f"{n}x{k}", "block": block, "grid": list(bound.grid), "eager_max_rel": eager,
            "graph_max_rel": graph, "counters_after": int(kw.cache["counters"].abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()
    rows = []
    for n, k, block in SHAPES:
        rows.append(check(n, k, block, a.inputs, a.rounds))
        print(rows[-1], flush=True)
    if a.out:
        write_json(a.out, {"machine": machine_info(), "how": "bench/rotation_race.py " + " ".join(sys.argv[1:]),
                           "rows": rows})


if __name__ == "__main__":
    main()
