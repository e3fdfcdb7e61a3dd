"""Greedy-decoding throughput of a randomly initialised Llama-3-8B-shaped model (run on a CUDA GPU).

The same minimal Llama decoder (RMSNorm, RoPE, grouped-query attention over a static KV cache,
SwiGLU MLP) runs with its 224 decoder linears either as bf16 ``F.linear`` or as lqkit compressed
layers (rtn g128 + rank-16 L·R, fused Triton kernels); embeddings and lm_head stay bf16 in both.
One decode step is captured in a CUDA graph for every variant (same loop, same graph treatment); the
work between the linears (residual add + RMSNorm, RoPE, SiLU·up) runs through torch.compile in every
variant (``--eager-glue``: eagerly). ``--fuse`` (default ``both``) also runs every variant with
q/k/v and gate/up as one launch each (lqkit: ``kernels.stack``, as ``lqkit.nn.fuse_shared_inputs``
does for a model; bf16: one concatenated weight);
tokens/s = batch × generated tokens / time of the generation loop. Weights are random (speed does
not depend on their values), so the generated text is meaningless.

Every phase prints a timestamped line (tuning: one per candidate, with the seconds it took, compile
included), and when no line has come for 180 s the Python stacks of all threads are dumped to stderr,
so a stall shows where it is. A run once stalled for 354 s after "layers prepared" with one CPU core
busy and the GPU idle: that is the tuning phase, where each candidate not compiled by the worker
processes is compiled in this process (the unrolled fragment kernels take 15-40 s each), and a
candidate that fails to compile was compiled and failed again for every layer shape; such failures are
now remembered (``kernels.tune``), and the per-candidate lines show any remaining cost.

This is the kernels' best case (a minimal decoder, one CUDA graph per step). What users run —
transformers' ``generate()`` on an lqkit checkpoint, eager and compiled — is bench/generate.py.

Usage: PYTHONPATH=src python bench/decode.py --out bench/results/decode-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log  # noqa: E402
from lqkit import kernels  # noqa: E402
from lqkit.core import quant as qmod  # noqa: E402
from lqkit.core.quant import QuantSpec  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    inter: int = 14336
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    rope_theta: float = 500000.0


LLAMA3_8B = Shape()
LLAMA3_2_3B = Shape(hidden=3072, inter=8192, layers=28, heads=24, kv_heads=8, vocab=128256)
NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def linear_shapes(s: Shape) -> dict[str, tuple[int, int]]:
    kv = s.kv_heads * s.head_dim
    return {"q": (s.heads * s.head_dim, s.hidden), "k": (kv, s.hidden), "v": (kv, s.hidden),
            "o": (s.hidden, s.heads * s.head_dim), "gate": (s.inter, s.hidden), "up": (s.inter, s.hidden),
            "down": (s.hidden, s.inter)}


def rms(x, w, eps=1e-5):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def add_rms(h, d, w):
    """Residual add, then RMSNorm: (h + d, rms(h + d))."""
    h = h + d
    return h, rms(h, w)


def rope(x, cos, sin):
    """Rotary embedding on interleaved pairs; x (B, 1, H, hd), cos/sin (1, 1, 1, hd/2) fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)


def silu_mul(g, u):
    return F.silu(g) * u


GLUE = {"add_rms": add_rms, "rope": rope, "silu_mul": silu_mul}  # the step's work between the linears


