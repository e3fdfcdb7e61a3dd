"""How fast can a Triton kernel stream a layer's packed words at all? (run on a CUDA GPU)

The fragment kernel's main loop reads, per warp, 512 contiguous bytes per k block from its own 16
rows (the words of row block rb are one contiguous run of NKB blocks; a program's NW warps take NW
adjacent row blocks and one K-split of BPS blocks). This script runs kernels that do nothing but
read the same bytes in the same pattern (XOR-reduced so nothing is optimised away), with the fragment
kernel's grid and split-K, so that the fragment kernel's time can be set against what the access
pattern itself reaches on this GPU:

- ``frag``: the fragment kernel's pattern, U blocks per loop iteration (U independent 16-byte loads
  per lane, no prefetch across iterations), optionally with the group-parameter stream
  (``params``: 64 bytes per warp per group of 128 k, from a second buffer);
- ``frag-pf``: the same with the next iteration's loads issued before this one's are reduced
  (the fragment kernel's register prefetch);
- ``flat``: each program reads one contiguous range, NW·32·4·U words per iteration;
- torch ``sum`` of the buffer and a device copy, for reference;
- ``empty``: the fragment grid (no K-split) launched with nothing read, one store per thread: the
  floor a call of that grid cannot go under.

Every variant is timed like ``kernel_layers.py`` does (back-to-back calls on rotating cold copies
in one CUDA graph, µs per call) on the words of a 4-bit (and 3-bit) layer.

Usage: PYTHONPATH=src python bench/stream_probe.py --out bench/results/stream-h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_layers as kl  # noqa: E402

WB = 128  # int32 words per warp and k block (512 bytes)


@triton.jit
def _frag_stream(q_ptr, p_ptr, out_ptr, NKB, BPS, NB, NG, NW: tl.constexpr, U: tl.constexpr,
                 PF: tl.constexpr, PARAMS: tl.constexpr, BPG: tl.constexpr):
    pid = tl.program_id(0)
    nb = pid % NB
    ks = pid // NB
    r = tl.arange(0, 32 * NW)
    lane = r % 32
    rb = nb * NW + r // 32
    qp = q_ptr + rb * (NKB * 128) + 4 * lane
    pp = p_ptr + rb * (NG * 16) + 2 * (lane // 4)
    kb0 = ks * BPS
    kb1 = tl.minimum(kb0 + BPS, NKB)
    acc = tl.zeros([32 * NW, 4], dtype=tl.int32)
    pacc = tl.zeros([32 * NW, 2], dtype=tl.int32)
    c4 = tl.arange(0, 4)[None, :]
    c2 = tl.arange(0, 2)[None, :]
    if PF:
        cur = ()
        for u in tl.static_range(U):
            cur = cur + (tl.load(qp[:, None] + (kb0 + u) * 128 + c4, mask=kb0 + u < kb1),)
        for kb in range(kb0, kb1, U):
            nxt = ()
            for u in tl.static_range(U):
                nxt = nxt + (tl.load(qp[:, None] + (kb + U + u) * 128 + c4, mask=kb + U + u < kb1),)
            for u in tl.static_range(U):
                acc = acc ^ cur[u]
            cur = nxt
    else:
        for kb in range(kb0, kb1, U):
            for u in tl.static_range(U):
                acc = acc ^ tl.load(qp[:, None] + (kb + u) * 128 + c4, mask=kb + u < kb1)
                if PARAMS:
                    if (u + 1) % BPG == 0:
                        gi = (kb + u) // BPG
                        pacc = pacc ^ tl.load(pp[:, None] + gi * 16 + c2, mask=kb + u < kb1)
    s = tl.xor_sum(acc, axis=1) ^ tl.xor_sum(pacc, axis=1)
    tl.store(out_ptr + pid * 32 * NW + r, s)


@triton.jit
def _flat_stream(q_ptr, out_ptr, NWORDS, PER, NW: tl.constexpr, U: tl.constexpr):
    pid = tl.program_id(0)
    B: tl.constexpr = 32 * NW * 4
    o = tl.arange(0, B)
    acc = tl.zeros([B], dtype=tl.int32)
    a = pid * PER
    e = tl.minimum(a + PER, NWORDS)
    for i in range(a, e, U * B):
        for u in tl.static_range(U):
            j = i + u * B + o
            acc = acc ^ tl.load(q_ptr + j, mask=j < e)
    tl.store(out_ptr + pid * B + o, acc)


@triton.jit
def _empty(out_ptr, NW: tl.constexpr):
    """Nothing read: each thread stores its program id (the launch and one store, for the floor)."""
    pid = tl.program_id(0)
    tl.store(out_ptr + pid * 32 * NW + tl.arange(0, 32 * NW), pid)


def sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def frag_fn(q, p, out, n: int, nkb: int, ng: int, nw: int, u: int, occ: float, pf: bool, params: bool, bpg: int):
    nb = -(-(n // 16) // nw)
    split = max(1, min(nkb, round(occ * sms() / nb)))
    bps = -(-nkb // split)
    split = -(-nkb // bps)
    grid = (nb * split,)
    return lambda: _frag_stream[grid](q, p, out, nkb, bps, nb, ng, NW=nw, U=u, PF=pf, PARAMS=params, BPG=bpg,
                                      num_warps=nw, num_stages=1), grid[0]


def flat_fn(q, out, nw: int, u: int, occ: float):
    words = q.numel()
    progs = max(1, round(occ * sms()))
    blk = 32 * nw * 4
    per = -(-words // progs // blk) * blk
    progs = -(-words // per)
    return lambda: _flat_stream[(progs,)](q, out, words, per, NW=nw, U=u, num_warps=nw, num_stages=1), progs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/stream.json")
    ap.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096", help="out x in, comma-separated")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    a = ap.parse_args()
    info = kl.env_info()
    bw = kl.copy_bandwidth()
    print(json.dumps(info), f"copy {bw:.0f} GB/s", flush=True)
    res = {"env": info, "copy_bandwidth_GBps": round(bw, 1), "rows": [],
           "notes": "read-only streaming kernels over a layer's fragment-layout words (XOR-reduced), the "
                    "fragment kernel's grid and split-K; time_us: back-to-back calls on rotating cold copies "
                    "in one CUDA graph (kernel_layers.measure_rot); GBps: words (+ parameters) read / time; "
                    "x_copy: time / (bytes / copy bandwidth)."}
    nws, us_, occs = ((4, 8), (1, 2, 4, 8), (2.0, 4.0, 8.0)) if not a.quick else ((4,), (2, 4), (4.0,))
    for shape, bits in itertools.product(a.shapes.split(","), [int(b) for b in a.bits.split(",")]):
        n, k = (int(v) for v in shape.split("x"))
        kblock = 16 * (16 // bits)  # k per block of the fragment layout
        nkb = -(-k // kblock)
        ng = -(-k // 128)
        words = (n // 16) * nkb * WB
        pwords = (n // 16) * ng * 16
        copies = kl.n_copies(words * 4)
        qs = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
        ps = [torch.randint(-2**31, 2**31 - 1, (pwords,), dtype=torch.int32, device="cuda") for _ in range(copies)]
        out = torch.empty(1 << 22, dtype=torch.int32, device="cuda")
        nbytes = words * 4

        def rec(kind, cfg, fns, nread, progs=None):
            t0 = time.time()
            us = kl.measure_rot(fns)
            row = {"out": n, "in": k, "bits": bits, "kind": kind, **cfg, "programs": progs, "bytes": nread,
                   "time_us": round(us, 2), "GBps": round(nread / us / 1e3, 1),
                   "x_copy": round(us / (nread / bw / 1e3), 2) if nread else None}
            res["rows"].append(row)
            print(json.dumps(row), f"({time.time() - t0:.1f} s)", flush=True)

        for nw in nws:  # the launch alone: the frag grid without a K-split, reading nothing
            progs = -(-(n // 16) // nw)
            rec("empty", {"warps": nw}, [lambda nw=nw, g=progs: _empty[(g,)](out, NW=nw, num_warps=nw)] * copies, 0,
                progs)
        rec("torch-sum", {}, [lambda q=q: q.sum(dtype=torch.int32) for q in qs], nbytes)
        dst = torch.empty_like(qs[0])
        rec("torch-copy", {}, [lambda q=q: dst.copy_(q) for q in qs], 2 * nbytes)
        for nw, u, occ in itertools.product(nws, us_, occs):
            f = [flat_fn(q, out, nw, u, occ) for q in qs]
            rec("flat", {"warps": nw, "U": u, "occ": occ}, [x[0] for x in f], nbytes, f[0][1])
        for nw, u, occ, pf in itertools.product(nws, us_, occs, (False, True)):
            f = [frag_fn(q, p, out, n, nkb, ng, nw, u, occ, pf, False, 1) for q, p in zip(qs, ps)]
            rec("frag-pf" if pf else "frag", {"warps": nw, "U": u, "occ": occ}, [x[0] for x in f], nbytes, f[0][1])
        bpg = 128 // kblock  # blocks per group (4-bit: 2, 2-bit: 1; 3-bit groups do not align: skipped)
        for nw, u, occ in itertools.product(nws, us_, occs):
            if 128 % kblock or (u % bpg and bpg % u):
                continue
            f = [frag_fn(q, p, out, n, nkb, ng, nw, u, occ, False, True, bpg) for q, p in zip(qs, ps)]
            rec("frag+params", {"warps": nw, "U": u, "occ": occ}, [x[0] for x in f], nbytes + pwords * 4,
                f[0][1])
        del qs, ps
        torch.cuda.empty_cache()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    best = {}
    for r in res["rows"]:
        key = (r["out"], r["in"], r["bits"], r["kind"])
        if key not in best or r["time_us"] < best[key]["time_us"]:
            best[key] = r
    for key, r in best.items():
        print(key, r["time_us"], "us", r["GBps"], "GB/s", {f: r.get(f) for f in ("warps", "U", "occ")})


if __name__ == "__main__":
    main()
