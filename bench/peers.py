"""Peers benchmark: existing quantization tools side by side on the default model
(google/gemma-3-270m, fp32, CPU) under lqkit's fixed evaluation protocol (40 windows x 512 tokens of
WikiText-2 test, BOS first; see lqkit.evaluate).

Every peer quantizes the same matrices, the nn.Linear layers of the decoder blocks (lqkit's
``find_linears`` with the default include/exclude; embeddings / lm_head stay fp32), with its own
code; its result is turned back into dense fp32 weights that replace those layers' weights in a
freshly loaded fp32 model, which lqkit then evaluates. Only the quantized weights differ between
rows.

Peers (row names in brackets):
- RTN (lqkit)      [rtn-{4,3,2}b-g{128,64}]  lqkit's ``rtn`` (asymmetric min-max), groups along the input dim.
- HQQ              [hqq-{4,3,2}b-g{128,64}]  ``hqq.core.quantize.HQQLinear(linear, BaseQuantizeConfig(nbits,
                   group_size, axis=1), compute_dtype=float16, device="cpu").dequantize()``; the other
                   settings are BaseQuantizeConfig's defaults (optimize=True, round_zero only at 4 bits).
- GPTQModel        [gptqmodel-{4,3,2}b-g128]  ``GPTQModel.load(path, QuantizeConfig(bits, group_size=128))``,
                   ``.quantize(32 windows of BOS+511 tokens of the bundled WikiText-2 valid text)``, ``.save``,
                   reloaded with ``GPTQModel.load(dir, device="cpu", backend=BACKEND.GPTQ_TORCH,
                   dtype=float16)`` (its torch kernel takes fp16/bf16 only; the stored scales are fp16), and
                   each layer's ``dequantize_weight()`` with the scales cast to fp32 first. Runs in a child process (its imports set environment
                   variables and patch libraries); GPTQMODEL_CPU_WORKERS=2. Other settings are
                   QuantizeConfig's defaults (sym=True, desc_act=False, act_group_aware=True, damp_percent=0.05,
                   ...), recorded in the row. If gptqmodel is missing or fails, the row records the error and a
                   [gptq-lqkit-*] row with lqkit's own GPTQ (same calibration) is added.
- NF4 / NF2 (peft) [peft-nf{4,2}-b64]  ``peft.utils.loftq_utils.NFQuantizer(num_bits, method="normal",
                   block_size=64)``, quantize_block / dequantize_block (peft 0.20 removed it; 0.19 dropped
                   2-bit LoftQ: hence peft>=0.17,<0.19).
- LoftQ (peft)     [loftq-{4,2}b-r{16,64}-i{1,5}]  ``peft.utils.loftq_utils.loftq_init(W, num_bits, reduced_rank,
                   num_iter)`` -> (Q, lora_A, lora_B); the effective weight is Q + lora_B @ lora_A. peft's LoRA
                   layer adds lora_B @ lora_A times lora_alpha / r, which loftq_init does not compensate, so
                   W is reproduced only with lora_alpha = r (LoraConfig's defaults r = lora_alpha = 8 do;
                   r=16 or 64 needs lora_alpha set to match): this is that case. The factors are rounded to
                   fp16, as counted. peft sends 4-bit
                   LoftQ to bitsandbytes on CUDA/XPU whenever bitsandbytes is installed; here its
                   ``is_bnb_4bit_available`` is patched to False so 4 bits use NFQuantizer on the CPU (LoftQ's
                   original path; 2 bits always do), and its per-iteration ``clear_device_cache()`` (a
                   gc.collect() plus an accelerator cache flush, ~0.2 s a call here) is made a no-op.
- bitsandbytes NF4 [bnb-nf4-b64, bnb-nf4-b64-dq]  ``bitsandbytes.functional.quantize_4bit(W, blocksize=64,
                   quant_type="nf4", compress_statistics=dq)`` then ``dequantize_4bit`` (CPU backend).

Effective bits (the same rule for every tool, as lqkit and ../shared/ANCHORS.md count: every stored
code, scale and zero, 16-bit scales/zeros unless the tool stores them in fp32, then 32; per layer,
summed over layers and divided by their parameter count; n = out*in):
- RTN (lqkit):   lqkit's exact ``storage_bits``: b*n + (16+16)*out*ceil(in/g)          (4-bit g128: 4.25)
- HQQ:           b*n + (16+16)*n/g  (fp16 scale and zero per group of g along a row)  (4-bit g128: 4.25)
                 HQQ's own 3-bit packing stores 10 codes per int32 (3.2 bits/code); counted densely at b.
- GPTQModel:     b*n + (16+16)*out*ceil(in/g)  (ANCHORS' rule: 4-bit g128 = 4.25). It actually stores fp16
                 scales, b-bit packed zeros and an int32 g_idx per input column: b + (16+b)/g + 32/out.
- lqkit GPTQ:    lqkit's ``storage_bits`` (fp16 scale + offset per group): as RTN.
- peft NF:       b*n + 32*ceil(n/64)  (fp32 absmax per block of 64)                   (NF4: 4.5, NF2: 2.5)
- LoftQ:         peft NF as above + 16*r*(in+out)  (lora_A: r x in, lora_B: out x r, in fp16)
- bnb NF4:       4*n + 32*ceil(n/64)  (fp32 absmax per block of 64)                    (4.5)
- bnb NF4 + dq:  4*n + 8*ceil(n/64) + 32*ceil(ceil(n/64)/256) + 32  (absmax to 8 bits, fp32 scale per
                 256 absmax, one fp32 offset per tensor; the library's shared 256-entry code table is not
                 counted)                                                              (~4.127)

Quantize times: wall clock of the quantization alone, one torch thread (as bench/quality.py: many
small ops stall on OpenMP barriers on a busy machine), GPTQModel in its own process with
GPTQMODEL_CPU_WORKERS=2 and only its quantize() call timed; measured on a shared 2-core machine.

Writes (atomically, after every row) bench/results/peers-gemma-3-270m.json (rows + machine info +
protocol), a Markdown table beside it, and the Pareto plot pareto-gemma-3-270m.png (with lqkit's own
rows from bench/results/allocation-gemma-3-270m.json when that file exists). Rows already in the
JSON (same model and protocol) are skipped; --fresh starts over, --only REGEX runs a subset.

    python bench/peers.py [--only 'hqq|bnb'] [--fresh] [--model PATH] [--windows N] [--out PATH]
    python bench/peers.py --plot-only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, base_parser, fmt_ppl, machine_info, write_json, write_text  # noqa: E402

from lqkit.calibrate import CalibConfig, calibrate, calibration_ids  # noqa: E402
from lqkit.core import MatrixSpec, QuantSpec, decompose, storage_bits  # noqa: E402
from lqkit.data import DEFAULT_CALIB_TEXT, read_text  # noqa: E402
from lqkit.evaluate import EvalProtocol, perplexity, tokenize  # noqa: E402
from lqkit.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve  # noqa: E402
from lqkit.plan import uniform_plan  # noqa: E402

log = logging.getLogger("peers")

OUT = RESULTS / "peers-gemma-3-270m.json"
LQKIT_ROWS = RESULTS / "allocation-gemma-3-270m.json"
CALIB_SEQLEN = 512  # BOS + 511 tokens, as the evaluation windows
NF_BLOCK = 64  # peft NFQuantizer and bitsandbytes block size
TOOL_ORDER = ["full precision", "RTN (lqkit)", "HQQ", "GPTQModel", "GPTQ (lqkit's implementation)",
              "NF (peft NFQuantizer)", "LoftQ (peft)", "bitsandbytes NF4"]


# ---------------------------------------------------------------------------------------------
# What every peer gets, and what it returns

@dataclass
class Ctx:
    """What a peer needs besides the model: where it came from and the calibration settings."""

    model_path: str  # a local HF folder (the default model's cached conversion, or --model)
    tokenizer: object
    calib_samples: int
    info: dict = field(default_factory=dict)  # extra facts a peer reports (versions, configs, checks)


Quantizer = Callable[[nn.Module, dict[str, nn.Linear], Ctx], dict[str, torch.Tensor]]  # name -> W_hat (fp32)
BitsFn = Callable[[int, int], float]  # (out, in) -> stored bits of that matrix


@dataclass(frozen=True)
class Peer:
    name: str  # row key
    tool: str  # series in the table and plot
    package: str | None  # distribution whose version is reported
    setting: str  # human-readable settings
    stores: str  # what the tool stores per matrix
    formula: str  # the bit-accounting formula (n = out*in)
    bits: BitsFn
    quantize: Quantizer


def dense_bits(b: int, meta_bits: int, per: int) -> BitsFn:
    """b bits per code + ``meta_bits`` per block of ``per`` consecutive elements of a row."""
    return lambda out, inp: b * out * inp + meta_bits * out * math.ceil(inp / per)


def flat_block_bits(b: int, meta_bits: int, block: int) -> BitsFn:
    """b bits per code + ``meta_bits`` per block of ``block`` elements of the flattened matrix."""
    return lambda out, inp: b * out * inp + meta_bits * math.ceil(out * inp / block)


def version(package: str | None) -> str | None:
    if package is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def per_layer(fn: Callable[[torch.Tensor], torch.Tensor]) -> Quantizer:
    """A quantizer that maps each fp32 weight to its fp32 reconstruction independently."""
    def run(model, linears, ctx):
        return {name: fn(lin.weight.detach().float()) for name, lin in linears.items()}
    return run


# ---------------------------------------------------------------------------------------------
# The peers

def rtn_peer(bits: int, group: int) -> Peer:
    spec = MatrixSpec("quant", QuantSpec("rtn", bits, group))
    return Peer(f"rtn-{bits}b-g{group}", "RTN (lqkit)", "lqkit", f"{bits}-bit, g{group}, asymmetric min-max",
                "codes + fp16 scale and fp16 offset per group of g along the input dim",
                f"{bits}*n + 32*out*ceil(in/{group})", lambda o, i: storage_bits(spec, (o, i)),
                per_layer(lambda w: decompose(w, spec).reconstruct()))


def hqq_peer(bits: int, group: int) -> Peer:
    def fn(w: torch.Tensor) -> torch.Tensor:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        if w.shape[1] % group:
            raise ValueError(f"HQQ axis=1 groups need in_features % {group} == 0, got shape {tuple(w.shape)}")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        with contextlib.redirect_stdout(sys.stderr):  # hqq prints deprecation notes
            hq = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group, axis=1),
                           compute_dtype=torch.float16, device="cpu", del_orig=False)
        assert hq.meta["scale"].dtype == torch.float16 and hq.meta["zero"].dtype == torch.float16
        return hq.dequantize().float()

    return Peer(f"hqq-{bits}b-g{group}", "HQQ", "hqq", f"{bits}-bit, g{group}, axis=1, optimize=True",
                "codes + fp16 scale and fp16 zero per group of g along a row",
                f"{bits}*n + 32*n/{group}", dense_bits(bits, 32, group), per_layer(fn))


def nf_peer(bits: int) -> Peer:
    def fn(w: torch.Tensor) -> torch.Tensor:
        q = _nf_quantizer(bits)
        packed, absmax, shape = q.quantize_block(w)
        assert absmax.dtype == torch.float32
        return q.dequantize_block(packed, absmax, shape)

    return Peer(f"peft-nf{bits}-b{NF_BLOCK}", "NF (peft NFQuantizer)", "peft", f"NF{bits}, block {NF_BLOCK}",
                f"codes + fp32 absmax per block of {NF_BLOCK}", f"{bits}*n + 32*ceil(n/{NF_BLOCK})",
                flat_block_bits(bits, 32, NF_BLOCK), per_layer(fn))


def _nf_quantizer(bits: int):
    from peft.utils import loftq_utils

    if not hasattr(loftq_utils, "NFQuantizer"):
        raise RuntimeError(f"peft {version('peft')} has no NFQuantizer (removed in peft 0.20); install peft<0.19")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return loftq_utils.NFQuantizer(num_bits=bits, device="cpu", method="normal", block_size=NF_BLOCK)


def loftq_peer(bits: int, rank: int, iters: int) -> Peer:
    def fn(w: torch.Tensor) -> torch.Tensor:
        from unittest import mock

        from peft.utils import loftq_utils

        _nf_quantizer(bits)  # fails early with a clear message on peft >= 0.20
        with warnings.catch_warnings(), mock.patch.object(loftq_utils, "is_bnb_4bit_available", lambda: False), \
                mock.patch.object(loftq_utils, "clear_device_cache", lambda *a, **k: None):
            warnings.simplefilter("ignore", DeprecationWarning)
            q, lora_a, lora_b = loftq_utils.loftq_init(w, num_bits=bits, reduced_rank=rank, num_iter=iters)
        assert lora_a.shape == (rank, w.shape[1]) and lora_b.shape == (w.shape[0], rank)
        return q.float() + lora_b.half().float() @ lora_a.half().float()  # LoRA scaling lora_alpha / r = 1

    base = flat_block_bits(bits, 32, NF_BLOCK)
    return Peer(f"loftq-{bits}b-r{rank}-i{iters}", "LoftQ (peft)", "peft",
                f"NF{bits} block {NF_BLOCK} + rank {rank}, {iters} iteration{'s' * (iters > 1)}",
                f"NF{bits} codes + fp32 absmax per block of {NF_BLOCK} + lora_A (r x in), lora_B (out x r) in fp16",
                f"{bits}*n + 32*ceil(n/{NF_BLOCK}) + 16*{rank}*(in+out)",
                lambda o, i: base(o, i) + 16 * rank * (o + i), per_layer(fn))


def bnb_peer(double_quant: bool) -> Peer:
    def fn(w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        q, state = F.quantize_4bit(w, blocksize=NF_BLOCK, quant_type="nf4", compress_statistics=double_quant)
        if not double_quant:
            assert state.absmax.dtype == torch.float32
        return F.dequantize_4bit(q, state).float()

    if double_quant:
        def bits_fn(o, i):
            blocks = math.ceil(o * i / NF_BLOCK)
            return 4 * o * i + 8 * blocks + 32 * math.ceil(blocks / 256) + 32
        stores = (f"codes + absmax per block of {NF_BLOCK} quantized to 8 bits, an fp32 scale per 256 absmax "
                  "and one fp32 offset per tensor")
        formula = f"4*n + 8*ceil(n/{NF_BLOCK}) + 32*ceil(ceil(n/{NF_BLOCK})/256) + 32"
    else:
        bits_fn = flat_block_bits(4, 32, NF_BLOCK)
        stores, formula = f"codes + fp32 absmax per block of {NF_BLOCK}", f"4*n + 32*ceil(n/{NF_BLOCK})"
    return Peer(f"bnb-nf4-b{NF_BLOCK}{'-dq' * double_quant}", "bitsandbytes NF4", "bitsandbytes",
                f"NF4, block {NF_BLOCK}{', double quant' * double_quant}", stores, formula, bits_fn, per_layer(fn))


def gptqmodel_peer(bits: int, group: int = 128) -> Peer:
    def run(model, linears, ctx):
        with tempfile.TemporaryDirectory(prefix="peers-gptqmodel-") as tmp:
            job = {"model": ctx.model_path, "bits": bits, "group": group, "samples": ctx.calib_samples,
                   "names": list(linears), "dir": tmp}
            env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
            logf = Path(tmp) / "gptqmodel.log"
            with open(logf, "w") as f:
                rc = subprocess.run([sys.executable, __file__, "--gptqmodel-worker", json.dumps(job)],
                                    stdout=f, stderr=subprocess.STDOUT, env=env).returncode
            result = Path(tmp) / "result.json"
            if rc != 0 or not result.exists():
                tail = [t.strip() for t in logf.read_text(errors="replace").strip().splitlines()[-15:] if t.strip()]
                last = tail[-1] if tail else "no output"
                raise RuntimeError(f"gptqmodel worker exited with {rc}: {last} (log tail: {' | '.join(tail[:-1])})")
            ctx.info.update(json.loads(result.read_text()), quantize_threads=f"GPTQMODEL_CPU_WORKERS={env['GPTQMODEL_CPU_WORKERS']}")
            from safetensors.torch import load_file

            return load_file(Path(tmp) / "weights.safetensors")

    return Peer(f"gptqmodel-{bits}b-g{group}", "GPTQModel", "gptqmodel", f"{bits}-bit, g{group}, QuantizeConfig defaults (sym, desc_act off, act_group_aware on, damp 0.05)",
                "codes + fp16 scale + b-bit packed zero per group of g along the input dim + int32 g_idx per input column",
                f"{bits}*n + 32*out*ceil(in/{group})  [stored: {bits}*n + (16+{bits})*out*ceil(in/{group}) + 32*in]",
                dense_bits(bits, 32, group), run)


def lqkit_gptq_peer(bits: int, group: int = 128) -> Peer:
    spec = MatrixSpec("quant", QuantSpec("gptq", bits, group))

    def run(model, linears, ctx):
        text = read_text(None, DEFAULT_CALIB_TEXT)[0]
        cfg = CalibConfig(samples=ctx.calib_samples, seqlen=CALIB_SEQLEN, fisher=False)
        stats = calibrate(model, ctx.tokenizer, text, list(linears), cfg, progress=False)
        return {n: decompose(lin.weight.detach().float(), spec, stats.get(n)).reconstruct() for n, lin in linears.items()}

    return Peer(f"gptq-lqkit-{bits}b-g{group}", "GPTQ (lqkit's implementation)", "lqkit",
                f"{bits}-bit, g{group}, asymmetric, damp 0.01, no act-order",
                "codes + fp16 scale and fp16 offset per group of g along the input dim",
                f"{bits}*n + 32*out*ceil(in/{group})", lambda o, i: storage_bits(spec, (o, i)), run)


def peers() -> list[Peer]:
    """Every row, cheapest first (GPTQ last: it is the slowest)."""
    p = [rtn_peer(b, g) for b in (4, 3, 2) for g in (128, 64)]
    p += [bnb_peer(False), bnb_peer(True)]
    p += [nf_peer(4), nf_peer(2)]
    p += [hqq_peer(b, g) for b in (4, 3, 2) for g in (128, 64)]
    p += [loftq_peer(b, r, i) for b, r, i in ((4, 16, 1), (4, 16, 5), (4, 64, 5), (2, 16, 1), (2, 16, 5), (2, 64, 5))]
    p += [gptqmodel_peer(b) for b in (4, 3, 2)]
    return p


FALLBACK = {f"gptqmodel-{b}b-g128": lqkit_gptq_peer(b) for b in (4, 3, 2)}


# ---------------------------------------------------------------------------------------------
# GPTQModel, in a child process

def gptqmodel_worker(job: dict) -> None:
    """Quantize with GPTQModel, save, reload, dequantize every named layer to fp32 and write
    weights.safetensors + result.json into job["dir"]. Also checks that the dequantized weights give
    the same loss as GPTQModel's own reloaded model on one calibration window."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors.torch import save_file

    out = Path(job["dir"])
    tok = load_tokenizer(job["model"])
    ids = calibration_ids(tok, read_text(None, DEFAULT_CALIB_TEXT)[0], CalibConfig(samples=job["samples"], seqlen=CALIB_SEQLEN))
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]  # (samples, 512)
    qcfg = QuantizeConfig(bits=job["bits"], group_size=job["group"])
    model = GPTQModel.load(job["model"], qcfg, dtype=torch.float32)
    t0 = time.time()
    model.quantize(calib, batch_size=1)
    seconds = time.time() - t0
    probe = ids[:1]  # (1, 512)
    try:  # the in-memory model right after quantize(), which ANCHORS.md found unusable
        inmem_nll = _nll(model.model, probe)
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        inmem_nll = f"{type(e).__name__}: {e}"[:300]
    qdir = out / "quantized"
    model.save(str(qdir))
    del model
    # its torch kernel runs in fp16/bf16 only; the scales are stored in fp16, so fp16 loses nothing
    q = GPTQModel.load(str(qdir), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    weights = {}
    for name in job["names"]:
        mod = q.model.get_submodule(name)
        if not hasattr(mod, "dequantize_weight"):
            raise RuntimeError(f"{name} was not quantized by GPTQModel (it is a {type(mod).__name__})")
        scales = mod.scales
        mod.scales = scales.float()  # dequantize in fp32: scale * (code - zero)
        weights[name] = mod.dequantize_weight().t().float().contiguous()  # (in, out) -> (out, in)
        mod.scales = scales
    reloaded_nll = _nll(q.model, probe)
    base = load_model(job["model"]).model
    for name, w in weights.items():
        base.get_submodule(name).weight.data.copy_(w)
    dense_nll = _nll(base, probe)
    save_file(weights, str(out / "weights.safetensors"))
    cfg = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
           for k, v in vars(qcfg).items() if not k.startswith("_") and k != "offload_to_disk_path"}
    (out / "result.json").write_text(json.dumps({
        "quantize_seconds": round(seconds, 1), "quantize_config": cfg, "kernel": type(mod).__name__,
        "check_nll_window0": {"in_memory_after_quantize": inmem_nll, "reloaded_gptqmodel": reloaded_nll,
                              "dequantized_fp32": dense_nll, "uniform": math.log(q.model.config.vocab_size)}}))


