"""What an input rotation (lqkit.core.rotation) adds to a compressed layer's call at one token (CUDA GPU).

For each layer shape (out×in) of gemma-3-270m, Llama-2-7B, Llama-2-13B and Llama-3-8B, and Llama-3-8B's
stacks as a prepared model calls them with one rotation (q/k/v 6144×4096, gate/up 28672×4096), rtn 4-bit with
groups of 128 along in (the fragment GEMV), bf16, one token, the prepared call (``kernels.bind``):
- ``layer``: unrotated;
- ``fused``: rotated, the call a prepared rotated layer binds at one token (``kernels.bind(...,
  rotation=rot)``): the rotation's launch planned with the GEMV's (two launches, no allocation; on
  a Hopper GPU the GEMV as a programmatic dependent launch unless ``LQKIT_PDL=0``: ``rotation_mode`` in the
  JSON says which). Results until 2026-12-05 13:30 (``rotation-inside-h100.json``) timed an older
  design: each GEMV program rotating its own part of x;
- ``inside`` (blocks of 256 to 4096; ``inside`` true in a row): the opt-in design
  (``LQKIT_ROT_LAUNCH=one``): the GEMV's own launch, whose first programs rotate x while the rest
  prefetch their first weights and wait for a count. In ``rotation-onelaunch-*-h100*.json`` (2026-12-05
  15:45–16:00) that design was the default, so there ``fused`` is it and ``chained`` the two launches;
- ``separate``: the rotation's own launch (``kernels.rotation``) and then the layer (what it ran before,
  and still runs at more tokens);
- ``torch`` (``--torch``): the core transform (signs, one matmul per stage, the cast), then the layer.
Each timed two ways: one CUDA graph replayed over ``copies`` copies of the weight that together exceed
the L2 several times (as a decoder runs its layers: cold weights; µs per layer), and eagerly (launches
and host work included; mean per call over the same copies). Mean of ``--rounds`` rounds.

Usage: PYTHONPATH=src python bench/rotation_overhead.py --out bench/results/rotation-fused-h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lqkit import kernels  # noqa: E402
from lqkit.kernels import _frag  # noqa: E402
from lqkit.kernels import _triton as kt  # noqa: E402
from lqkit.core import quant as qmod  # noqa: E402
from lqkit.core.quant import QuantSpec  # noqa: E402
from lqkit.core.rotation import Rotation, transform  # noqa: E402

SHAPES = [(2048, 640), (640, 2048), (4096, 4096), (11008, 4096), (4096, 11008), (13824, 5120), (5120, 13824),
          (14336, 4096), (4096, 14336), (6144, 4096), (28672, 4096)]


def timed(fns, x: torch.Tensor, graph: bool, rounds: int) -> float:
    """Mean µs per call of the calls ``fns`` (each f(x)), run in turn: replays of one captured CUDA graph
    of all of them, or eager calls."""
    def run_all():
        for f in fns:
            f(x)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_all()
    torch.cuda.current_stream().wait_stream(side)
    call = run_all
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run_all()
        call = g.replay
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(rounds):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (rounds * len(fns)) * 1e3


def _shape(s: str) -> tuple[int, int, int | None]:
    """OUTxIN or OUTxIN/BLOCK (the rotation's block; default: the default block of IN)."""
    dims, _, block = s.partition("/")
    out, inp = (int(v) for v in dims.split("x"))
    return out, inp, int(block) if block else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--shapes", default=None,
                   help="OUTxIN[/BLOCK],... (default: all, in the default block: lqkit.core.rotation.default_block)")
    p.add_argument("--cold-mb", type=float, default=240.0,
                   help="MiB of weight copies per shape (the H200's L2: 50 MB)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--torch", action="store_true", help="also the core transform before the layer")
    a = p.parse_args()
    os.environ.pop("LQKIT_ROT_LAUNCH", None)  # ``fused`` is always the default design
    shapes = [_shape(s) for s in a.shapes.split(",")] if a.shapes else [(o, i, None) for o, i in SHAPES]
    rows = []
    spec = QuantSpec("rtn", 4, 128)
    for out, inp, block in shapes:
        q = qmod.quantize(torch.randn(out, inp) * 0.02, spec)
        kw0 = kernels.prepare(q.packed, q.aux, qmod.kernel_spec(spec), (out, inp), "cuda")
        nbytes = kw0.qweight.numel() * kw0.qweight.element_size() + kw0.scale.numel() * kw0.scale.element_size()
        copies = max(2, math.ceil(a.cold_mb * 2**20 / nbytes))
        kws = [kw0] + [kernels.prepare(q.packed, q.aux, qmod.kernel_spec(spec), (out, inp), "cuda")
                       for _ in range(copies - 1)]
        x = torch.randn(1, inp, device="cuda", dtype=torch.bfloat16)
        r = Rotation(1, block) if block else Rotation.for_size(inp, seed=1)
        rot = kernels.rotation(r, inp, "cuda")
        fused_ok = kernels.plans_rotation(kw0, 1, x.dtype, rot)
        # every variant on one launch that can also rotate inside (kwarps=1, the default on few-row 4-bit
        # layers since 2026-12-06, takes the chained launches even under LQKIT_ROT_LAUNCH=one)
        cfg = _frag._plain() if kt.default_config(kw0, 1, x.dtype).kwarps else None
        plain = [kernels.bind(x, kw, config=cfg)[0] for kw in kws]
        fused = [kernels.bind(x, kw, config=cfg, rotation=rot)[0] for kw in kws] if fused_ok else []
        os.environ["LQKIT_ROT_LAUNCH"] = "one"  # the opt-in design too (bound now: later calls ignore the switch)
        try:
            inside = fused_ok and _frag.rotates_inside(rot, False)
            one = [kernels.bind(x, kw, config=cfg, rotation=rot)[0] for kw in kws] if inside else []
        finally:
            os.environ.pop("LQKIT_ROT_LAUNCH")
        variants = {"layer": [lambda x, b=b: b(x, (1, out)) for b in plain],
                    "separate": [lambda x, b=b: b(rot(x), (1, out)) for b in plain]}
        if fused:
            variants["fused"] = [lambda x, b=b: b(x, (1, out)) for b in fused]
        if inside:
            variants["inside"] = [lambda x, b=b: b(x, (1, out)) for b in one]
        if a.torch:
            rot_torch = transform(r, inp, "cuda")
            variants["torch"] = [lambda x, b=b: b(rot_torch(x), (1, out)) for b in plain]
        y0 = variants["separate"][0](x).float()
        row = {"out": out, "in": inp, "block": r.block, "copies": copies, "weight_mb": round(nbytes / 2**20, 2),
               "rotation": type(rot).__name__, "fused": bool(fused), "inside": inside}
        if fused:
            y1 = variants["fused"][0](x).float()
            row["fused_vs_separate_max_rel"] = float((y1 - y0).abs().max() / y0.abs().max())
        for mode, graph in (("graph", True), ("eager", False)):
            n = a.rounds if graph else max(2, a.rounds // 4)
            t = {f"{k}_us": timed(v, x, graph, n) for k, v in variants.items()}
            for k in variants:
                if k != "layer":
                    t[f"{k}_added_us"] = t[f"{k}_us"] - t["layer_us"]
                    t[f"{k}_added_pct"] = 100 * t[f"{k}_added_us"] / t["layer_us"]
            row[mode] = {k: round(v, 2) for k, v in t.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del kws, plain, fused, one, variants
        torch.cuda.empty_cache()
    if a.out:
        import triton

        mode = "chain+pdl" if _frag.pdl_ok(torch.device("cuda")) else "chain"
        Path(a.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                           "rotation_mode": mode,
                                           "triton": triton.__version__,
                                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                           "how": "bench/rotation_overhead.py: " + " ".join(sys.argv[1:]),
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
