"""Host time of one eager layer call at one token on a GPU: F.linear, nn.Linear, and a CompressedLinear
(rtn 4-bit g128, rank 0 and 16) unprepared and after ``prepare_for_inference`` (called through the
``nn.Sequential`` it was prepared in, and directly, as nn.Linear is).

Each round enqueues 200 calls and times the enqueueing (host_us per call) and, after a synchronize,
the whole (wall_us); median of 9 rounds after 30 warm-up calls. A cProfile of the prepared 4096x4096
call lists where its host time goes. Prints JSON (the run of 2026-12-04 is
bench/results/host-overhead-h200.json).

    PYTHONPATH=src python bench/host_overhead_gpu.py > out.json
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from lqkit.core import MatrixSpec, QuantSpec
from lqkit.core.decompose import decompose
from lqkit.nn import CompressedLinear
from lqkit.nn.inference import prepare_for_inference

DEV = "cuda"


def layer(n: int, k: int, rank: int, bits: int = 4) -> CompressedLinear:
    q = QuantSpec("rtn", bits, 128)
    spec = MatrixSpec("lorc", q, rank=rank) if rank else MatrixSpec("quant", q)
    d = decompose(torch.randn(n, k, device=DEV) * 0.02, spec)
    return CompressedLinear.from_decomposition(d, dtype=torch.bfloat16).to(DEV).eval()


def enqueue_us(fn, calls: int = 200, rounds: int = 9) -> dict:
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t) / calls * 1e6)
        wall.append((t2 - t) / calls * 1e6)
    return {"host_us": round(statistics.median(host), 2), "wall_us": round(statistics.median(wall), 2)}


def top(fn, calls: int = 500, n: int = 14) -> dict:
    p = cProfile.Profile()
    p.enable()
    for _ in range(calls):
        fn()
    p.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    st = pstats.Stats(p, stream=s)
    st.sort_stats("tottime").print_stats(n)
    return {"python_calls": round(st.total_calls / calls, 1), "top": s.getvalue().splitlines()[6:6 + n + 4]}


def main() -> None:
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    x = torch.randn(1, 1, 4096, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        for shape in [(4096, 4096), (11008, 4096)]:
            wb = torch.randn(*shape, device=DEV, dtype=torch.bfloat16)
            res[f"F.linear {shape}"] = enqueue_us(lambda: F.linear(x, wb))
            lin = torch.nn.Linear(shape[1], shape[0], bias=False, device=DEV, dtype=torch.bfloat16)
            res[f"nn.Linear {shape}"] = enqueue_us(lambda: lin(x))
            for rank in (0, 16):
                m = torch.nn.Sequential(layer(*shape, rank))
                res[f"lqkit unprepared rtn4 r{rank} {shape}"] = enqueue_us(lambda: m(x))
                t = time.time()
                prepare_for_inference(m, fuse=False)
                res[f"prepare_s r{rank} {shape}"] = round(time.time() - t, 2)
                res[f"lqkit prepared rtn4 r{rank} {shape}"] = enqueue_us(lambda: m(x))
                # the layer itself, as a model's block calls its projections (the line above adds the
                # Sequential's own module call, which nn.Linear's line does not have)
                res[f"lqkit prepared rtn4 r{rank} {shape}, the layer called directly"] = enqueue_us(lambda: m[0](x))
                if shape == (4096, 4096):
                    res[f"profile prepared r{rank}"] = top(lambda: m(x))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