@torch.no_grad()
def _nll(model: nn.Module, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids).logits.float()  # (1, T, V)
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


# ---------------------------------------------------------------------------------------------
# Running rows

def run_row(peer: Peer, model_path: str, text: str, proto: EvalProtocol, calib_samples: int) -> dict:
    row = {"name": peer.name, "tool": peer.tool, "tool_version": version(peer.package), "setting": peer.setting,
           "stores": peer.stores, "bits_formula": peer.formula, "error": None}
    loaded = load_model(model_path)
    model, tok = loaded.model, loaded.tokenizer
    linears = {n: model.get_submodule(n) for n in uniform_plan(model, MatrixSpec("quant", QuantSpec()))}
    ctx = Ctx(model_path, tok, calib_samples)
    threads = torch.get_num_threads()
    try:
        # per-matrix work is many small ops: one thread avoids OpenMP barrier stalls on a busy machine
        # (as bench/quality.py); GPTQModel runs in its own process with GPTQMODEL_CPU_WORKERS workers
        torch.set_num_threads(1)
        t0 = time.time()
        try:
            w_hat = peer.quantize(model, linears, ctx)
        finally:
            torch.set_num_threads(threads)
        row["quantize_seconds"] = round(ctx.info.pop("quantize_seconds", time.time() - t0), 1)
        if set(w_hat) != set(linears):
            raise RuntimeError(f"{peer.tool} returned {len(w_hat)} of {len(linears)} layers")
        errs, params, nbits = [], 0, 0
        for name, lin in linears.items():
            w, wq = lin.weight.detach(), w_hat[name].to(lin.weight.dtype)
            if wq.shape != w.shape or not torch.isfinite(wq).all():
                raise RuntimeError(f"{peer.tool} gave a bad reconstruction of {name}: shape {tuple(wq.shape)}")
            errs.append(float((w.float() - wq.float()).norm() / w.float().norm().clamp_min(1e-30)))
            params += w.numel()
            nbits += peer.bits(*w.shape)
            lin.weight.data.copy_(wq)
        del w_hat
    except Exception as e:  # a peer that cannot run here is a result too
        log.warning("%s failed: %s", peer.name, e)
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
        return row
    row.update(effective_bits=nbits / params, mean_rel_error=sum(errs) / len(errs), layers=len(linears),
               quantized_params=params, **{"quantize_threads": 1, **ctx.info})
    r = perplexity(model, tok, text, proto, progress=False, ids=tokenize(tok, text))
    row.update(perplexity=r.perplexity, nll=r.nll, eval_seconds=round(r.seconds, 1), windows=r.windows,
               window_tokens=r.window_tokens, tokens_scored=r.tokens_scored)
    return row