class Decoder:
    """Minimal Llama decoder for one-token steps with a static KV cache."""

    def __init__(self, s: Shape, linears: list[dict], embed, lm_head, batch: int, max_len: int, glue=None):
        self.s, self.lin, self.embed, self.lm_head = s, linears, embed, lm_head
        self.g = glue or GLUE  # eager functions, or the same compiled (torch.compile)
        dev, dt = embed.device, embed.dtype
        self.norms = [(torch.ones(s.hidden, device=dev, dtype=dt), torch.ones(s.hidden, device=dev, dtype=dt))
                      for _ in range(s.layers)]
        self.final_norm = torch.ones(s.hidden, device=dev, dtype=dt)
        cache = (batch, s.kv_heads, max_len, s.head_dim)
        self.kc = [torch.zeros(cache, device=dev, dtype=dt) for _ in range(s.layers)]
        self.vc = [torch.zeros(cache, device=dev, dtype=dt) for _ in range(s.layers)]
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=dev).float() / s.head_dim))
        ang = torch.arange(max_len, device=dev).float()[:, None] * inv[None, :]  # (T, hd/2)
        self.cos, self.sin = ang.cos(), ang.sin()
        self.max_len = max_len

    def step(self, ids, pos):
        """ids (B, 1) int64, pos (1,) int64 tensor -> next ids (B, 1)."""
        s = self.s
        b = ids.shape[0]
        grp = s.heads // s.kv_heads
        g = self.g
        h = self.embed[ids]  # (B, 1, D)
        ar = torch.arange(self.max_len, device=ids.device)
        mask = torch.zeros(self.max_len, device=ids.device, dtype=h.dtype).masked_fill_(ar > pos, float("-inf"))
        mask = mask.view(1, 1, 1, -1)
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        d = torch.zeros_like(h)
        for i, lin in enumerate(self.lin):
            h, a = g["add_rms"](h, d, self.norms[i][0])  # d: the previous layer's MLP output
            qa, ka, va = lin["qkv"](a) if "qkv" in lin else (lin["q"](a), lin["k"](a), lin["v"](a))
            q = g["rope"](qa.view(b, 1, s.heads, s.head_dim), cos, sin)
            k = g["rope"](ka.view(b, 1, s.kv_heads, s.head_dim), cos, sin)
            v = va.view(b, 1, s.kv_heads, s.head_dim)
            self.kc[i].index_copy_(2, pos, k.transpose(1, 2))
            self.vc[i].index_copy_(2, pos, v.transpose(1, 2))
            qg = q.view(b, s.kv_heads, grp, s.head_dim)  # the query heads of one KV head as its "queries"
            o = F.scaled_dot_product_attention(qg, self.kc[i], self.vc[i], attn_mask=mask)  # (B, KVH, grp, hd)
            h, m = g["add_rms"](h, lin["o"](o.reshape(b, 1, -1)), self.norms[i][1])
            gm, um = lin["gateup"](m) if "gateup" in lin else (lin["gate"](m), lin["up"](m))
            d = lin["down"](g["silu_mul"](gm, um))
        _, hn = g["add_rms"](h, d, self.final_norm)
        logits = F.linear(hn, self.lm_head)  # (B, 1, V)
        return logits.argmax(-1)


FUSED = {"qkv": ("q", "k", "v"), "gateup": ("gate", "up")}  # --fuse: the linears that share an input


def _split(y, sizes):
    return torch.split(y, sizes, dim=-1)  # views, as nn.fuse's outputs are


def bf16_linears(weights, fuse: bool = False):
    """``F.linear`` per matrix; with ``fuse`` q/k/v and gate/up as one concatenated matrix each (the
    same fusion as lqkit's, so that the comparison stays like for like)."""
    out = []
    for w in weights:
        layer = {n: (lambda x, w=w[n]: F.linear(x, w)) for n in NAMES}
        if fuse:
            for f, parts in FUSED.items():
                wc = torch.cat([w[p] for p in parts])
                layer[f] = (lambda x, wc=wc, sz=[w[p].shape[0] for p in parts]: _split(F.linear(x, wc), sz))
                for p in parts:
                    del layer[p]
        out.append(layer)
    return out


