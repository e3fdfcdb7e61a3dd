"""Layer benchmark of lqkit's fused kernels on Llama-3-8B linear shapes (run on a CUDA GPU).

For each layer (out×in) and tokens per call, times (median of CUDA-event timings through
``triton.testing.do_bench``, which flushes the L2 cache before every call) and reports achieved
bandwidth on the bytes the call must read (weights, scales, factors, activations, output) and the
ratio to the bandwidth floor = those bytes / the device's copy bandwidth measured in the same run:

- torch bf16 ``F.linear``;
- lqkit rtn 4/3/2-bit, group 128 along in, fp16 scale+offset, rank 0 and 32 (fused kernels,
  launch configuration tuned per shape);
- tinygemm int4 g128 (``torch.ops.aten._weight_int4pack_mm``, the CUDA kernel behind torchao's
  int4 weight-only path) and bitsandbytes NF4 block 64 (fp32 absmax) when its wheel is importable.

Usage: PYTHONPATH=src python bench/kernel_layers.py --out bench/results/kernels-h100.json [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lqkit import kernels  # noqa: E402
from lqkit.core import quant as qmod  # noqa: E402
from lqkit.core.quant import QuantSpec  # noqa: E402
from lqkit.kernels import _triton as kt  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (out, in)
TOKENS = [1, 4, 8, 16, 64, 256]
BITS = [4, 3, 2]
RANKS = [0, 32]
GROUP = 128


def env_info() -> dict:
    def smi(q):
        try:
            return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except Exception:
            return None

    import triton

    p = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "driver": smi("driver_version"), "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(),
            "clocks_at_start": smi("clocks.sm,clocks.mem"), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def bench(fn, rep: int = 100) -> float:
    """Median time in microseconds (CUDA events; L2 flushed before each call)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def measure(fn, rep: int = 100, copies: list | None = None) -> dict:
    """Device time (CUDA-graph replay), eager time (the host launches every call) and the host's
    cost per call, all in µs. Falls back to eager when the call cannot be captured."""
    eager = bench(fn, rep)
    try:
        dev = kt.time_call(fn, rep, graph=True) * 1e3
        graph = True
    except Exception as e:
        print("graph capture failed, eager time only:", repr(e)[:120], flush=True)
        torch.cuda.synchronize()
        dev, graph = eager, False
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        fn()
    host = (time.perf_counter() - t) / 200 * 1e6
    torch.cuda.synchronize()
    r = {"time_us": dev, "single_us": round(dev, 2), "eager_us": round(eager, 2), "host_us": round(host, 1),
         "graph": graph}
    if copies and graph:
        try:
            r["time_us"] = measure_rot(copies)
            r["copies"] = len(copies)
        except Exception as e:
            print("rotating measurement failed:", repr(e)[:120], flush=True)
            torch.cuda.synchronize()
    return r


def n_copies(nbytes: int) -> int:
    """Weight copies whose total is over 2.5× the L2 cache, so every call reads cold weights."""
    return kt.cold_copies(nbytes, torch.device("cuda"))


def measure_rot(fns: list, reps: int = 60) -> float:
    """µs per call of back-to-back calls, each on its own weight copy, captured in one CUDA graph:
    what a decoder sees layer after layer (``kt.time_calls``)."""
    return kt.time_calls(fns, reps) * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (GB/s)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a), rep=200)
    del a, b
    return 2 * 2 * n / (us * 1e-6) / 1e9


# ----------------------------------------------------------------------------------------------
# peers