def fp32_row(model_path: str, text: str, proto: EvalProtocol) -> dict:
    loaded = load_model(model_path)
    r = perplexity(loaded.model, loaded.tokenizer, text, proto, progress=False, ids=tokenize(loaded.tokenizer, text))
    return {"name": "fp32", "tool": "full precision", "tool_version": None, "setting": "fp32", "stores": "fp32 weights",
            "bits_formula": "32*n", "error": None, "effective_bits": 32.0, "quantize_seconds": 0.0,
            "perplexity": r.perplexity, "nll": r.nll, "eval_seconds": round(r.seconds, 1), "windows": r.windows,
            "window_tokens": r.window_tokens, "tokens_scored": r.tokens_scored}


# ---------------------------------------------------------------------------------------------
# Table and plot

def _tool_key(r: dict) -> int:
    return TOOL_ORDER.index(r["tool"]) if r["tool"] in TOOL_ORDER else len(TOOL_ORDER)


def table(rows: list[dict]) -> str:
    lines = ["| tool | version | setting | effective bits | perplexity | quantize (s) | eval (s) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (_tool_key(r), -(r.get("effective_bits") or 0), r["name"])):
        if r.get("error"):
            lines.append(f"| {r['tool']} | {r.get('tool_version') or '—'} | {r['setting']} | — | — | — | — | "
                         f"not runnable: {r['error'][:160].replace('|', '/')} |")
            continue
        note = ""
        chk = r.get("check_nll_window0")
        if chk:
            inmem = chk["in_memory_after_quantize"]
            inmem = f"{inmem:.4g}" if isinstance(inmem, float) else "failed"
            note = (f"NLL of calibration window 0: in-memory model after quantize() {inmem}, "
                    f"saved + reloaded {chk['reloaded_gptqmodel']:.4g}, its dequantized fp32 weights "
                    f"{chk['dequantized_fp32']:.4g} (uniform: {chk['uniform']:.4g})")
        lines.append(f"| {r['tool']} | {r.get('tool_version') or '—'} | {r['setting']} | {r['effective_bits']:.3f} | "
                     f"{fmt_ppl(r['perplexity'])} | {r['quantize_seconds']:.0f} | {r['eval_seconds']:.0f} | {note} |")
    return "\n".join(lines) + "\n"


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front (fewer bits, lower perplexity) of (bits, ppl) points, by increasing bits."""
    front, best = [], math.inf
    for b, p in sorted(points):
        if p < best:
            front.append((b, p))
            best = p
    return front


def plot(rows: list[dict], lqkit_rows: list[dict] | None, path: Path) -> None:
    """Effective bits vs perplexity (log scale): every tool's rows as markers joined along that
    tool's own Pareto front; lqkit's budget rows as one line and its uniform rows as markers; the
    fp32 perplexity as a dashed line. Points above the plotted range sit on its top edge as ^."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error") and r.get("perplexity") is not None
          and math.isfinite(r["perplexity"]) and r["tool"] != "full precision"]
    lq = [r for r in (lqkit_rows or []) if r.get("perplexity") is not None and math.isfinite(r["perplexity"])
          and r.get("effective_bits") is not None and r["effective_bits"] < 31]  # an fp32 row: the dashed line
    fp = [r["perplexity"] for r in rows if r["tool"] == "full precision" and r.get("perplexity")]
    ppls = [r["perplexity"] for r in ok + lq] + fp
    if not ppls:
        log.warning("nothing to plot yet")
        return
    lo = min(ppls) / 1.3
    hi = min(max(ppls), (fp[0] if fp else min(ppls)) * 1e4) * 1.5  # collapsed 2-bit runs reach 1e18
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = "osD^vP*Xh<>"
    series: dict[str, list[tuple[float, float]]] = {}
    for r in ok:
        series.setdefault(r["tool"], []).append((r["effective_bits"], r["perplexity"]))
    for k, tool in enumerate(sorted(series, key=lambda t: TOOL_ORDER.index(t) if t in TOOL_ORDER else 99)):
        pts = series[tool]
        color = f"C{k % 10}"
        inside = [(b, p) for b, p in pts if p <= hi]
        above = [(b, hi) for b, p in pts if p > hi]
        ax.scatter([b for b, _ in inside], [p for _, p in inside], color=color, marker=markers[k % len(markers)],
                   label=tool, zorder=3)
        if above:
            ax.scatter([b for b, _ in above], [p for _, p in above], color=color, marker="^", zorder=3, clip_on=False)
        front = [(b, min(p, hi)) for b, p in _front(pts)]
        if len(front) > 1:
            ax.plot([b for b, _ in front], [p for _, p in front], color=color, lw=1.2, alpha=0.8)
    budget = sorted((r["effective_bits"], r["perplexity"]) for r in lq if r.get("kind") == "budget")
    uniform = [(r["effective_bits"], r["perplexity"]) for r in lq if r.get("kind") == "uniform"]
    if budget:
        ax.plot([b for b, _ in budget], [min(p, hi) for _, p in budget], color="black", lw=2, marker="o",
                label="lqkit budget", zorder=4)
    if uniform:
        ax.scatter([b for b, _ in uniform], [min(p, hi) for _, p in uniform], color="black", marker="x", s=50,
                   label="lqkit uniform", zorder=4)
    if fp:
        ax.axhline(fp[0], color="gray", ls="--", lw=1, label=f"fp32 ({fp[0]:.2f})")
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.set_xlabel("effective bits per parameter (codes + scales/zeros + low-rank factors)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity vs size of the quantized decoder linears (^: above the plotted range)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_path(out: Path) -> Path:
    return out.with_name(out.name.replace("peers-", "pareto-", 1)).with_suffix(".png") if out.name.startswith("peers-") \
        else out.with_name(out.stem + "-pareto.png")


def load_lqkit_rows(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None


def write_outputs(data: dict, out: Path, lqkit_rows_path: Path) -> None:
    write_json(out, data)
    write_text(out.with_suffix(".md"), table(data["rows"]))
    plot(data["rows"], load_lqkit_rows(lqkit_rows_path), plot_path(out))


# ---------------------------------------------------------------------------------------------

def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--model", default=None, help="model folder or Hub id (default: google/gemma-3-270m)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40, the protocol)")
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration windows of BOS + 511 tokens")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results JSON (default {OUT}); .md and the plot go beside it")
    ap.add_argument("--lqkit-rows", type=Path, default=LQKIT_ROWS, help="lqkit's rows to add to the plot, if present")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot from --out and --lqkit-rows")
    ap.add_argument("--retry-errors", action="store_true", help="run again the rows that recorded an error")
    ap.add_argument("--gptqmodel-worker", default=None, help=argparse.SUPPRESS)  # internal: the child process
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")  # peft logs every matrix at INFO
    log.setLevel(logging.INFO)
    if a.gptqmodel_worker:
        gptqmodel_worker(json.loads(a.gptqmodel_worker))
        return
    if a.plot_only:
        data = json.loads(a.out.read_text()) if a.out.exists() else {"rows": []}
        plot(data["rows"], load_lqkit_rows(a.lqkit_rows), plot_path(a.out))
        log.info("wrote %s", plot_path(a.out))
        return

    model_path = resolve(a.model)
    label = a.model or DEFAULT_MODEL
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    protocol = {"windows": a.windows, "window_tokens": proto.window_tokens, "batch_size": proto.batch_size,
                "text": "WikiText-2 raw test (bundled)", "dtype": "float32",
                "quantized": "nn.Linear layers of the decoder blocks (lqkit find_linears defaults)",
                "gptq_calibration": f"{a.calib_samples} windows of BOS + {CALIB_SEQLEN - 1} tokens of the bundled "
                                    "WikiText-2 valid text"}
    text, _ = read_text(None)
    data = {"rows": []}
    if a.out.exists() and not a.fresh:
        data = json.loads(a.out.read_text())
        if data.get("protocol") != protocol or data.get("model") != label:
            log.warning("%s holds another model or protocol: starting over", a.out)
            data = {"rows": []}
    done = {r["name"] for r in data["rows"] if not (a.retry_errors and r.get("error"))}

    todo: list[Peer | None] = [None, *peers()]  # None: the fp32 reference
    fallbacks: set[str] = set()  # rows added because a peer failed: they run whatever --only says
    versions = {p: version(p) for p in ("torch", "transformers", "lqkit", "hqq", "peft", "bitsandbytes", "gptqmodel")}
    while todo:
        peer = todo.pop(0)
        name = peer.name if peer else "fp32"
        if name in done or (a.only and not re.search(a.only, name) and name not in fallbacks):
            continue
        log.info("running %s", name)
        row = run_row(peer, model_path, text, proto, a.calib_samples) if peer else fp32_row(model_path, text, proto)
        if row.get("error"):
            log.info("%s: error %s", name, row["error"][:300])
            if name in FALLBACK and FALLBACK[name].name not in done:
                todo.insert(0, FALLBACK[name])
                fallbacks.add(FALLBACK[name].name)
        else:
            log.info("%s: %.3f bits, ppl %s (quantize %.0f s, eval %.0f s)", name, row["effective_bits"],
                     fmt_ppl(row["perplexity"]), row["quantize_seconds"], row["eval_seconds"])
        data["rows"] = [r for r in data["rows"] if r["name"] != name] + [row]
        done.add(name)
        data.update(model=label, model_path=model_path, protocol=protocol, versions=versions, machine=machine_info())
        write_outputs(data, a.out, a.lqkit_rows)
    if a.out.exists():
        plot(data["rows"], load_lqkit_rows(a.lqkit_rows), plot_path(a.out))  # lqkit's rows may be newer


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
