"""Fine-tuning benchmark: LQ-LoRA (train L, R of an LQ decomposition, Q frozen) vs QLoRA-style
(NF base + zero-initialised LoRA of the same rank and the same total bits) on google/gemma-3-270m,
plus the peak memory of full fine-tuning of the uncompressed model.

Every run fine-tunes on the bundled WikiText-2 *valid* split (the calibration text; never the test
split) with the same packing, steps, schedule and seed, and is evaluated on WikiText-2 *test* before
and after with lqkit's protocol (40 windows x 512 tokens, BOS first, fp32).

Pairs of equal total bits (codes + scales + fp16 factors, counted exactly by lqkit):
- ~2.55 bits: lqkit GPTQ2/g128 + K-FAC-weighted r8 (2 + 32/128 bits/weight + factors) vs NF2/g64 + r8
  (2 + 16/64 + factors)
- ~2.86 bits: the same with rank 16 (no NF3 base fits under 3 bits with a rank-16 adapter)
- ~3.55 bits: lqkit GPTQ3/g128 + K-FAC-weighted r8 vs NF3/g64 + r8
- ablation: the GPTQ2/g128 base with a zero-initialised rank-8 LoRA (init vs base)
- data-free LQ (rtn2/rtn3 g128 + r8, 2.55/3.55 bits) vs NF2/NF3 g64 + r8: further rows, run on request
The GPTQ rows use the calibration statistics of bench/sensitivity.py (cached; computed on first use).

Each row runs in its own process so that its peak resident memory (Linux VmHWM, reset before
training) is its own; "of it training" is that peak minus the resident size when training starts
(model, data, libraries), i.e. what gradients, optimizer state, activations and the transient
dequantized weights add. Results go to
bench/results/finetune-gemma-3-270m.json (after every row; finished rows are skipped on a rerun)
and a Markdown table beside it.

    python bench/finetune.py [--only 'lq|qlora'] [--steps 100] [--fresh]
    python bench/finetune.py --model DIR --steps 2 --windows 2 --seq-len 64 --out /tmp/ft.json  # smoke, any local model
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, base_parser, machine_info, write_json, write_text  # noqa: E402

from lqkit.calibrate import CalibConfig, calibrate, calibration_ids
from lqkit.compress import compress_model, needed_stats, size_summary
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.data import DEFAULT_CALIB_TEXT, bundled_path, read_text
from lqkit.evaluate import EvalProtocol, perplexity, tokenize
from lqkit.finetune import FinetuneConfig, peak_memory, reset_peak_memory, train, zero_init_lora
from lqkit.models import load_model
from lqkit.plan import uniform_plan
from lqkit.train_data import load_packed

OUT = RESULTS / "finetune-gemma-3-270m.json"


def rows() -> dict[str, tuple[str, MatrixSpec | None]]:
    """Row name -> (kind, spec). kind: lq (decomposition init), qlora (zero-init LoRA), full (dense).

    The lqkit rows are its best low-rank decomposition at these sizes (GPTQ 2-bit, act-order + MSE
    range, then a K-FAC-weighted SVD of the residual, i.e. data-aware LoRC); the QLoRA rows have the
    same total bits (NF2 with absmax per 64 = 2.25 bits, as rtn/gptq 2-bit g128's 2 + 32/128)."""
    gptq2 = QuantSpec("gptq", 2, 128, act_order=True, clip=True)
    return {
        "lq-gptq2-g128-r8-kfac": ("lq", MatrixSpec("lorc", gptq2, 8, weighting="kfac")),
        "qlora-nf2-g64-r8": ("qlora", MatrixSpec("lorc", QuantSpec("nf", 2, 64), 8)),
        "lq-gptq2-g128-r16-kfac": ("lq", MatrixSpec("lorc", gptq2, 16, weighting="kfac")),
        "qlora-nf2-g64-r16": ("qlora", MatrixSpec("lorc", QuantSpec("nf", 2, 64), 16)),
        "lq-gptq3-g128-r8-kfac": ("lq", MatrixSpec("lorc", replace(gptq2, bits=3), 8, weighting="kfac")),
        # ablation: lqkit's GPTQ base with a zero-initialised LoRA (separates the init from the base)
        "zeroinit-gptq2-g128-r8": ("qlora", MatrixSpec("lorc", gptq2, 8)),
        "lq-rtn2-g128-r8": ("lq", MatrixSpec("lq", QuantSpec("rtn", 2, 128), 8)),  # data-free LQ init
        "lq-rtn3-g128-r8": ("lq", MatrixSpec("lq", QuantSpec("rtn", 3, 128), 8)),
        "qlora-nf3-g64-r8": ("qlora", MatrixSpec("lorc", QuantSpec("nf", 3, 64), 8)),
        "full-ft-fp32": ("full", None),  # memory only (a few steps)
    }


def calibration(model_id: str | None, loaded, plan) -> tuple[object, torch.Tensor | None]:
    """(statistics, sequential calibration ids) for a plan that needs them, else (None, None).
    The default model's statistics are bench/sensitivity.py's cached ones (64 x 512 tokens of the
    calibration text); another model is calibrated here on 8 x 128 tokens (smoke runs)."""
    need = needed_stats(plan)
    if not need:
        return None, None
    text = read_text(None, DEFAULT_CALIB_TEXT)[0]
    if model_id is None:
        from sensitivity import CALIB, get_stats
        stats, cfg = get_stats(progress=False), CALIB
    else:
        cfg = CalibConfig(samples=8, seqlen=128, fisher="fisher" in need)
        stats = calibrate(loaded.model, loaded.tokenizer, text, list(plan), cfg, text_label="calib",
                          model_label=model_id, progress=False)
    ids = calibration_ids(loaded.tokenizer, text, cfg) if "h" in need else None
    return stats, ids


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand freed heap pages back to the OS
    except (OSError, AttributeError):
        pass


def run_row(name: str, a: argparse.Namespace) -> dict:
    kind, spec = rows()[name]
    loaded = load_model(a.model)
    model, tok = loaded.model, loaded.tokenizer
    cfg = FinetuneConfig(steps=a.steps if kind != "full" else min(a.steps, a.full_steps), seq_len=a.seq_len,
                         batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr, warmup_steps=a.warmup_steps,
                         seed=0, eval_every=0, eval_fraction=0.02, max_eval_sequences=8, save_every=0)
    data = load_packed(bundled_path(DEFAULT_CALIB_TEXT), tok, cfg.seq_len, eval_fraction=cfg.eval_fraction,
                       max_eval_sequences=cfg.max_eval_sequences)
    text, _ = read_text(None)
    ids = tokenize(tok, text)
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    row = {"name": name, "kind": kind, "spec": spec.to_dict() if spec else None,
           "label": spec.label() if spec else "fp32", "config": cfg.to_dict(),
           "train_sequences": int(data.input_ids.shape[0])}
    params = None
    if spec is not None:
        plan = uniform_plan(model, spec)
        stats, seq = calibration(a.model, loaded, plan)
        t0 = time.time()
        compress_model(model, plan, progress=False, stats=stats, sequential=seq)
        del stats
        row["compress_seconds"] = round(time.time() - t0, 1)
        row["effective_bits"] = size_summary(model).effective_bits
        if kind == "qlora":
            zero_init_lora(model, seed=0)
        row["ppl_before"] = perplexity(model, tok, text, proto, progress=False, ids=ids, materialize=True).perplexity
    else:
        row["effective_bits"] = 32.0
        params = dict(model.named_parameters())
    _release_freed_memory()  # what compression allocated and freed is not training memory
    reset_peak_memory()
    rss_before = peak_memory()  # right after the reset: the current resident size (model + data)
    res = train(model, data, cfg, params=params, progress=a.progress)
    row.update(steps=res.steps, losses=list(res.losses), heldout_loss=res.evals[-1][1] if res.evals else None,
               train_seconds=round(res.seconds, 1), tokens=res.tokens, trainable_params=res.trainable_params,
               memory_before_train_mib=round(rss_before / 2**20), peak_train_memory_mib=round(res.peak_memory_bytes / 2**20),
               seconds_per_step=round(res.seconds / max(res.steps, 1), 2))
    if spec is not None:
        row["ppl_after"] = perplexity(model, tok, text, proto, progress=False, ids=ids, materialize=True).perplexity
    return row


def table(data: dict) -> str:
    lines = ["| run | spec | effective bits | trainable params | ppl before | ppl after | peak memory (MiB) | of it training (MiB) | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if v < 1e4 else f"{v:.3g}")  # noqa: E731
    for r in data["rows"]:
        lines.append(f"| {r['name']} | `{r['label']}` | {r['effective_bits']:.3f} | {r['trainable_params'] / 1e6:.2f}M | "
                     f"{fmt(r.get('ppl_before'))} | {fmt(r.get('ppl_after'))} | {r['peak_train_memory_mib']} | "
                     f"{r['peak_train_memory_mib'] - r['memory_before_train_mib']} | {r['seconds_per_step']} |")
    s = data["settings"]
    lines.append("")
    lines.append(f"{s['steps']} steps x {s['batch_size']}x{s['grad_accum']} sequences x {s['seq_len']} tokens of "
                 f"WikiText-2 valid, AdamW lr {s['lr']}, cosine, seed 0; perplexity on WikiText-2 test, "
                 f"{s['windows']} windows x 512 tokens. Full fine-tuning ran {s['full_steps']} steps (memory only).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--model", default=None, help="model id or folder (default google/gemma-3-270m)")
    ap.add_argument("--out", type=Path, default=OUT, help="results JSON (a .md table is written beside it)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    ap.add_argument("--full-steps", type=int, default=3, help="steps of the full fine-tuning memory run (default 3)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--progress", action="store_true", help="show the training progress bar")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # worker: run one row, write JSON to --row-out
    ap.add_argument("--row-out", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.row:
        write_json(a.row_out, run_row(a.row, a))
        return
    settings = {k: getattr(a, k) for k in ("steps", "full_steps", "seq_len", "batch_size", "grad_accum", "lr",
                                           "warmup_steps", "windows", "model")}
    data = {"rows": []}
    if a.out.exists() and not a.fresh:
        data = json.loads(a.out.read_text())
        if data.get("settings") != settings:
            data = {"rows": []}
    done = {r["name"] for r in data["rows"]}
    for name in rows():
        if name in done or (a.only and not re.search(a.only, name)):
            continue
        logging.info("running %s", name)
        with tempfile.TemporaryDirectory() as tmp:
            row_out = Path(tmp) / "row.json"
            argv = [sys.executable, __file__, "--row", name, "--row-out", str(row_out)]
            argv += [x for k, v in vars(a).items() if k not in ("row", "row_out", "only", "fresh", "out", "progress")
                     and v is not None for x in (f"--{k.replace('_', '-')}", str(v))]
            argv += ["--progress"] if a.progress else []
            subprocess.run(argv, check=True)
            row = json.loads(row_out.read_text())
        logging.info("%s: %.3f bits, ppl %s -> %s, peak %d MiB", name, row["effective_bits"], row.get("ppl_before"),
                     row.get("ppl_after"), row["peak_train_memory_mib"])
        data["rows"].append(row)
        data.update(model=a.model or "google/gemma-3-270m", settings=settings, machine=machine_info(),
                    protocol={"windows": a.windows, "window_tokens": 512, "text": "WikiText-2 raw test (bundled)",
                              "train_text": "WikiText-2 raw valid (bundled)", "dtype": "float32"})
        write_json(a.out, data)
        write_text(a.out.with_suffix(".md"), table(data))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
