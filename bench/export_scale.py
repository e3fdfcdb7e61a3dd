"""Export at scale: a random-initialised model of a real shape (bench/synth.py), compressed with
`rtn 4-bit g128` (what vLLM serves through Marlin), exported with `lqkit export --format
compressed-tensors`, then read back as a user of transformers would — `from_pretrained` of the
folder (compressed-tensors installed), also with `CompressedTensorsConfig(dequantize=True)`, and
through `lqkit.export.load_compressed_tensors` — each compared with lqkit's own model on one prompt
(relative error of the last-position logits). Times and peak host memory of every stage; the JSON
is written after each stage.

    python bench/export_scale.py --shape llama2-7b --layers 32 --device cuda --out bench/results/export-scale-h200.json
    python bench/export_scale.py --shape tiny --device cpu --out /tmp/x.json     # checks the script
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from common import machine_info, write_json  # noqa: E402


def rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits[0, -1].float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/lqkit-export-scale")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from synth import build

    from lqkit import checkpoint, pipeline
    from lqkit.core.decompose import MatrixSpec
    from lqkit.core.quant import QuantSpec
    from lqkit.export import export, load_compressed_tensors

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    res = {"machine": machine_info(), "shape": args.shape, "layers": args.layers, "device": args.device,
           "spec": "quant:rtn4/g128in", "stages": {}}
    out = Path(args.out)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    def stage(name: str, fn):
        t = time.time()
        try:
            value = fn()
            res["stages"][name] = {"seconds": round(time.time() - t, 1), "peak_rss_mib": rss_mib()}
        except Exception as e:  # noqa: BLE001 — recorded, the next stages still run
            value = None
            res["stages"][name] = {"seconds": round(time.time() - t, 1), "error": f"{type(e).__name__}: {e}"[:600]}
        print(f"{name}: {res['stages'][name]}", flush=True)
        write_json(out, res)
        return value

    folder = stage("build", lambda: build(args.shape, args.layers, work / "model", device=args.device,
                                          dtype=torch.bfloat16))
    ck = work / "ck"
    stage("compress", lambda: pipeline.compress(str(folder), MatrixSpec("quant", QuantSpec("rtn", 4, 128)), str(ck),
                                                device=args.device, progress=False))
    ex = work / "ck-ct"
    r = stage("export", lambda: export(ck, ex, "compressed-tensors"))
    if r is not None:
        res["export"] = {"layers": r.layers if hasattr(r, "layers") else None,
                         "bytes": sum(f.stat().st_size for f in ex.rglob("*") if f.is_file())}
    ids = torch.randint(4, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = stage("lqkit_load_and_logits", lambda: logits(checkpoint.load(ck, dtype=dtype, device=args.device), ids))
    gc.collect()

    def transformers_load(dequantize: bool):
        from transformers import AutoModelForCausalLM

        kw = {}
        if dequantize:
            from transformers import CompressedTensorsConfig

            kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        m = AutoModelForCausalLM.from_pretrained(ex, dtype=dtype, device_map=args.device, **kw)
        return logits(m, ids)

    readers = {"transformers_from_pretrained": lambda: transformers_load(False),
               "transformers_dequantize": lambda: transformers_load(True),
               "lqkit_load_compressed_tensors": lambda: logits(load_compressed_tensors(ex, dtype=dtype).to(args.device),
                                                               ids)}
    for name, fn in readers.items():
        got = stage(name, fn)
        if got is not None and ref is not None:
            err = float((got - ref).norm() / ref.norm())
            res["stages"][name]["logits_rel_err_vs_lqkit"] = err
            print(f"  rel. err {err:.3e}", flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_json(out, res)


if __name__ == "__main__":
    main()
