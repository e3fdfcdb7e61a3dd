"""Host (Python) cost of one CompressedLinear call on the kernel path, measured on the CPU.

No GPU is needed: the tensors stay on the CPU and the kernel launch itself is replaced by a no-op
(triton's launcher is not called; the stream lookup is a Python function returning 0), so what is
timed is everything lqkit does around the launch: dispatch, checks, lookups, plan and argument
assembly, allocation of y (a CPU allocation here, cheaper than a CUDA one). Per call: Python function
calls (cProfile) and microseconds (median of 7 rounds of --calls calls), for one layer alone, for a
q/k/v stack (three member calls, one launch) and for a layer whose input is rotated (blocks of 256;
the rotation's one-launch kernel object built on the CPU, so a call takes the GPU's route),
unprepared (the per-call dispatch path) and prepared (``lqkit.nn.prepare_for_inference``'s runners,
when this lqkit has them). For scale: ``F.linear`` on
the meta device (the dispatcher without any compute) and an ``nn.Linear`` module call on it.

Run against another lqkit (e.g. an older checkout) with PYTHONPATH pointing at its src.
Usage: PYTHONPATH=src python bench/host_overhead.py --out bench/results/host-overhead-cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

import lqkit  # noqa: E402
from lqkit import kernels  # noqa: E402
from lqkit.core import MatrixSpec, QuantSpec  # noqa: E402
from lqkit.core.decompose import decompose  # noqa: E402
from lqkit.kernels import _triton as kt  # noqa: E402
from lqkit.nn import CompressedLinear  # noqa: E402


class _NoKernel:
    """Stands for a compiled triton kernel: its launcher does nothing."""

    function = packed_metadata = None

    def run(self, *args):
        return None

    def launch_metadata(self, grid, stream, *args):
        return None


NO_KERNEL = _NoKernel()


def _launch(fn, plan, grid, args, warps, stages, maxnreg=0, pdl=False):
    """kernels._triton._launch with the launch replaced: the same work around it, no CUDA."""
    rec = getattr(kt, "_RECORD", None)
    if rec is not None:
        rec.append((fn, plan, grid, args, warps, stages, maxnreg, pdl))
    k = plan.get("kernel") if plan is not None else None
    if k is None:
        if plan is not None:
            plan["kernel"] = NO_KERNEL
        return
    hooks = kt.triton.knobs.runtime
    stream = _stream(args[0].device)
    meta = k.launch_metadata(grid, stream, *args) if hooks.launch_enter_hook is not None else None
    k.run(grid[0], grid[1] if len(grid) > 1 else 1, 1, stream, k.function, k.packed_metadata, meta,
          hooks.launch_enter_hook, hooks.launch_exit_hook, *args)


def _stream(device) -> int:
    return 0


def patch_cpu_kernels() -> None:
    """Make the kernel path run on CPU tensors with no launch (see the module docstring)."""
    kt._launch = _launch
    if hasattr(kt, "_stream_getter"):
        kt._stream_getter = lambda device: (lambda: 0)
    kernels.available = lambda: True
    try:  # the rotation's one-launch kernel (not the core transform) for CPU tensors too
        from lqkit.kernels import _rotate

        kernels.rotation = lambda rot, n, device: _rotate.TritonRotation(rot, n, device)
        kernels.cached_rotation = functools.lru_cache(maxsize=None)(kernels.rotation)
    except ImportError:  # an lqkit without it
        pass
    torch.Tensor.is_cuda = property(lambda self: True)  # the unprepared path dispatches on x.is_cuda


def layer(n: int, k: int, rank: int, rotation=None) -> CompressedLinear:
    spec = MatrixSpec("lorc", QuantSpec("rtn", 4, 128), rank=rank, rotation=rotation)
    d = decompose(torch.randn(n, k) * 0.02, spec)
    return CompressedLinear.from_decomposition(d, dtype=torch.bfloat16).eval()


def measure(fn, calls: int) -> dict:
    for _ in range(20):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    st = pstats.Stats(prof)
    rounds = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls * 1e6)
    return {"python_calls": round(st.total_calls / calls, 1), "primitive_calls": round(st.prim_calls / calls, 1),
            "us": round(statistics.median(rounds), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="result JSON (default: print only)")
    ap.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    ap.add_argument("--label", default=None, help="name of this lqkit in the result (default: its git commit)")
    args = ap.parse_args()
    src = Path(lqkit.__file__).resolve().parents[1]
    label = args.label or subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip() or str(src)
    torch.manual_seed(0)
    xs, ws = torch.randn(1, 64), torch.randn(64, 64)
    with torch.device("meta"):
        w = torch.empty(4096, 4096, dtype=torch.bfloat16)
        xm = torch.empty(1, 1, 4096, dtype=torch.bfloat16)
        lin = torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16)
    res = {"env": machine_info(), "lqkit": label, "note": __doc__.split("\n\n")[1].replace("\n", " "),
           "reference": {"F.linear on meta": measure(lambda: torch.nn.functional.linear(xm, w), args.calls),
                         "nn.Linear call on meta": measure(lambda: lin(xm), args.calls),
                         "F.linear 1x64 @ 64x64 fp32 CPU": measure(lambda: torch.nn.functional.linear(xs, ws), args.calls)}}
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16)
    solo = layer(4096, 4096, 16)
    try:
        from lqkit.core.rotation import Rotation

        rotated = layer(4096, 4096, 16, Rotation(1, 256))
    except (ImportError, TypeError):  # an lqkit without rotations
        rotated = None
    qkv = [layer(4096, 4096, 16), layer(1024, 4096, 16), layer(1024, 4096, 16)]
    patch_cpu_kernels()
    from lqkit.nn import SharedInputGroup

    with torch.no_grad():
        res["unprepared"] = {"layer": measure(lambda: solo(x), args.calls)}
        if rotated is not None:
            res["unprepared"]["rotated layer"] = measure(lambda: rotated(x), args.calls)
        g = SharedInputGroup(("q", "k", "v"), qkv)
        for m in qkv:
            m.__dict__["_shared_input"] = g
        res["unprepared"]["q/k/v stack (3 calls)"] = measure(lambda: [m(x) for m in qkv], args.calls)
        try:
            from lqkit.nn import prepare_for_inference  # noqa: F401
        except ImportError:
            prepare_for_inference = None
        if prepare_for_inference is not None:
            solo.prepare_runner()
            g.prepare()
            res["prepared"] = {"layer": measure(lambda: solo(x), args.calls),
                               "q/k/v stack (3 calls)": measure(lambda: [m(x) for m in qkv], args.calls)}
            if rotated is not None:
                rotated.prepare_runner()
                res["prepared"]["rotated layer"] = measure(lambda: rotated(x), args.calls)
    for part in ("reference", "unprepared", "prepared"):
        for name, r in res.get(part, {}).items():
            print(f"{part:<11} {name:<24} {r['us']:8.2f} us  {r['python_calls']:7.1f} Python calls "
                  f"({r['primitive_calls']:.1f} primitive)", flush=True)
    if args.out:  # one file for several lqkits (e.g. before / after a change): runs keyed by label
        out = Path(args.out)
        doc = json.loads(out.read_text()) if out.exists() else {"note": res.pop("note"), "runs": {}}
        res.pop("note", None)
        doc["runs"][label] = res
        write_json(out, doc)


if __name__ == "__main__":
    main()