def lqkit_linears(weights, bits: int, rank: int, fuse: bool = False):
    """Quantize each bf16 weight (rtn g128 along in) and add random rank-r factors; returns the
    callables and the stored bits per weight (codes, scales, offsets, factors). With ``fuse`` q/k/v and
    gate/up run as one stacked launch each (``kernels.stack``, as ``lqkit.nn.fuse_shared_inputs`` does)."""
    spec = QuantSpec(method="rtn", bits=bits, group_size=128, group_dim="in")
    out, stored, count = [], 0, 0
    for w in weights:
        parts = {}
        for n in NAMES:
            wt = w[n]
            q = qmod.quantize(wt.float(), spec)
            kw = kernels.prepare(q.packed, q.aux, spec, tuple(wt.shape), wt.device)
            L = (torch.randn(wt.shape[0], rank, device=wt.device) * 0.02).to(torch.bfloat16)
            R = (torch.randn(rank, wt.shape[1], device=wt.device) * 0.02).to(torch.bfloat16)
            parts[n] = (kw, L, R)
            stored += q.nbits + (L.numel() + R.numel()) * 16
            count += wt.numel()
            del q
        groups = FUSED if fuse else {}
        singles = [n for n in NAMES if not any(n in ps for ps in groups.values())]
        layer = {}
        for n in singles:
            kw, L, R = parts[n]
            layer[n] = (lambda x, kw=kw, L=L, R=R: kernels.linear(x, kw, L, R))
            layer[n].kw, layer[n].L, layer[n].R = kw, L, R
        for f, ps in groups.items():
            kw, offs = kernels.stack([parts[p][0] for p in ps])
            sizes = tuple(parts[p][0].shape[0] for p in ps)
            L, R, _ = kernels.stack_factors([parts[p][1] for p in ps], [parts[p][2] for p in ps], [None] * len(ps),
                                            sizes, offs, kw.shape[0])
            assert offs == tuple(sum(sizes[:i]) for i in range(len(sizes)))  # no padding rows at these shapes
            layer[f] = (lambda x, kw=kw, L=L, R=R, sz=list(sizes): _split(kernels.linear(x, kw, L, R), sz))
            layer[f].kw, layer[f].L, layer[f].R = kw, L, R
        del parts
        out.append(layer)
    return out, stored / count


