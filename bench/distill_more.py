"""A further round of ``lqkit distill`` on a checkpoint, and its perplexity on both texts of
``bench/quality_low_bits.py`` (WikiText-2 test and KJV narrative prose, 40 windows x 512 tokens, fp32,
CPU) before and after: what a user gets by running ``lqkit distill`` again on a distilled checkpoint
(e.g. a second epoch of KL steps over the same windows, another minibatch order).

    python bench/distill_more.py CKPT --work /tmp/more --kl-steps 200 --kl-lr 2e-6 --kl-batch 2 \
        --samples 600 --seqlen 256 --heldout 16 --seed 1 --out bench/results/distill-more-NAME.json
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, machine_info, write_json  # noqa: E402
from quality_low_bits import evaluate_all, texts  # noqa: E402

from lqkit import checkpoint
from lqkit.distill import DistillConfig, distill
from lqkit.evaluate import EvalProtocol
from lqkit.models import load_tokenizer


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("--work", required=True, help="the new checkpoint goes here (replaced)")
    ap.add_argument("--steps", type=int, default=0, help="block-wise steps per block")
    ap.add_argument("--kl-steps", type=int, default=200)
    ap.add_argument("--kl-lr", type=float, default=2e-6)
    ap.add_argument("--kl-batch", type=int, default=2)
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--skip-before", action="store_true", help="do not evaluate the input checkpoint")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = DistillConfig(steps=a.steps, kl_steps=a.kl_steps, kl_lr=a.kl_lr, kl_batch_size=a.kl_batch,
                        samples=a.samples, seqlen=a.seqlen, heldout=a.heldout, seed=a.seed)
    proto = EvalProtocol(windows=a.windows, batch_size=4)
    txts = texts()
    data = {"ckpt": str(a.ckpt), "config": cfg.to_dict(), "protocol": {"windows": a.windows, "window_tokens": 512}}

    def ppl(path) -> dict:
        model = checkpoint.load(path, dtype=torch.float32, device="cpu")
        return {k: v["perplexity"] for k, v in evaluate_all(model, load_tokenizer(str(path)), txts, proto).items()}

    if not a.skip_before:
        data["before"] = ppl(a.ckpt)
        write_json(Path(a.out), {**data, "machine": machine_info()})
    t0 = time.time()
    res = distill(a.ckpt, a.work, cfg, device="cpu", overwrite=True, progress=True)
    rep = res.extra["distill"]
    data["distill"] = {"seconds": round(time.time() - t0, 1), "heldout_nll": rep.get("heldout_nll"),
                       "kl": rep.get("kl")}
    data["after"] = ppl(a.work)
    data["effective_bits"] = res.effective_bits
    write_json(Path(a.out), {**data, "machine": machine_info()})


if __name__ == "__main__":
    main()