def tinygemm_int4(w: torch.Tensor, group: int = 128):
    """Asymmetric int4 g128 in tinygemm's format (as gpt-fast/torchao build it); returns (fn(x), bytes)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo).clamp_min(1e-6) / 15)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale  # tinygemm dequantizes as (q - 8)·scale + zero
    packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    wq = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (k/g, n, 2)
    w_hat = ((q.float().reshape(n, k // group, group) - 8) * scale[..., None] + zero[..., None]).reshape(n, k)

    def fn(x):
        return torch.ops.aten._weight_int4pack_mm(x, wq, group, sz)

    return fn, wq.numel() * wq.element_size() + sz.numel() * sz.element_size(), w_hat, (wq, sz)


def bnb_nf4(w: torch.Tensor):
    import bitsandbytes as bnb

    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False,
                            quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.detach().cpu().to(torch.bfloat16), requires_grad=False,
                                   quant_type="nf4", compress_statistics=False, blocksize=64)
    lin = lin.cuda()
    qs = lin.weight.quant_state
    nbytes = lin.weight.numel() * lin.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
    w_hat = bnb.functional.dequantize_4bit(lin.weight.data, qs).float()
    return lin, nbytes, w_hat


# ----------------------------------------------------------------------------------------------


LAYOUT = "auto"  # --layout: "auto" (frag where it holds the format, else interleaved), "interleaved" or "frag"


EXTRA = {  # --extra: more lqkit formats, rank 0 (what a codebook or exactly kept outliers cost)
    "nf4": QuantSpec(method="nf", bits=4, group_size=64),
    "nuq4": QuantSpec(method="nuq", bits=4),
    "nuq3": QuantSpec(method="nuq", bits=3),
    "nuq4col": QuantSpec(method="nuq", bits=4, group_dim="out"),  # a codebook per input column
    "rtn4+sp0.005": QuantSpec(method="rtn", bits=4, group_size=GROUP, outliers=0.005),
    "rtn3+sp0.005": QuantSpec(method="rtn", bits=3, group_size=GROUP, outliers=0.005),
    "rtn4+of0.01": QuantSpec(method="rtn", bits=4, group_size=GROUP, outlier_features=0.01),
}


def lqkit_layer(w: torch.Tensor, bits: int | QuantSpec, layout: str | None = None):
    """(kernel weight, fp32 reference weight, stored bits per weight) of w in rtn g128 at ``bits``, or
    in the given spec."""
    spec = bits if isinstance(bits, QuantSpec) else QuantSpec(method="rtn", bits=bits, group_size=GROUP,
                                                              group_dim="in")
    q = qmod.quantize(w, spec)
    kw = kernels.prepare(q.packed, q.aux, spec, tuple(w.shape), "cuda", layout=layout or LAYOUT)
    w_hat = qmod.dequantize_packed(q.packed, q.aux, spec, tuple(w.shape))
    return kw, w_hat, qmod.storage_bits(spec, tuple(w.shape)) / w.numel()


def weight_copies(kw, copies: int = 0) -> list:
    """kw and copies of it in new memory: ``copies`` in all, or enough to exceed 2.5× the L2."""
    return [kw] + [kt.clone_weight(kw) for _ in range((copies or n_copies(kw.nbytes())) - 1)]


def rel_err(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def precompile(jobs: int, quick: bool, bits_list=None, ranks=RANKS, tokens=None, layout: str = "auto",
               both_splits: bool = False, extra: tuple[str, ...] = ()) -> None:
    """Compile every kernel variant the tuning will try, in parallel worker processes (they share
    triton's on-disk cache), so that the timing process finds them compiled. Each work item is one
    kernel (one configuration, rank, token count and bit width), so slow compiles spread over the
    workers. The workers' small matrix always splits K; ``both_splits`` also compiles each candidate
    without split-K, which a shape with many row blocks takes (e.g. 28672×4096 at 4 programs per SM)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    tokens = tokens or (tuple(TOKENS) if not quick else (1, 8, 16))
    bits_list = BITS if bits_list is None else bits_list
    work = []
    for bits in list(bits_list) + [EXTRA[e] for e in extra]:
        kw = lqkit_layer(torch.randn(512, 1024, device="cuda"), bits, layout)[0]
        for rank in ranks:
            for m in tokens:
                seen = set()
                for cand in kt.candidates(kw, m, torch.bfloat16, rank > 0):
                    split1 = both_splits and cand.kind in ("frag", "gemv", "mma")  # kernels with a split-K constexpr
                    for cfg in (cand, dataclasses.replace(cand, split=1)) if split1 else (cand,):
                        # occ only sets the split, and only split-K or not is compiled in
                        key = (dataclasses.replace(cfg, occ=0.0, split=0), cfg.split == 1)
                        if key not in seen:
                            seen.add(key)
                            work.append((bits, rank, m, layout, cfg))
    work.sort(key=lambda w: -w[4].unroll)  # the slowest compiles first
    t = time.time()
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile_job, work, chunksize=1))
    print(f"precompiled {len(work)} kernels in {time.time() - t:.0f} s", flush=True)


def _compile_job(item) -> None:
    bits, rank, m, layout, cfg = item
    torch.manual_seed(0)
    w = torch.randn(512, 1024, device="cuda")
    kw, _, _ = lqkit_layer(w, bits, layout if not isinstance(bits, QuantSpec) else "auto")
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    L = torch.randn(512, rank, device="cuda", dtype=torch.bfloat16) if rank else None
    R = torch.randn(rank, 1024, device="cuda", dtype=torch.bfloat16) if rank else None
    try:
        kernels.linear(x, kw, L, R, None, config=cfg)
    except Exception as e:  # reported again by the timing process
        print("compile failed", bits, rank, m, cfg, repr(e)[:200], flush=True)
    torch.cuda.synchronize()


