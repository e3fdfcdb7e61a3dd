"""The ``lqkit`` command line: thin wrappers over the library, one function per subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .errors import LqkitError

log = logging.getLogger("lqkit")

METHODS = ("rtn", "nf", "lq", "lorc", "lowrank")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, where to look) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------
# arguments


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model id or local folder (default: google/gemma-3-270m, from the demo extra)")


def _add_eval_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="UTF-8 evaluation text (default: bundled WikiText-2 test split)")
    p.add_argument("--windows", type=int, default=40, help="number of evenly spaced windows (default 40)")
    p.add_argument("--window-tokens", type=int, default=512, help="tokens per window including BOS (default 512)")
    p.add_argument("--full", action="store_true", help="score every non-overlapping window (slow)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")


def _spec_from_args(a: argparse.Namespace):
    from .core.decompose import MatrixSpec
    from .core.quant import QuantSpec

    quant = None
    if a.method != "lowrank":
        qname = {"rtn": "rtn", "nf": "nf"}.get(a.method, a.quantizer)
        quant = QuantSpec(qname, a.bits, a.group_size, a.group_dim, a.double_quant)
    method = {"rtn": "quant", "nf": "quant"}.get(a.method, a.method)
    rank = a.rank if method in ("lq", "lorc", "lowrank") else 0
    return MatrixSpec(method, quant, rank, iters=a.iters, factor_dtype=a.factor_dtype)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lqkit", description="Shrink causal LMs with low-rank + quantized decomposition.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", parents=[common], help="compress a model and write a checkpoint",
                       description="Compress the linear layers of a causal LM as W ≈ Q + L·R and save the result.")
    _add_model(c)
    c.add_argument("--out", required=True, help="output checkpoint folder")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--method", choices=METHODS, default="lq",
                   help="rtn: uniform quantization; nf: NormalFloat; lq: LQ-LoRA alternation Q + L·R; "
                        "lorc: quantize then low-rank residual (ZeroQuant-V2); lowrank: L·R only (default lq)")
    c.add_argument("--quantizer", choices=("rtn", "rtn_sym", "nf"), default="rtn",
                   help="quantizer of Q for lq/lorc (default rtn: asymmetric min-max)")
    c.add_argument("--bits", type=int, default=3, help="bits per code (rtn: 2-8, nf: 2-4; default 3)")
    c.add_argument("--group-size", type=int, default=128, help="elements per quantization group (default 128)")
    c.add_argument("--group-dim", choices=("in", "out"), default="in",
                   help="groups along the input dim (per output channel) or the output dim (AdaDim) (default in)")
    c.add_argument("--double-quant", action="store_true", help="nf: quantize the absmax scales to 8 bits")
    c.add_argument("--rank", type=int, default=32, help="rank of L·R for lq/lorc/lowrank (default 32)")
    c.add_argument("--iters", type=int, default=20, help="lq: maximum alternations (default 20)")
    c.add_argument("--factor-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="stored dtype of L and R (default float16)")
    c.add_argument("--include", action="append", default=None, metavar="REGEX",
                   help="compress linear layers whose name matches (repeatable; default: all)")
    c.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="skip linear layers whose name matches (repeatable; default: lm_head)")
    c.add_argument("--device", default=None, help="where decompositions run, e.g. cuda (default: the model's)")
    c.add_argument("--eval", action="store_true", help="evaluate perplexity after compressing")
    _add_eval_protocol(c)
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a model or checkpoint",
                       description="Perplexity on WikiText-2 (or --text) with lqkit's fixed protocol.")
    e.add_argument("path", nargs="?", default=None,
                   help="lqkit checkpoint or HF model folder/id (default: the default model)")
    _add_eval_protocol(e)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", parents=[common], help="show a checkpoint's per-matrix plan, bits, rank and error",
                       description="Print the plan and size report of an lqkit checkpoint.")
    i.add_argument("path", help="lqkit checkpoint folder")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)
    return p


# ----------------------------------------------------------------------------------------------
# commands


def _protocol(a):
    from .evaluate import EvalProtocol

    return EvalProtocol(windows=a.windows, window_tokens=a.window_tokens, full=a.full, batch_size=a.batch_size)


def cmd_compress(a: argparse.Namespace) -> int:
    from . import pipeline

    spec = _spec_from_args(a)  # validate before loading anything
    proto = _protocol(a) if a.eval else None
    res = pipeline.compress(a.model, spec, a.out, overwrite=a.overwrite, include=a.include, exclude=a.exclude,
                            device=a.device, eval_protocol=proto, eval_text=a.text, progress=not a.quiet)
    print(pipeline.format_summary(res))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from . import pipeline

    r = pipeline.evaluate(a.path, _protocol(a), text=a.text, progress=not (a.quiet or a.json))
    if a.json:
        print(json.dumps(r))
    else:
        bits = "n/a (uncompressed)" if r["effective_bits"] is None else f"{r['effective_bits']:.3f}"
        print(f"model          {r['model']}\nperplexity     {r['perplexity']:.3f}\neffective bits {bits}\n"
              f"windows        {r['windows']} x {r['window_tokens']} tokens ({r['seconds']:.0f} s)")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from . import pipeline

    report = pipeline.inspect(a.path)
    print(json.dumps(report, indent=1) if a.json else pipeline.format_inspect(report))
    return 0


def _quiet_transformers() -> None:
    """lqkit draws its own progress bars; transformers' per-load bars would only add noise."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_transformers()
    try:
        return args.func(args)
    except LqkitError as e:
        print(f"lqkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lqkit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