def generate(dec: Decoder, batch: int, prompt: int, new: int, graph: bool = True) -> dict:
    dev = dec.embed.device
    ids = torch.randint(0, dec.s.vocab, (batch, 1), device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    toks = torch.zeros(batch, dec.max_len, dtype=torch.long, device=dev)

    def step():
        nxt = dec.step(ids, pos)
        toks.index_copy_(1, pos, nxt)
        ids.copy_(nxt)
        pos.add_(1)

    t = time.time()
    for _ in range(3):  # warm-up (compiles / tunes nothing new; allocator settles)
        step()
    torch.cuda.synchronize()
    log(f"  batch {batch}: 3 warm-up steps in {time.time() - t:.1f} s")
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            step()
        run = g.replay
        log(f"  batch {batch}: decode step captured in a CUDA graph")
    else:
        run = step
    times = []
    for _ in range(3):
        pos.zero_()
        for _ in range(prompt):  # the prompt, fed one token at a time, untimed
            run()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(new):
            run()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    t = sorted(times)[1]
    return {"batch": batch, "new_tokens": new, "prompt_tokens": prompt, "seconds": round(t, 4),
            "tokens_per_s": round(batch * new / t, 1), "ms_per_step": round(t / new * 1e3, 3),
            "cuda_graph": graph}


def compiled_glue(s: Shape, batches: list[int]) -> dict | None:
    """The step's non-linear work through torch.compile (fused Triton kernels), one function each;
    compiled here for every batch size, or None (eager) when compiling fails."""
    # one compilation per input shape and stride pattern (fused q/k/v outputs are strided views)
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    glue = {n: torch.compile(f, dynamic=False, fullgraph=True) for n, f in GLUE.items()}
    try:
        for b in batches:
            log(f"compiling the glue for batch {b}")
            h = torch.randn(b, 1, s.hidden, device="cuda", dtype=torch.bfloat16)
            w = torch.ones(s.hidden, device="cuda", dtype=torch.bfloat16)
            glue["add_rms"](h, h, w)
            cs = torch.rand(1, 1, 1, s.head_dim // 2, device="cuda")
            for heads in (s.heads, s.kv_heads):
                glue["rope"](torch.randn(b, 1, heads, s.head_dim, device="cuda", dtype=torch.bfloat16), cs, cs)
            g = torch.randn(b, 1, s.inter, device="cuda", dtype=torch.bfloat16)
            glue["silu_mul"](g, g)
    except Exception as e:  # no working compiler stack: measure with eager glue, and say so
        print("torch.compile failed, eager glue:", repr(e)[:300], flush=True)
        return None
    return glue


def profile_step(dec: Decoder, batch: int, steps: int = 5) -> dict:
    """Device time per decode step by kernel (torch.profiler over eager steps; µs per step), top 12
    plus the total: where the step's time goes (graph replay removes the host gaps, not these)."""
    from torch.profiler import ProfilerActivity, profile

    dev = dec.embed.device
    ids = torch.randint(0, dec.s.vocab, (batch, 1), device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    dec.step(ids, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step(ids, pos)
        torch.cuda.synchronize()
    tot: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t and e.key and not e.key.startswith("cuda") and e.device_type.name == "CUDA":
            tot[e.key[:60]] = tot.get(e.key[:60], 0.0) + t / steps
    top = dict(sorted(tot.items(), key=lambda kv: -kv[1])[:12])
    return {"total_us": round(sum(tot.values()), 1), "top_us": {k: round(v, 1) for k, v in top.items()}}


def tune_layers(linears, batch: int, hidden_dtype=torch.bfloat16) -> dict:
    """Tune the kernel launch for each distinct layer shape at this batch (first layer's weights),
    printing each candidate's time and how long it took (compile included)."""
    chosen = {}

    def report(cfg, ms, secs):
        what = f"{ms * 1e3:8.2f} us" if ms is not None else "  failed   "
        slow = "  <- compiled here" if secs > 5 else ""
        log(f"    {what} in {secs:5.1f} s: {cfg}{slow}")

    for n, f in linears[0].items():
        t = time.time()
        log(f"  tuning {n} {tuple(f.kw.shape)} at batch {batch}")
        x = torch.randn(batch, f.kw.shape[1], device="cuda", dtype=hidden_dtype)
        cfg, ms = kernels.tune(x, f.kw, f.L, f.R, None, rep_ms=10, report=report)
        chosen[n] = {"config": cfg.__dict__ if cfg else None, "us": round(ms * 1e3, 2),
                     "seconds": round(time.time() - t, 1)}
        log(f"  tuned {n}: {chosen[n]['us']} us in {chosen[n]['seconds']} s")
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/decode.json", help="result JSON path")
    ap.add_argument("--model", choices=["llama3-8b", "llama3.2-3b"], default="llama3-8b", help="shapes")
    ap.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the model's)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--new", type=int, default=128, help="generated tokens per run")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (fed one at a time, untimed)")
    ap.add_argument("--bits", default="3,4", help="comma-separated lqkit bit widths")
    ap.add_argument("--rank", type=int, default=16, help="rank of L·R")
    ap.add_argument("--jobs", type=int, default=14, help="worker processes that precompile kernels (0: none)")
    ap.add_argument("--fuse", choices=["off", "on", "both"], default="both",
                    help="q/k/v and gate/up as one launch each (bf16: one concatenated matrix), or not, or both")
    ap.add_argument("--profile", action="store_true", help="also record device time per kernel of one step")
    ap.add_argument("--eager-glue", action="store_true",
                    help="run norms, RoPE and SiLU eagerly (default: torch.compile, in every variant)")
    args = ap.parse_args()

    s = LLAMA3_8B if args.model == "llama3-8b" else LLAMA3_2_3B
    if args.layers:
        s = Shape(**{**asdict(s), "layers": args.layers})
    torch.manual_seed(0)
    dev = "cuda"
    shapes = linear_shapes(s)
    t = time.time()
    weights = [{n: (torch.randn(shapes[n], device=dev) * 0.02).to(torch.bfloat16) for n in NAMES}
               for _ in range(s.layers)]
    embed = (torch.randn(s.vocab, s.hidden, device=dev) * 0.02).to(torch.bfloat16)
    lm_head = (torch.randn(s.vocab, s.hidden, device=dev) * 0.02).to(torch.bfloat16)
    log(f"random weights built in {time.time() - t:.0f} s")
    batches = [int(b) for b in args.batches.split(",")]
    if args.jobs:  # compile the tuning candidates in parallel worker processes first
        from kernel_layers import precompile

        log(f"precompiling the tuning candidates in {args.jobs} worker processes")
        ranks = (args.rank,) + ((2 * args.rank, 3 * args.rank) if args.fuse != "off" else ())  # stacked: Σ ranks
        precompile(args.jobs, False, bits_list=[int(b) for b in args.bits.split(",")], ranks=ranks,
                   tokens=tuple(batches), both_splits=True)  # the stacked gate/up does not split K
    max_len = args.prompt + args.new + 8
    fuses = {"off": (False,), "on": (True,), "both": (False, True)}[args.fuse]
    variants = {}  # name -> builder of (linears, bits per weight); built one at a time (memory)
    for fz in (False,) + tuple(f for f in fuses if f):  # plain bf16 always: the "× bf16" reference
        variants["bf16" + ("-fused" if fz else "")] = lambda fz=fz: (bf16_linears(weights, fz), 16.0)
    for bits in [int(b) for b in args.bits.split(",")]:
        for fz in fuses:
            variants[f"lqkit-rtn{bits}-g128-r{args.rank}" + ("-fused" if fz else "")] = \
                lambda bits=bits, fz=fz: lqkit_linears(weights, bits, args.rank, fz)
    from kernel_layers import env_info  # bench/kernel_layers.py (this script's folder is on sys.path)

    t = time.time()
    glue = None if args.eager_glue else compiled_glue(s, batches)
    log(f"glue: {'torch.compile' if glue else 'eager'} ({time.time() - t:.0f} s)")
    result = {"env": env_info(), "model": args.model, "shape": asdict(s), "random_weights": True,
              "glue": "torch.compile" if glue else "eager",
              "notes": "randomly initialised weights (speed only; outputs meaningless); embeddings and "
                       "lm_head bf16 in every variant; one decode step captured in a CUDA graph; residual "
                       "add + RMSNorm, RoPE and SiLU·up through torch.compile in every variant (unless glue is "
                       "eager); batch × new tokens / time of the generation loop (median of 3 runs).",
              "runs": []}
    for name, build in variants.items():
        t = time.time()
        lin, bits_per_weight = build()
        log(f"{name}: layers prepared in {time.time() - t:.0f} s")
        for b in batches:
            tuned = tune_layers(lin, b) if name.startswith("lqkit") else None
            dec = Decoder(s, lin, embed, lm_head, b, max_len, glue)
            log(f"{name}: batch {b}: generating")
            r = generate(dec, b, args.prompt, args.new)
            r.update({"variant": name, "bits_per_weight": round(bits_per_weight, 3), "tuned": tuned})
            if args.profile:
                try:
                    r["profile"] = profile_step(dec, b)
                    print(json.dumps(r["profile"]), flush=True)
                except Exception as e:
                    print("profiling failed:", repr(e)[:200], flush=True)
            result["runs"].append(r)
            log(f"{name:<24} batch {b}: {r['tokens_per_s']:9.1f} tok/s  ({r['ms_per_step']:.2f} ms/step)")
            del dec
            torch.cuda.empty_cache()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
        del lin
        torch.cuda.empty_cache()
    tps = {(r["variant"], r["batch"]): r["tokens_per_s"] for r in result["runs"]}
    for r in result["runs"]:  # against plain bf16, and against bf16 fused the same way
        same = "bf16-fused" if r["variant"].endswith("-fused") else "bf16"
        for key, base in (("speedup_vs_bf16", "bf16"), ("speedup_vs_bf16_same_fusion", same)):
            b = tps.get((base, r["batch"]))
            r[key] = round(r["tokens_per_s"] / b, 2) if b else None
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| variant | bits/weight | batch | tokens/s | ms/step | × bf16 | × bf16 same fusion |\n"
          "|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['variant']} | {r['bits_per_weight']} | {r['batch']} | {r['tokens_per_s']} | "
              f"{r['ms_per_step']} | {r['speedup_vs_bf16']} | {r['speedup_vs_bf16_same_fusion']} |")


if __name__ == "__main__":
    main()
