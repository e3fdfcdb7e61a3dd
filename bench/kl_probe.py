"""How the end-to-end KL stage of ``lqkit distill`` moves the KL as it trains, for one checkpoint and one
learning rate: the KL(teacher ‖ student) on held-out windows and on 16 of the training windows, every
``--every`` steps (CPU, fp32, the default model as teacher).

``lqkit distill --kl-steps N`` reports the KL only before and after (and keeps the result only if the
held-out KL fell). This probe shows the path in between, to choose a learning rate: the same windows
(WikiText-2 validation, ``--samples`` + ``--heldout`` windows of ``--seqlen`` tokens, held-out ones
spread over the text), the same trained tensors (L, R, quantization scales/offsets; codes frozen),
AdamW with cosine decay, one window a step, as ``lqkit.distill.distill_kl``. The KL is measured with
the trained fp32 values in place (``lqkit distill`` rounds them to their stored dtypes when it commits).
Nothing is written to the checkpoint.

    python bench/kl_probe.py CKPT --lr 1e-6 [--steps 150 --every 50] --out bench/results/kl-probe-NAME.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, log, machine_info, write_json  # noqa: E402

from lqkit import checkpoint
from lqkit.calibrate import (CalibConfig, block_calls, calibration_ids, first_inputs, forward_block,
                             windows_per_call)
from lqkit.data import DEFAULT_CALIB_TEXT, read_text
from lqkit.distill import (DistillConfig, _batches, _copies, _cosine, _kl, _open_teacher, _optimizer, _split,
                           _tail_logits, heldout_kl)
from lqkit.models import load_tokenizer


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--samples", type=int, default=200, help="training windows")
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--factor-lr", type=float, default=None,
                    help="learning rate of L and R (default: --lr, as lqkit distill's KL stage)")
    ap.add_argument("--norm-lr", type=float, default=0.0,
                    help="also train the model's normalisation gains at this learning rate (0: frozen)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    meta = checkpoint.read_meta(a.ckpt)
    tok = load_tokenizer(a.ckpt)
    body, label = read_text(None, DEFAULT_CALIB_TEXT)
    ids = calibration_ids(tok, body, CalibConfig(a.samples + a.heldout, a.seqlen, fisher=False))
    dev = torch.device("cpu")
    teacher = _open_teacher(meta["extra"]["source_model"], Path(a.ckpt), dev)
    student = checkpoint.load(a.ckpt, dtype=teacher.dtype, device=dev, prepare=False)
    for p in student.parameters():
        p.requires_grad_(False)
    train, held = _split(ids.shape[0], a.heldout, 0)
    chunk = windows_per_call(ids.shape[1], dev)
    teacher.load_rest()
    tcalls = block_calls(teacher.model, teacher.blocks, ids, dev)
    xt = first_inputs(teacher.model, teacher.blocks, ids, dev, chunk)  # -> the teacher's final hidden states
    for k in range(len(teacher.blocks)):
        forward_block(teacher.load_block(k), xt, tcalls[k], chunk)
        teacher.release_block(k)  # as lqkit.distill.distill_model: one teacher block resident at a time
    copies = _copies(student, DistillConfig(steps=0, kl_steps=a.steps), integer_zero=False)
    opt = _optimizer(copies, a.factor_lr or a.lr, a.lr)
    if a.norm_lr:
        gains = [p for n, p in student.named_parameters() if "norm" in n.lower() and p.ndim == 1]
        for p in gains:
            p.requires_grad_(True)
        opt.add_param_group({"params": gains, "lr": a.norm_lr})
        gains0 = [p.detach().clone() for p in gains]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(a.steps))
    some_train = train[torch.linspace(0, len(train) - 1, min(16, len(train))).round().long().unique()]
    res = {"checkpoint": str(a.ckpt), "plan_bits": (meta.get("summary") or {}).get("effective_bits"),
           "text": label, "config": {k: v for k, v in vars(a).items() if k not in ("ckpt", "out")},
           "trained_elements": sum(p.numel() for g in opt.param_groups for p in g["params"]), "evals": [],
           "machine": machine_info()}

    def evaluate(step: int) -> None:
        h = heldout_kl(student, teacher.model, teacher.blocks, xt[held], ids[held])
        t = heldout_kl(student, teacher.model, teacher.blocks, xt[some_train], ids[some_train])
        res["evals"].append({"step": step, "heldout_kl": h, "train16_kl": t})
        if a.norm_lr:
            res["evals"][-1]["norm_max_change"] = max(float((p - q).abs().max()) for p, q in zip(gains, gains0))
        log(f"step {step}: KL held-out {h:.5f}, {len(some_train)} training windows {t:.5f}")
        write_json(Path(a.out), res)

    evaluate(0)
    batches = _batches(train, 1, 1_000_003)
    t0 = time.time()
    for s in range(a.steps):
        rows = next(batches)
        with torch.no_grad():
            target = _tail_logits(teacher.model, teacher.blocks, xt[rows], ids[rows])
        with torch.enable_grad():
            _kl(student(input_ids=ids[rows], use_cache=False).logits, target).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (s + 1) % a.every == 0:
            res["train_seconds"] = round(time.time() - t0, 1)
            evaluate(s + 1)
    for c in copies:
        c.restore()
    print(json.dumps(res["evals"]))


if __name__ == "__main__":
    main()