def shapes_of(args) -> list[tuple[int, int]]:
    """The (out, in) layers a run times: --shapes, or the quick pair, or all five."""
    if args.shapes:
        return [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    return SHAPES if not args.quick else [(4096, 14336), (4096, 4096)]


def run(args) -> dict:
    info = env_info()
    print(json.dumps(info), flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
    except Exception as e:
        print("bitsandbytes unavailable:", repr(e)[:200])
        have_bnb = False
    shapes = shapes_of(args)
    tokens = TOKENS if not args.quick or args.tokens else [1, 8, 16]
    result = {"env": info, "copy_bandwidth_GBps": bw, "group_size": GROUP, "rows": [],
              "notes": "time_us: per call, back-to-back calls each on its own copy of the weights (copies "
                       "together > 2.5x L2, so weights are always read cold), captured in one CUDA graph, median "
                       "of CUDA-event timed replays / calls: what a decoder sees layer after layer; single_us: one "
                       "call in a CUDA graph timed by triton do_bench, which zeroes 256 MB before each call "
                       "(the L2 then holds dirty lines that the call must write back: pessimistic for small "
                       "layers; ANCHORS.md used this flush); eager_us: do_bench with the host launching each "
                       "call; host_us: host time per call; "
                       "bytes: what the call must read (packed words as the kernel reads them incl. padding, "
                       "scales, offsets, L/R, activations) plus the output written; floor_us = bytes / copy "
                       "bandwidth; lqkit rtn group 128 along 'in', fp16 scale+offset; the 3-bit kernel layout "
                       "holds 10 codes per 32-bit word (3.2 bits/code as read)."}
    torch.manual_seed(0)
    for (n, k) in shapes:
        w = torch.randn(n, k, device="cuda") * 0.02
        w16 = w.to(torch.bfloat16)
        W16 = [w16] + [w16.clone() for _ in range(n_copies(n * k * 2) - 1)]
        layers = {b: lqkit_layer(w, b) for b in BITS}
        extra = {e: lqkit_layer(w, EXTRA[e], "auto") for e in args.extra}
        extra_kws = {e: weight_copies(extra[e][0]) for e in args.extra}
        kws = {b: weight_copies(layers[b][0]) for b in BITS}
        tg = tinygemm_int4(w16)
        tgs = [tg[3]] + [(tg[3][0].clone(), tg[3][1].clone()) for _ in range(n_copies(tg[1]) - 1)]
        nf4 = bnb_nf4(w) if have_bnb else None
        nf4s = [nf4[0]] + [bnb_nf4(w)[0] for _ in range(n_copies(nf4[1]) - 1)] if nf4 is not None else None
        LR = {r: [((torch.randn(n, r, device="cuda") * 0.02).to(torch.bfloat16),
                   (torch.randn(r, k, device="cuda") * 0.02).to(torch.bfloat16)) for _ in range(64)]
              for r in RANKS if r}
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            act = (m * k + m * n) * 2

            def row(method, bits, rank, t, nbytes, err=None, cfg=None, stored_bits=None):
                us = t["time_us"]
                floor = nbytes / (bw * 1e9) * 1e6
                r = {"out": n, "in": k, "tokens": m, "method": method, "bits": bits, "rank": rank,
                     "time_us": round(us, 2), "single_us": t["single_us"], "eager_us": t["eager_us"],
                     "host_us": t["host_us"], "copies": t.get("copies"), "graph": t["graph"], "bytes": nbytes,
                     "GBps": round(nbytes / (us * 1e-6) / 1e9, 1), "floor_us": round(floor, 2),
                     "x_floor": round(us / floor, 2), "rel_err": err, "config": cfg,
                     "stored_bits_per_weight": stored_bits}
                result["rows"].append(r)
                print(f"{n:>5}x{k:<5} m={m:<3} {method:<18} b={bits} r={rank:<2} {us:8.1f} us  "
                      f"{r['GBps']:7.0f} GB/s  {r['x_floor']:5.2f}x floor  (single {t['single_us']:.1f}, "
                      f"eager {t['eager_us']:.1f}, host {t['host_us']:.0f} us/call)", flush=True)
                return r

            ref16 = x.float() @ w16.float().t()
            row("torch-bf16", 16, 0, measure(lambda: F.linear(x, w16), copies=[
                (lambda wc=wc: F.linear(x, wc)) for wc in W16]), n * k * 2 + act, rel_err(F.linear(x, w16), ref16))
            fn, nb, w_hat, _ = tg
            try:
                err = rel_err(fn(x), x.float() @ w_hat.t())
                row("tinygemm-int4-g128", 4, 0, measure(lambda: fn(x), copies=[
                    (lambda c=c: torch.ops.aten._weight_int4pack_mm(x, c[0], GROUP, c[1])) for c in tgs]),
                    nb + act, err, stored_bits=4.25)
            except Exception as e:
                print("tinygemm failed:", repr(e)[:300], flush=True)
            if nf4 is not None:
                lin, nb, w_hat = nf4
                try:
                    with torch.no_grad():
                        err = rel_err(lin(x), x.float() @ w_hat.t())
                        row("bnb-nf4-b64", 4, 0, measure(lambda: lin(x), copies=[(lambda c=c: c(x)) for c in nf4s]),
                            nb + act, err, stored_bits=4.5)
                except Exception as e:
                    print("bitsandbytes failed:", repr(e)[:300], flush=True)
            for bits in BITS:
                kw, w_hat, sbits = layers[bits]
                for rank in RANKS:
                    L, R = LR[rank][0] if rank else (None, None)
                    ref = x.float() @ w_hat.t()
                    if rank:
                        ref = ref + (x.float() @ R.float().t()) @ L.float().t()
                    cfg, _ = kernels.tune(x, kw, L, R, None, rep_ms=args.tune_ms)
                    y = kernels.linear(x, kw, L, R, None, config=cfg)
                    lr_bytes = (n + k) * rank * 2
                    copies = [(lambda c=c, i=i: kernels.linear(x, c, *(LR[rank][i] if rank else (None, None)),
                                                               None, config=cfg)) for i, c in enumerate(kws[bits])]
                    t = measure(lambda: kernels.linear(x, kw, L, R, None, config=cfg), copies=copies)
                    sb = sbits + (rank * (n + k) * 16 / (n * k))
                    row("lqkit", bits, rank, t, kw.nbytes() + lr_bytes + act, rel_err(y, ref),
                        cfg.__dict__, round(sb, 3))
                    if rank and m == 1:  # unfused side path for comparison: kernel + 2 GEMVs + add
                        def unfused(c=kw, lr=(L, R)):
                            return kernels.linear(x, c, config=cfg) + F.linear(F.linear(x, lr[1]), lr[0])
                        copies = [(lambda c=c, i=i: unfused(c, LR[rank][i])) for i, c in enumerate(kws[bits])]
                        row("lqkit-unfused-lr", bits, rank, measure(unfused, copies=copies),
                            kw.nbytes() + lr_bytes + act)
            for e in args.extra:  # rank 0: the format's own cost (a codebook, the outliers' sparse pass)
                kw, w_hat, sbits = extra[e]
                cfg, _ = kernels.tune(x, kw, None, None, None, rep_ms=args.tune_ms)
                y = kernels.linear(x, kw, config=cfg)
                copies = [(lambda c=c: kernels.linear(x, c, config=cfg)) for c in extra_kws[e]]
                t = measure(lambda: kernels.linear(x, kw, config=cfg), copies=copies)
                row(f"lqkit-{e}", EXTRA[e].bits, 0, t, kw.nbytes() + act, rel_err(y, x.float() @ w_hat.t()),
                    cfg.__dict__, round(sbits, 3))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every token count: a run cut
            Path(args.out).write_text(json.dumps(result, indent=1))  # short keeps what it measured
        del w, w16, W16, layers, kws, tg, tgs, nf4, nf4s, LR, extra, extra_kws
        torch.cuda.empty_cache()
    return result


def summary(result: dict) -> str:
    rows = result["rows"]
    get = {(r["out"], r["in"], r["tokens"], r["method"], r["bits"], r["rank"]): r for r in rows}
    lines = ["| layer (out×in) | tokens | bf16 µs (×floor) | lqkit 4b µs (×floor) | 4b r32 | 3b µs (×floor) | "
             "3b r32 | 2b µs (×floor) | tinygemm int4 | bnb nf4 | 4b/3b speed-up vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, k) in dict.fromkeys((r["out"], r["in"]) for r in rows):
        for m in sorted({r["tokens"] for r in rows}):
            def c(meth, b, r=0, floor=True):
                x = get.get((n, k, m, meth, b, r))
                if x is None:
                    return "–"
                return f"{x['time_us']:.1f} ({x['x_floor']:.2f}×)" if floor else f"{x['time_us']:.1f}"
            b16 = get.get((n, k, m, "torch-bf16", 16, 0))
            l4, l3 = get.get((n, k, m, "lqkit", 4, 0)), get.get((n, k, m, "lqkit", 3, 0))
            sp = (f"{b16['time_us'] / l4['time_us']:.2f}× / {b16['time_us'] / l3['time_us']:.2f}×"
                  if b16 and l4 and l3 else "–")
            lines.append(f"| {n}×{k} | {m} | {c('torch-bf16', 16)} | {c('lqkit', 4)} | {c('lqkit', 4, 32, False)} | "
                         f"{c('lqkit', 3)} | {c('lqkit', 3, 32, False)} | {c('lqkit', 2)} | "
                         f"{c('tinygemm-int4-g128', 4)} | {c('bnb-nf4-b64', 4)} | {sp} |")
    return "\n".join(lines)


def dump_kernels(path: str) -> None:
    """Write registers/spills and the PTX/SASS of every compiled kernel variant into a tar file."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        rows = []
        for fn in (kt._gemv_kernel, kt._gemm_kernel, kt._mma_kernel, kt._frag._frag_kernel):
            for dev, entry in getattr(fn, "device_caches", {}).items():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for i, (key, k) in enumerate(cache.items()):
                    md = getattr(k, "metadata", None)
                    name = f"{fn.__name__}_{i}"
                    rows.append({"name": name, "regs": getattr(k, "n_regs", None),
                                 "spills": getattr(k, "n_spills", None),
                                 "warps": getattr(md, "num_warps", None), "shared": getattr(md, "shared", None),
                                 "key": str(key)[:2000]})
                    for ext in ("ptx", "sass"):
                        try:
                            data = k.asm[ext]
                        except Exception:
                            continue
                        b = data.encode() if isinstance(data, str) else data
                        ti = tarfile.TarInfo(f"{name}.{ext}")
                        ti.size = len(b)
                        tar.addfile(ti, io.BytesIO(b))
        b = json.dumps(rows, indent=1).encode()
        ti = tarfile.TarInfo("resources.json")
        ti.size = len(b)
        tar.addfile(ti, io.BytesIO(b))
    print("kernel variants:", [(r["name"], r["regs"], r["spills"], r["warps"]) for r in rows], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/kernels.json", help="result JSON path")
    ap.add_argument("--quick", action="store_true", help="two shapes, tokens 1, 8 and 16")
    ap.add_argument("--bits", default="", help="comma-separated lqkit bit widths (default 4,3,2)")
    ap.add_argument("--shapes", default="", help="comma-separated layers OUTxIN (default: the five Llama-3-8B shapes)")
    ap.add_argument("--tokens", default="", help="comma-separated tokens per call (default: all, or --quick's)")
    ap.add_argument("--layout", default="auto", choices=["auto", "interleaved", "frag"],
                    help="lqkit weight layout (auto: frag where it holds the format, else interleaved)")
    ap.add_argument("--jobs", type=int, default=12, help="worker processes that precompile kernels (0: none)")
    ap.add_argument("--tune-ms", type=int, default=10, help="do_bench budget per tuning candidate (ms)")
    ap.add_argument("--dump", default="", help="write PTX/SASS and register use of the kernels to this tar.gz")
    ap.add_argument("--extra", default="", help=f"comma-separated more lqkit formats, rank 0: {', '.join(EXTRA)}")
    ap.add_argument("--summary-only", action="store_true", help="print the table of an existing --out file")
    args = ap.parse_args()
    args.extra = tuple(e for e in args.extra.split(",") if e)
    unknown = [e for e in args.extra if e not in EXTRA]
    if unknown:
        ap.error(f"unknown --extra format(s) {', '.join(unknown)}; choose from {', '.join(EXTRA)}")
    if args.summary_only:
        print(summary(json.loads(Path(args.out).read_text())))
        return
    global LAYOUT, BITS, TOKENS
    LAYOUT = args.layout
    if args.bits:
        BITS = [int(b) for b in args.bits.split(",")]
    if args.tokens:
        TOKENS = [int(t) for t in args.tokens.split(",")]
    if args.jobs:
        # a layer with 8192+ rows has so many row blocks that some candidates do not split K (14336x4096 at 2
        # programs per SM and 4 warps: 224 blocks for 264 programs); without this they compile in the timing process
        shapes = shapes_of(args)
        precompile(args.jobs, args.quick, tokens=TOKENS if args.tokens else None, layout=args.layout,
                   both_splits=any(n >= 8192 for n, _ in shapes), extra=args.extra)
    result = run(args)
    if args.dump:
        dump_kernels(args.dump)
    print(summary(result))


if __name__ == "__main__":
    main()
