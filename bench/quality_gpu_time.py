"""How long the quality runs of ``bench/quality_low_bits.py`` take on a GPU, through the CLI a user runs.

The real weights cannot reach the GPU machine, so a model of the default model's exact shape
(google/gemma-3-270m: its config.json and tokenizer files, from ``--shape DIR``) is built there with
random weights (transformers' initialisation, seed 0), saved as a bf16 safetensors folder, and then
driven as a user would (each step timed, wall clock, its own process):

1. ``lqkit compress --model DIR --budget B`` over the compact candidates with rotations and integer
   zero points (the rows of ``quality-low-bits-seq-iz-*.json``: rtn/nf/gptq x 2/3/4/8 bits x groups
   64/128 along in x ranks 0/16, ``--rotate --int-zero``, sequential statistics, the default 64 x
   512-token WikiText-2 validation calibration), ``--device cuda``;
2. ``lqkit distill CK --steps 0 --kl-steps N`` with the fourth KL recipe's windows (600 x 256 tokens,
   16 held out, lr 2e-6, 2 windows a step), ``--device cuda``;
3. ``lqkit eval`` of the distilled checkpoint (the fixed protocol: 40 windows x 512 tokens).

The perplexities of a random model mean nothing and are not reported; only the times are.

    python bench/quality_gpu_time.py --shape DIR --work /tmp/q --out bench/results/quality-gpu-time-h200.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

CANDS = ["--cand-quantizers", "rtn,nf,gptq", "--cand-bits", "2,3,4,8", "--cand-group-sizes", "64,128",
         "--cand-group-dims", "in", "--cand-ranks", "0,16", "--cand-outliers", "0", "--rotate", "--int-zero"]
KL = ["--steps", "0", "--kl-steps", "{kl}", "--kl-lr", "2e-6", "--kl-batch-size", "2", "--calib-samples", "600",
      "--calib-seqlen", "256", "--heldout", "16"]


def build(shape: Path, out: Path) -> float:
    """A random-initialised bf16 model of ``shape``'s config, with its tokenizer, saved to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.time()
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(shape)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in shape.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    return time.time() - t


def timed(cmd: list[str], log: Path) -> dict:
    t = time.time()
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-m", "lqkit", *cmd], stdout=fh, stderr=subprocess.STDOUT).returncode
    return {"command": "lqkit " + " ".join(cmd), "seconds": round(time.time() - t, 1), "exit": rc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="folder with the default model's config.json and tokenizer")
    ap.add_argument("--work", default="/tmp/lqkit-quality-gpu")
    ap.add_argument("--budgets", default="3.0")
    ap.add_argument("--kl-steps", type=int, default=100)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = {"model": "google/gemma-3-270m's shape, random bf16 weights", "rows": [],
            "build_seconds": round(build(Path(a.shape), work / "model"), 1)}
    for b in a.budgets.split(","):
        ck, dist = work / f"ck-{b}", work / f"distilled-{b}"
        row = {"budget": float(b)}
        row["compress"] = timed(["compress", "--model", str(work / "model"), "--budget", b, *CANDS, "--device", "cuda",
                                 "--out", str(ck), "--overwrite"], work / f"compress-{b}.log")
        if row["compress"]["exit"] == 0 and a.kl_steps:
            row["distill"] = timed(["distill", str(ck), *[s.format(kl=a.kl_steps) for s in KL], "--device", "cuda",
                                    "--out", str(dist), "--overwrite"], work / f"distill-{b}.log")
            if row["distill"]["exit"] == 0:
                row["eval"] = timed(["eval", str(dist), "--device", "cuda"], work / f"eval-{b}.log")
        data["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(Path(a.out), {**data, "machine": machine_info()})


if __name__ == "__main__":
    main()
