"""Time (or hand to a profiler) a few kernel variants on one layer shape: a development tool.

Each variant is ``bf16``, ``tinygemm`` or ``LAYOUT:BITS[:key=value,...]`` where the keys are
``_triton.Config`` fields (kind, bn, warps, occ, split, maxnreg, pf, unroll, xs) plus ``rank``; the
keys replace fields of the current default configuration (no keys: the default itself; since
2026-12-06 the one-token default of 3 bits with groups of 128 is pf=4, unroll=2, xs=1, so ``frag:3``
times that and ``frag:3:pf=2,unroll=1,xs=0`` the former default; on layers with many rows, e.g.
22016×4096, it is the one-warp launch bn=16,warps=1,occ=2,pf=8,xs=1, and past 12 such programs per
SM U = 4, unroll 2 up to 4096 wide (_frag._wide_iter_wins), so write a variant's fields out in full
there). The default is the rank-0 one unless the variant has a rank. The JSON rows record the
resolved configuration. Times are kernel_layers.py's rotating-copies measurement (cold weights,
one CUDA graph, µs per call). With ``--plain`` every variant is just called ``--calls`` times, no
graph and no copies, for a profiler, e.g.::

    ncu --clock-control none -k regex:'_gemv|_frag' --launch-skip 2 --launch-count 1 \
        python bench/kernel_probe.py --plain interleaved:4 frag:4:pf=8

Usage: PYTHONPATH=src python bench/kernel_probe.py [--out 4096 --in 14336 --tokens 1] VARIANT ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_layers as kl  # noqa: E402
from lqkit import kernels  # noqa: E402
from lqkit.kernels import _triton as kt  # noqa: E402

_INT_FIELDS = {f.name: f.type for f in dataclasses.fields(kt.Config)}


def parse(variant: str) -> tuple[str, int, dict, int]:
    """'frag:4:pf=4,occ=2,rank=32' -> ('frag', 4, {'pf': 4, 'occ': 2.0}, 32)."""
    parts = variant.split(":")
    if parts[0] in ("bf16", "tinygemm"):
        return parts[0], 16 if parts[0] == "bf16" else 4, {}, 0
    if len(parts) < 2:
        raise SystemExit(f"variant {variant!r}: expected LAYOUT:BITS[:key=value,...], bf16 or tinygemm")
    layout, bits, opts, rank = parts[0], int(parts[1]), {}, 0
    for kv in (parts[2].split(",") if len(parts) > 2 and parts[2] else []):
        k, v = kv.split("=")
        if k == "rank":
            rank = int(v)
        elif k == "kind":
            opts[k] = v
        elif k in _INT_FIELDS:
            opts[k] = float(v) if k == "occ" else int(v)
        else:
            raise SystemExit(f"variant {variant!r}: unknown key {k!r} (Config fields: {sorted(_INT_FIELDS)})")
    return layout, bits, opts, rank


def make_fns(variant: str, w: torch.Tensor, x: torch.Tensor, copies: int):
    """(list of per-copy callables, relative error against the fp32 reference or None)."""
    layout, bits, opts, rank = parse(variant)
    n, k = w.shape
    if layout == "bf16":
        ws = [w.to(torch.bfloat16) for _ in range(copies)]
        return [lambda a=a: F.linear(x, a) for a in ws], None
    if layout == "tinygemm":
        fns = [kl.tinygemm_int4(w)[0] for _ in range(copies)]
        return [lambda f=f: f(x) for f in fns], None
    kw, w_hat, _ = kl.lqkit_layer(w, bits, layout)
    L = torch.randn(n, rank, device="cuda", dtype=x.dtype) * 0.02 if rank else None
    R = torch.randn(rank, k, device="cuda", dtype=x.dtype) * 0.02 if rank else None
    base = kt.default_config(kw, x.shape[0], x.dtype, rank > 0)
    cfg = dataclasses.replace(base, **opts)
    ref = x.float() @ w_hat.T.float() + ((x.float() @ R.float().T) @ L.float().T if rank else 0)
    err = kl.rel_err(kernels.linear(x, kw, L, R, None, config=cfg), ref)
    kws = kl.weight_copies(kw, copies)
    return [lambda a=a: kernels.linear(x, a, L, R, None, config=cfg) for a in kws], (err, dataclasses.asdict(cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--out", type=int, default=4096, dest="n")
    ap.add_argument("--in", type=int, default=14336, dest="k")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="no graph, no copies: call each variant --calls times")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--json", help="append one JSON line per variant to this file")
    a = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.n, a.k, device="cuda")
    x = torch.randn(a.tokens, a.k, device="cuda", dtype=torch.bfloat16)
    nbytes = a.n * a.k // 2
    copies = 1 if a.plain else kl.n_copies(nbytes)
    for v in a.variants:
        try:
            fns, info = make_fns(v, w, x, copies)
        except ValueError as e:  # a launch this shape cannot take (e.g. kwarps=1 where K does not share out)
            print(json.dumps({"variant": v, "out": a.n, "in": a.k, "error": str(e)}), flush=True)
            continue
        if a.plain:
            for _ in range(a.calls):
                fns[0]()
            torch.cuda.synchronize()
            print(v, "called", a.calls, "times", info or "", flush=True)
            continue
        us = kl.measure_rot(fns)
        row = {"variant": v, "out": a.n, "in": a.k, "tokens": a.tokens, "time_us": round(us, 2),
               "rel_err": info[0] if info else None, "config": info[1] if info else None}
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
