"""Compression at real sizes, driven as a user would: ``lqkit compress`` on a model folder.

Builds random-initialised models of real shapes (bench/synth.py: bf16 safetensors + a tokenizer)
and runs the CLI on them, one process per run, recording wall time (the process's, start to exit),
each stage's time, peak host RSS and peak GPU memory (both as the run itself reports them in its
checkpoint's lqkit.json) and the bits reached. Rows are written as they finish, so a run cut short
keeps what it measured.

    python bench/scale.py --shape llama2-7b --layers 8,32 --runs rtn4,gptq4,budget3 \\
        --out bench/results/scale-h200.json

``--model FOLDER`` runs on an existing model folder instead (e.g. the default model on a CPU, with
``--extra=--eval`` for its perplexity):

    python bench/scale.py --model ~/.cache/lqkit/models/gemma-3-270m --device cpu --runs budget3 \\
        --extra=--eval --out bench/results/scale-cpu.json
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, machine_info, plan_mix, write_json  # noqa: E402

RUNS = {  # name -> lqkit compress arguments
    "rtn4": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "gptq4": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    "budget3": ["--budget", "3.0"],
    "budget3-compact": ["--budget", "3.0", "--cand-quantizers", "rtn,gptq", "--cand-bits", "2,3,4,8",
                        "--cand-group-sizes", "64,128", "--cand-group-dims", "in", "--cand-ranks", "0,16",
                        "--cand-outliers", "0"],
}


def run_args(name: str) -> list[str]:
    """A run's lqkit compress arguments: one of RUNS, or "budgetX" for --budget X (e.g. budget2.25)."""
    if name in RUNS:
        return RUNS[name]
    m = re.fullmatch(r"budget(\d+(?:\.\d+)?)", name)
    if m is None:
        raise SystemExit(f"unknown run {name!r}: one of {', '.join(RUNS)} or budgetX, e.g. budget2.5")
    return ["--budget", m.group(1)]


def run_one(folder: Path, name: str, work: Path, device: str, timeout: float, extra: list[str], nproc: int = 1,
            keep: bool = False) -> dict:
    args = run_args(name)
    out = work / f"ck-{folder.name}-{name}"
    log = work / f"log-{folder.name}-{name}.txt"
    lqkit = [sys.executable, "-m", "lqkit"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "lqkit"]
    cmd = lqkit + ["compress", "--model", str(folder), "--out", str(out), "--overwrite", "--device", device,
                   *args, *extra]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - t0
    row = {"run": name, "model": folder.name, "processes": nproc, "args": args + extra, "returncode": rc,
           "wall_seconds": round(wall, 1), "log_tail": log.read_text()[-3000:]}
    meta = out / "lqkit.json"
    if rc == 0 and meta.is_file():
        m = json.loads(meta.read_text())
        e = m.get("extra") or {}
        row.update({k: e.get(k) for k in ("stage_seconds", "peak_rss_mib", "peak_gpu_reserved_mib",
                                          "peak_gpu_allocated_mib", "device", "dtype")})
        row["effective_bits"] = (m.get("summary") or {}).get("effective_bits")
        if e.get("eval"):
            row["eval"] = e["eval"]
        row["checkpoint_bytes"] = sum(f["bytes"] for f in m["files"].values())
        a = e.get("allocation")
        if a:
            row["allocation"] = {k: a.get(k) for k in ("achieved_bits_per_param", "solver_status", "table_seconds",
                                                       "evaluated", "variables")}
        try:  # the plan's formats and where they run on a GPU
            from lqkit import pipeline

            row["plan_mix"] = plan_mix(out)
            row["gpu_summary"] = pipeline.inspect(str(out))["gpu_summary"]
        except Exception as ex:  # recorded; the row's measurements stay
            row["inspect_error"] = f"{type(ex).__name__}: {ex}"[:300]
        if keep:
            row["checkpoint"] = str(out)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)  # disk: the next row needs the room
    print(f"  -> rc={rc} wall={wall:.0f}s stages={row.get('stage_seconds')} rss={row.get('peak_rss_mib')}MiB "
          f"gpu={row.get('peak_gpu_reserved_mib')}MiB bits={row.get('effective_bits')}", flush=True)
    return row


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--layers", default="8", help="comma-separated decoder-block counts")
    ap.add_argument("--runs", default="rtn4,gptq4,budget3", help=f"comma-separated, of {', '.join(RUNS)} or budgetX")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    ap.add_argument("--work", default="/tmp/lqkit-scale", help="where model folders and checkpoints go")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--keep", action="store_true", help="keep each run's checkpoint under --work (else removed)")
    ap.add_argument("--extra", default="", help="further lqkit compress arguments for every run")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/scale-<shape>.json)")
    ap.add_argument("--model", default=None, help="an existing model folder instead of built ones (--shape, "
                    "--layers unused)")
    a = ap.parse_args()
    from synth import build

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    name = Path(a.model).name if a.model else a.shape
    out = Path(a.out or Path(__file__).parent / "results" / f"scale-{name}.json")
    result = {"machine": machine_info(), "shape": name, "rows": []}
    if out.is_file() and not a.fresh:
        result["rows"] = json.loads(out.read_text()).get("rows", [])
    if a.model:
        folder = Path(a.model).expanduser()
        for run in a.runs.split(","):
            row = run_one(folder, run, work, a.device, a.timeout, a.extra.split(), a.nproc, a.keep)
            row["layers"] = json.loads((folder / "config.json").read_text()).get("num_hidden_layers")
            result["rows"].append(row)
            write_json(out, result)
        return
    for layers in [int(v) for v in a.layers.split(",")]:
        folder = work / f"{a.shape}-{layers}l"
        if not (folder / "config.json").is_file():
            t0 = time.time()
            build(a.shape, layers, folder, device=a.device)
            print(f"[{time.strftime('%H:%M:%S')}] built {folder} in {time.time() - t0:.0f} s", flush=True)
        for name in a.runs.split(","):
            row = run_one(folder, name, work, a.device, a.timeout, a.extra.split(), a.nproc, a.keep)
            row["layers"] = layers
            result["rows"].append(row)
            write_json(out, result)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
