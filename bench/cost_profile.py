"""Where the time of one cost-table row goes (lqkit.core.costs.matrix_costs), phase by phase, on
random matrices of real shapes with synthetic statistics (H from random activations, Fisher random):
screening of the data-free configurations, the data-aware runs (GPTQ sweeps, nuq k-means), the exact
errors, the low-rank spectra (seconds and, on a GPU, each phase's peak allocated memory). Also times
the eigen-solvers a spectrum can use. Prints a table and writes JSON (--out) with machine info.

    python bench/cost_profile.py --shapes 4096x4096,4096x11008 --device cuda --out /tmp/cost-profile.json
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, by_site, machine_info, write_json  # noqa: E402
from lqkit.core import costs, gptq, nuq, quant  # noqa: E402
from lqkit.core.stats import MatrixStats  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


_ACTIVE: list[list[float]] = []  # running peak (bytes) of each timed call in progress, outermost first


def _note_peak(device: str) -> None:
    """Fold the allocator's peak since the last reset into every timed call in progress, then reset it,
    so that nested timed calls each see their own peak."""
    if device.startswith("cuda"):
        p = torch.cuda.max_memory_allocated()
        for a in _ACTIVE:
            a[0] = max(a[0], p)
        torch.cuda.reset_peak_memory_stats()


def timed(store: dict, key: str, fn, device: str):
    def wrap(*a, **k):
        _sync(device)
        _note_peak(device)
        _ACTIVE.append([0.0])
        t = time.time()
        try:
            out = fn(*a, **k)
            _sync(device)
        finally:
            _note_peak(device)
            peak = _ACTIVE.pop()[0]
        store[key] += time.time() - t
        store[key + "_calls"] += 1
        if device.startswith("cuda"):
            store[key + "_peak_mib"] = max(store[key + "_peak_mib"], round(peak / 2**20))
        return out
    return wrap


def peak_breakdown(snapshot: dict, base_bytes: int, top: int = 12) -> dict:
    """Replay the allocator's trace (torch.cuda.memory._record_memory_history) to the moment of most
    allocated memory and group the tensors alive then by where they were allocated."""
    live: dict[int, tuple[int, list]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, list]] = {}
    events = snapshot["device_traces"][0] if snapshot.get("device_traces") else []
    for ev in events:
        a = ev.get("action")
        if a == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif a in ("free_requested", "free_completed") and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    return {"events": len(events), "peak_mib_traced": round(peak / 2**20),
            "before_trace_mib": round(base_bytes / 2**20), "live_at_peak": by_site(at_peak.values(), top)}


def kernel_time(out: int, inp: int, device: str, top: int = 15) -> dict:
    """One more (warm) cost-table row under torch.profiler: wall seconds against the summed time of
    the device's kernels (how much of the row the GPU is busy), the kernels and the host-side
    operators that took the most time, and the Python functions by own time (cProfile)."""
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity, profile

    w, stats = _row_inputs(out, inp, device)
    _sync(device)
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        costs.matrix_costs(w, stats)
        _sync(device)
    wall = time.time() - t0
    ka = prof.key_averages()
    kernels = [e for e in ka if e.device_type.name == "CUDA" or getattr(e, "is_kernel", False)]
    busy = sum(e.self_device_time_total for e in ka) / 1e6
    cp = cProfile.Profile()
    t0 = time.time()
    cp.runcall(costs.matrix_costs, w, stats)
    _sync(device)
    wall_plain = time.time() - t0
    st = pstats.Stats(cp)
    funcs = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {"shape": [out, inp], "wall_profiled_s": round(wall, 3), "wall_s": round(wall_plain, 3),
            "device_busy_s": round(busy, 3), "kernels": len(kernels),
            "top_device": [{"name": e.key[:70], "ms": round(e.self_device_time_total / 1e3, 1), "calls": e.count}
                           for e in sorted(ka, key=lambda e: -e.self_device_time_total)[:top]],
            "top_host_ops": [{"name": e.key[:70], "ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count}
                             for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:top]],
            "top_python": [{"name": f"{k[0].split('/')[-1]}:{k[1]}({k[2]})", "own_s": round(v[2], 3),
                            "cum_s": round(v[3], 3), "calls": v[1]} for k, v in funcs]}


def _row_inputs(out: int, inp: int, device: str):
    torch.manual_seed(0)
    w = (torch.randn(out, inp, device=device) * 0.02).to(torch.bfloat16)
    x = torch.randn(4096, inp, device=device) * (torch.rand(inp, device=device) * 2)
    return w, MatrixStats(h=x.T @ x / 4096, fisher=torch.rand(out, inp, device=device) ** 4 * 1e-6)


def profile_row(out: int, inp: int, device: str, trace: bool = False) -> dict:
    w, stats = _row_inputs(out, inp, device)
    stats_bytes = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    t: dict = defaultdict(float)
    patches = [(quant, "reconstruct_many"), (gptq, "gptq_many"), (nuq, "codebooks_many"),
               (costs._Metric, "rank_errors"), (costs._Metric, "spectral_summary"),
               (costs._Metric, "errors_and_spectral"), (costs._Metric, "screen"), (costs, "weight_scales"),
               (gptq, "inverse_cholesky"), (gptq, "_gptq_stack"), (quant, "quantize_many")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    for obj, name, fn in saved:
        setattr(obj, name, timed(t, name, fn, device))
    snap = None
    if trace:
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    try:
        _sync(device)
        t0 = time.time()
        c = timed(t, "matrix_costs", costs.matrix_costs, device)(w, stats)
        _sync(device)
        total = time.time() - t0
        if trace:
            snap = torch.cuda.memory._snapshot()
    finally:
        if trace:
            torch.cuda.memory._record_memory_history(enabled=None)
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    row = {"shape": [out, inp], "total_s": round(total, 2), "evaluated": c.evaluated, "front": len(c.specs)}
    row.update({k: round(v, 3) if isinstance(v, float) else v for k, v in sorted(t.items())})
    if device.startswith("cuda"):
        _note_peak(device)
        row["peak_gpu_mib"] = max(v for k, v in row.items() if k.endswith("_peak_mib"))
        row["stats_mib"] = round(stats_bytes / 2**20)
    if snap is not None:
        row["memory_at_peak"] = peak_breakdown(snap, stats_bytes)
    return row


def sweep_profile(out: int, inp: int, device: str, stack: int) -> dict:
    """One batched GPTQ call of the default candidates' gptq configurations (clip, act-order) on an
    (out, inp) matrix, sweeps at most ``stack`` stacked elements tall: wall seconds, peak memory and
    the CUDA kernels that took the most time (torch.profiler)."""
    torch.manual_seed(0)
    w = torch.randn(out, inp, device=device) * 0.02
    x = torch.randn(4096, inp, device=device) * (torch.rand(inp, device=device) * 2)
    h = x.T @ x / 4096
    specs = [s for s in costs.CandidateSet().quant_specs() if s.method == "gptq"][:64]
    saved = gptq.MAX_STACK_CUDA
    gptq.MAX_STACK_CUDA = stack
    try:
        gptq.gptq_many(w, h, specs[:2])  # warm-up: triton compiles
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        gptq.gptq_many(w, h, specs)
        _sync(device)
        wall = time.time() - t0
        row = {"shape": [out, inp], "configs": len(specs), "stack": stack, "seconds": round(wall, 3)}
        if device.startswith("cuda"):
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                gptq.gptq_many(w, h, specs)
                _sync(device)
            ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]
            row["top_cuda"] = [{"name": e.key[:60], "ms": round(e.device_time_total / 1e3, 1), "calls": e.count}
                               for e in ev]
    finally:
        gptq.MAX_STACK_CUDA = saved
    return row


def eig_times(n: int, device: str) -> dict:
    a = torch.randn(n, n, device=device)
    g = a @ a.T
    res = {}
    for name, fn in {"eigvalsh_fp64": lambda: torch.linalg.eigvalsh(g.double()),
                     "eigvalsh_fp32": lambda: torch.linalg.eigvalsh(g)}.items():
        fn()
        _sync(device)
        t = time.time()
        for _ in range(3):
            fn()
        _sync(device)
        res[name] = round((time.time() - t) / 3, 4)
    return res


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated; empty: none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweeps", default="", help="also profile one batched GPTQ call per SHAPE:STACK, e.g. 4096x4096:28")
    ap.add_argument("--memory-trace", action="store_true",
                    help="(CUDA) record the allocator's trace and report what is alive at the peak, "
                         "by where it was allocated")
    ap.add_argument("--repeat", type=int, default=1, help="run each row this many times (the first warms up)")
    ap.add_argument("--kernel-time", action="store_true",
                    help="then one more run of each row under torch.profiler and cProfile: device busy time "
                         "against wall time, top kernels, host operators and Python functions")
    a = ap.parse_args()
    sweeps = []
    for s in filter(None, a.sweeps.split(",")):
        shape, log2 = s.split(":")
        o, i = (int(v) for v in shape.split("x"))
        sweeps.append(sweep_profile(o, i, a.device, 1 << int(log2)))
        print(json.dumps(sweeps[-1]), flush=True)
    rows = []
    for s in filter(None, a.shapes.split(",")):
        o, i = (int(v) for v in s.split("x"))
        for r in range(a.repeat):
            rows.append(profile_row(o, i, a.device, a.memory_trace) | {"run": r})
            print(json.dumps(rows[-1]), flush=True)
        if a.kernel_time:
            rows.append(kernel_time(o, i, a.device) | {"run": "kernel_time"})
            print(json.dumps(rows[-1]), flush=True)
    eig = {n: eig_times(n, a.device) for n in (4096,)} if rows else {}
    print(json.dumps(eig), flush=True)
    if a.out:
        write_json(Path(a.out), {"machine": machine_info(), "rows": rows, "eig": eig, "sweeps": sweeps})


if __name__ == "__main__":
    main()
