"""What an input rotation (lqkit.core.rotation) adds to a compressed layer's call at one token (CUDA GPU).

For each layer shape (out×in) of gemma-3-270m, Llama-2-7B, Llama-2-13B and Llama-3-8B: the prepared
kernel call (rtn 4-bit, groups of 128 along in, ``kernels.bind``), the rotation alone, and the two back
to back, as one CUDA graph replayed (what a captured decoder pays) and eagerly (launches and host work
included); bf16, mean of 500 calls after warm-up. The rotation two ways: ``kernels.rotation`` (what a
prepared layer runs: one Triton launch) and the core transform (``*_torch``: signs, one matmul per
stage, the cast). The weights stay in L2 across replays: the layer's own time is
a lower bound, the rotation's (launch- and latency-bound) is not affected.

Usage: PYTHONPATH=src python bench/rotation_overhead.py --out bench/results/rotation-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lqkit import kernels  # noqa: E402
from lqkit.core import quant as qmod  # noqa: E402
from lqkit.core.quant import QuantSpec  # noqa: E402
from lqkit.core.rotation import Rotation, radices, transform  # noqa: E402

SHAPES = [(2048, 640), (640, 2048), (4096, 4096), (11008, 4096), (4096, 11008), (13824, 5120), (5120, 13824),
          (14336, 4096), (4096, 14336)]


def timed(fn, x: torch.Tensor, graph: bool, n: int = 500) -> float:
    """Mean µs per call of fn(x): replays of one captured CUDA graph, or eager calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    call = lambda: fn(x)  # noqa: E731
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(x)
        call = g.replay
    for _ in range(20):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    rows = []
    spec = QuantSpec("rtn", 4, 128)
    for out, inp in SHAPES:
        q = qmod.quantize(torch.randn(out, inp) * 0.02, spec)
        kw = kernels.prepare(q.packed, q.aux, qmod.kernel_spec(spec), (out, inp), "cuda")
        x = torch.randn(1, inp, device="cuda", dtype=torch.bfloat16)
        bound, _ = kernels.bind(x, kw)
        r = Rotation.for_size(inp, seed=1)
        rot_torch = transform(r, inp, "cuda")
        rot = kernels.rotation(r, inp, "cuda")
        layer = lambda x: bound(x, (1, out))  # noqa: E731
        both = lambda x: layer(rot(x))  # noqa: E731
        both_torch = lambda x: layer(rot_torch(x))  # noqa: E731
        row = {"out": out, "in": inp, "block": r.block, "stages_torch": list(radices(r.block)),
               "rotation": type(rot).__name__}
        for mode, graph in (("graph", True), ("eager", False)):
            t = {"layer_us": timed(layer, x, graph), "rotation_us": timed(rot, x, graph),
                 "layer_rotated_us": timed(both, x, graph), "rotation_torch_us": timed(rot_torch, x, graph),
                 "layer_rotated_torch_us": timed(both_torch, x, graph)}
            t["added_us"] = t["layer_rotated_us"] - t["layer_us"]
            t["added_pct"] = 100 * t["added_us"] / t["layer_us"]
            t["added_torch_us"] = t["layer_rotated_torch_us"] - t["layer_us"]
            row[mode] = {k: round(v, 2) for k, v in t.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        import triton

        Path(a.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                           "triton": triton.__version__,
                                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
