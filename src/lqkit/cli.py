"""The ``lqkit`` command line: thin wrappers over the library, one function per subcommand."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import sys

from .core.costs import CandidateSet
from .errors import LqkitError, SpecError

log = logging.getLogger("lqkit")

METHODS = ("rtn", "nf", "gptq", "nuq", "sparse", "lq", "lorc", "lowrank")
QUANT_ONLY = ("rtn", "nf", "gptq", "nuq", "sparse")  # methods that are Q alone
SPARSE_DEFAULT = 0.005  # --method sparse: fraction of weights kept as fp16 outliers unless --outliers


class _Formatter(argparse.HelpFormatter):
    """Wraps paragraphs of a description or epilog; keeps indented lines (examples) as written."""

    def add_argument(self, action):
        super().add_argument(action)
        for verb in self._iter_indented_subactions(action):  # argparse measures verbs without their indent
            self._action_max_length = max(self._action_max_length,
                                          len(self._format_action_invocation(verb)) + self._current_indent)

    def _fill_text(self, text, width, indent):
        fill = super()._fill_text
        return "\n".join(indent + ln if ln.startswith(" ") or not ln.strip() else fill(ln, width, indent)
                         for ln in text.splitlines())


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, a value that works, where to look) and
    exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{self._example(message)} (see {self.prog} --help)\n")

    def _example(self, message: str) -> str:
        """A value that would work: the flag's default, else the first example of the epilog."""
        if "e.g." in message:
            return ""  # the message names one already
        m = re.match(r"argument (--[\w-]+)", message)
        act = self._option_string_actions.get(m.group(1)) if m else None
        if act is not None and act.choices:
            return ""  # argparse lists them
        if act is not None and act.default is not None and act.default is not False and act.default != [] \
                and act.default != argparse.SUPPRESS:
            return f"; e.g. {m.group(1)} {act.default}"
        examples = [ln.split("  #")[0].strip() for ln in _examples(self)]
        if examples and (act is not None or "required" in message or "unrecognized" in message):
            return f"; e.g. {examples[0]}"
        return ""


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    """The example command lines of a parser's epilog (its indented lines), comments included."""
    return [ln.strip() for ln in (parser.epilog or "").splitlines() if ln.startswith("  ")]


# ----------------------------------------------------------------------------------------------
# arguments


def _finite(x):
    """JSON has no Infinity or NaN: such numbers become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json(obj, indent: int | None = None) -> str:
    """--json output: strict JSON (a perplexity that overflowed is null, not a bare Infinity)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _device(value: str) -> str:
    """--device: a device torch knows and this machine has."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; e.g. --device cpu or --device cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has no CUDA device that torch can use; "
                                         "e.g. --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                         "e.g. --device cuda:0")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: lqkit runs on cpu or cuda; e.g. --device cpu")
    return value


def _regex(value: str) -> str:
    """--include / --exclude: a valid regular expression (checked before any model loads)."""
    try:
        re.compile(value)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid regular expression ({e}); e.g. 'self_attn' "
                                         "or 'mlp\\.down_proj$'") from None
    return value


def _number(kind, lo=None, hi=None, *, above: bool = False, example=None):
    """An argparse type: a finite ``kind`` (int or float) with ``lo <= x`` (``lo < x`` if ``above``) and
    ``x < hi``. The error says which range; it names ``example`` when the flag has no default to name."""
    what = "an integer" if kind is int else "a number"
    rng = " and ".join(([f"above {lo:g}" if above else f"at least {lo:g}"] if lo is not None else [])
                       + ([f"below {hi:g}"] if hi is not None else []))
    eg = f"; e.g. {example}" if example is not None else ""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}{eg}") from None
        if not (math.isfinite(v) and (lo is None or (v > lo if above else v >= lo)) and (hi is None or v < hi)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it takes {what} {rng}{eg}")
        return v

    return parse


_COUNT = _number(int, 1)  # windows, samples, steps, batch sizes
_COUNT0 = _number(int, 0)  # the same where 0 means none
_RATE = _number(float, 0, above=True)  # learning rates, dampening


def _budget(text: str) -> float:
    """--budget: bits per parameter, checked as the allocation checks it."""
    from .allocate import Budget

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bits per parameter; e.g. --budget 3.0") from None
    try:
        Budget(bits_per_param=v)
    except LqkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def _size(example: str | None = None):
    """An argparse type: a size as parse_bytes reads it (kept as written)."""
    def parse(text: str) -> str:
        from .allocate import parse_bytes

        try:
            parse_bytes(text)
        except LqkitError:
            eg = f"; e.g. {example}" if example else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not a size (a number with an optional unit B, KB, MB, GB, "
                                             f"KiB, MiB, GiB){eg}") from None
        return text

    return parse


def _constraint(flag: str):
    """An argparse type: REGEX=BITS for --min-bits / --max-bits, checked as the allocation reads it."""
    def parse(text: str) -> str:
        from .allocate import Constraint

        try:
            Constraint.parse(text, "min")
        except LqkitError as e:
            raise argparse.ArgumentTypeError(f"{str(e).split('; ')[0]}; write REGEX=BITS, e.g. {flag} "
                                             "'mlp\\.down_proj=4'") from None
        return text

    return parse


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model id or local folder (default: google/gemma-3-270m, from the demo extra)")


def _add_eval_protocol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, help="UTF-8 evaluation text (default: bundled WikiText-2 test split)")
    p.add_argument("--windows", type=_COUNT, default=40, help="number of evenly spaced windows (default 40)")
    p.add_argument("--window-tokens", type=_number(int, 2), default=512,
                   help="tokens per window including BOS (default 512)")
    p.add_argument("--full", action="store_true", help="score every non-overlapping window (slow)")
    p.add_argument("--batch-size", type=_COUNT, default=2, help="windows per forward pass (default 2)")


def _spec_from_args(a: argparse.Namespace):
    from .core.decompose import MatrixSpec
    from .core.quant import QuantSpec

    quant = None
    if a.method != "lowrank":
        qname = a.method if a.method in ("rtn", "nf", "gptq", "nuq") else a.quantizer
        _check_quantizer_flags(a, qname)
        outliers = a.outliers if a.outliers is not None else SPARSE_DEFAULT if a.method == "sparse" else 0.0
        quant = QuantSpec(qname, a.bits, a.group_size, a.group_dim, a.double_quant, act_order=a.act_order,
                          damp=a.damp, outliers=outliers, outlier_features=a.outlier_features, clip=a.clip,
                          int_zero=a.int_zero)
    method = "quant" if a.method in QUANT_ONLY else a.method
    rank = a.rank if method in ("lq", "lorc", "lowrank") else 0
    return MatrixSpec(method, quant, rank, iters=a.iters, factor_dtype=a.factor_dtype, weighting=a.weighting)


def _check_quantizer_flags(a: argparse.Namespace, qname: str) -> None:
    """--bits and --double-quant against what the chosen quantizer supports (lqkit.core.quant.QUANTIZERS)."""
    from .core.quant import QUANTIZERS

    flag = f"--method {qname}" if a.method == qname else f"--quantizer {qname}"
    q = QUANTIZERS[qname]
    allowed = sorted(q.bits_allowed)
    if a.bits not in allowed:
        near = min(allowed, key=lambda b: (abs(b - a.bits), -b))
        raise SpecError(f"--bits {a.bits} is not supported with {flag}; use one of {_csv(allowed).replace(',', ', ')}, "
                        f"e.g. --bits {near}")
    if a.double_quant and not q.supports_double_quant:
        able = [n for n, x in QUANTIZERS.items() if x.supports_double_quant]
        how = " or ".join(f"--quantizer {n}" if a.method in ("lq", "lorc", "sparse") else f"--method {n}" for n in able)
        raise SpecError(f"--double-quant quantizes the scales of {', '.join(able)} only, not of {qname}; drop it or "
                        f"use {how}")


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="UTF-8 calibration text (default: bundled WikiText-2 validation split)")
    p.add_argument("--calib-samples", type=_COUNT, default=64, help="calibration sequences (default 64)")
    p.add_argument("--calib-seqlen", type=_number(int, 2), default=512,
                   help="tokens per calibration sequence incl. BOS (default 512)")


def _calib_config(a, fisher: bool = True):
    from .calibrate import CalibConfig

    return CalibConfig(samples=a.calib_samples, seqlen=a.calib_seqlen, fisher=fisher)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lqkit", description="Compress a Hugging Face causal LM to a memory budget: each linear weight "
                "becomes W ≈ Q + L·R (+ S), its quantizer, bits, groups, rank and outliers chosen per matrix by an "
                "integer program. `lqkit VERB --help` shows a verb's options and more examples.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, title="verbs", metavar="VERB")

    c = sub.add_parser("compress", parents=[common], help="compress a model to a budget, write a checkpoint",
                       description="Compress the linear layers of a causal LM as W ≈ Q + L·R (+ S) and save the result. "
                                   "With --budget or --budget-bytes an integer program picks each matrix's configuration; "
                                   "with --method every matrix gets the same one. A model folder is read one decoder "
                                   "block at a time from its safetensors files (memory bounded by a block), on the GPU "
                                   "when one is present; under torchrun the per-matrix work is split over processes.",
                       epilog="examples:\n"
                              "  lqkit compress --model path/or/hub-id --budget 3.0 --out out/ck\n"
                              "  lqkit compress --model path/or/hub-id --budget-bytes 40MB --out out/ck-40mb\n"
                              "  lqkit compress --model path/or/hub-id --budget-bytes 300MB --scope model --out out/ck-300mb   # every stored byte\n"
                              "  lqkit compress --model path/or/hub-id --budget 2.5 --min-bits 'mlp\\.down_proj=3' --out out/ck25\n"
                              "  lqkit compress --model path/to/folder --budget 3.0 --device cuda --out out/ck   # streamed on a GPU\n"
                              "  torchrun --nproc-per-node 2 -m lqkit compress --model path/to/folder --budget 3.0 --out out/ck\n"
                              "  lqkit compress --model path/or/hub-id --method gptq --bits 4 --group-size 128 --out out/gptq4\n"
                              "  lqkit compress --model path/or/hub-id --budget 3.0 --target vllm --out out/ck   # servable")
    _add_model(c)
    c.add_argument("--out", required=True, help="output checkpoint folder")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b = c.add_argument_group("memory budget (the plan is chosen per matrix by an integer program)")
    b.add_argument("--budget", type=_budget, default=None, metavar="BITS",
                   help="bits per parameter of the compressed layers, everything stored counted (e.g. 2.75)")
    b.add_argument("--budget-bytes", type=_size("--budget-bytes 40MB"), default=None, metavar="SIZE",
                   help="total size of the compressed layers, e.g. 40MB or 38MiB (instead of --budget)")
    b.add_argument("--scope", choices=("linear", "model"), default="linear",
                   help="what the budget counts: linear = the compressed linear layers (default); model = every "
                        "stored tensor of the model (embedding and head, norms, everything kept), --budget then in "
                        "bits per parameter over all parameters; the embedding / head rows become candidates too "
                        "(per-row int codes with scales, or kept as stored)")
    b.add_argument("--cand-table-bits", default="4,6,8",
                   help="with --scope model: candidate bits of the embedding / head rows (default %(default)s)")
    b.add_argument("--metric", choices=("kfac", "hessian", "fisher"), default="kfac",
                   help="error the allocation minimises: kfac (H-weighted, rows scaled by Fisher sensitivity), "
                        "hessian (H-weighted output error) or fisher (diagonal Fisher) (default kfac)")
    cs = CandidateSet()
    b.add_argument("--cand-quantizers", default=",".join(cs.quantizers), help="candidate quantizers (default %(default)s)")
    b.add_argument("--cand-bits", default=_csv(cs.bits), help="candidate bits (default %(default)s)")
    b.add_argument("--cand-group-sizes", default=_csv(cs.group_sizes), help="candidate group sizes (default %(default)s)")
    b.add_argument("--cand-group-dims", default=",".join(cs.group_dims), help="candidate group dims (default %(default)s)")
    b.add_argument("--cand-ranks", default=_csv(cs.ranks), help="candidate ranks of L·R (default %(default)s)")
    b.add_argument("--cand-outliers", default=_csv(cs.outliers),
                   help="candidate fractions of sparse fp16 outliers (default %(default)s)")
    b.add_argument("--cand-no-clip", action="store_true", help="rtn/gptq candidates with plain min-max ranges")
    b.add_argument("--cand-no-act-order", action="store_true", help="gptq candidates in plain column order")
    b.add_argument("--rotate", action="store_true",
                   help="also try every candidate on the matrix with its input rotated (a seeded randomized Hadamard "
                        "transform: spreads outliers; stored as a seed, no extra bits; applied to x at run time); the "
                        "integer program picks per matrix. Exports only to the dense and peft formats")
    b.add_argument("--min-bits", type=_constraint("--min-bits"), action="append", default=[], metavar="REGEX=BITS",
                   help="matrices matching REGEX get at least BITS bits/param (repeatable)")
    b.add_argument("--max-bits", type=_constraint("--max-bits"), action="append", default=[], metavar="REGEX=BITS",
                   help="matrices matching REGEX get at most BITS bits/param (repeatable)")
    b.add_argument("--refine", type=_COUNT0, default=0, metavar="ITERS",
                   help="LQ alternations after LoRC for matrices given a low-rank part (default 0)")
    b.add_argument("--workers", type=_number(int, 1, example="--workers 2"), default=None,
                   help="processes computing the cost table (default: up to 4 CPU cores; 1 on GPU)")
    b.add_argument("--no-table-cache", action="store_true", help="recompute the cost table even if cached")
    b.add_argument("--target", choices=_targets(), default=None,
                   help="plan for a serving runtime: only candidates it serves (vllm: compressed-tensors int "
                        "weights, 2-8 bits; vllm-marlin: 4/8 bits, groups 32/64/128, as stock vLLM kernels; "
                        "lqkit-gpu: what lqkit's fastest GPU kernel reads, 2-7-bit integer grids), and "
                        "layers that read one input (fused by vLLM/SGLang, stacked by lqkit) tied to one scheme in "
                        "the integer program; export vllm plans with `lqkit export --format compressed-tensors` "
                        "(default: no target)")
    c.add_argument("--method", choices=METHODS, default=None,
                   help="one method for every matrix instead of a budget: "
                        "rtn: uniform quantization; nf: NormalFloat; gptq: GPTQ (needs calibration); "
                        "nuq: SqueezeLLM-style Fisher-weighted k-means codebooks; sparse: --quantizer with "
                        f"--outliers (default {SPARSE_DEFAULT}) kept as fp16; lq: LQ-LoRA alternation Q + L·R; "
                        "lorc: quantize then low-rank residual (ZeroQuant-V2); lowrank: L·R only (default lq without --budget)")
    c.add_argument("--quantizer", choices=("rtn", "rtn_sym", "nf", "gptq", "nuq"), default="rtn",
                   help="quantizer of Q for lq/lorc/sparse (default rtn: asymmetric min-max)")
    c.add_argument("--bits", type=int, default=3, help="bits per code (rtn/gptq/nuq: 2-8, nf: 2-4; default 3)")
    c.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation energy")
    c.add_argument("--damp", type=_RATE, default=0.01,
                   help="gptq: dampening as a fraction of mean(diag H) (default 0.01)")
    c.add_argument("--clip", action="store_true",
                   help="rtn/gptq: shrink each group's range to the one of least squared error (MSE grid search)")
    c.add_argument("--int-zero", action="store_true",
                   help="rtn/gptq (with --method, and the budget's rtn/gptq candidates; other quantizers are "
                        "unchanged): store each group's zero point as an integer of the codes' width, as GPTQ "
                        "checkpoints do, instead of a 16-bit offset: the same weights in 16 - bits fewer bits per "
                        "group (4.16 instead of 4.25 bits at 4-bit g128); distillation then trains the scales only")
    c.add_argument("--outliers", type=_number(float, 0, 0.5, example=f"--outliers {SPARSE_DEFAULT}"), default=None,
                   metavar="FRAC",
                   help="fraction of weights kept exactly as sparse fp16 (dense-and-sparse), by |w|·sensitivity")
    c.add_argument("--outlier-features", type=_number(float, 0, 1, example="--outlier-features 0.01"), default=0.0,
                   metavar="FRAC",
                   help="fraction of input features (largest activations) kept as 16-bit columns (LLM.int8())")
    c.add_argument("--weighting", choices=("none", "fisher", "hessian", "kfac"), default="none",
                   help="weight the low-rank part and the LQ objective by the Fisher diagonal (FWSVD), by "
                        "the input second moments H (activation-aware SVD), or by both (kfac: H per row, "
                        "scaled by the row's Fisher sensitivity) (default none)")
    c.add_argument("--group-size", type=_COUNT, default=128, help="elements per quantization group (default 128)")
    c.add_argument("--group-dim", choices=("in", "out", "auto"), default="in",
                   help="groups along the input dim (per output channel) or the output dim; auto: per matrix, "
                        "the one of smaller (weighted) error (AdaDim) (default in)")
    c.add_argument("--double-quant", action="store_true", help="nf: quantize the absmax scales to 8 bits")
    c.add_argument("--rank", type=_COUNT0, default=32, help="rank of L·R for lq/lorc/lowrank (default 32)")
    c.add_argument("--iters", type=_COUNT, default=20, help="lq: maximum alternations (default 20)")
    c.add_argument("--factor-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="stored dtype of L and R (default float16)")
    c.add_argument("--include", type=_regex, action="append", default=None, metavar="REGEX",
                   help="compress linear layers whose name matches (repeatable; default: all)")
    c.add_argument("--exclude", type=_regex, action="append", default=None, metavar="REGEX",
                   help="skip linear layers whose name matches (repeatable; default: lm_head)")
    c.add_argument("--device", type=_device, default=None,
                   help="where every stage runs (calibration, cost table, decompositions), e.g. cuda, cuda:1 or cpu "
                        "(default: cuda when present; under torchrun each rank takes cuda:LOCAL_RANK)")
    c.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype the decoder blocks run in during calibration and compression (default auto: the "
                        "model's stored 16-bit type on a GPU, float32 on a CPU); the checkpoint keeps the stored "
                        "dtype for uncompressed tensors")
    c.add_argument("--max-gpu-memory", type=_size("40GB"), default=None, metavar="SIZE",
                   help="hold the run to this much GPU memory (e.g. 40GB on a larger or shared GPU): lqkit sizes "
                        "its GPU work to it, and PyTorch stops with out-of-memory rather than take more "
                        "(default: the GPU's free memory)")
    c.add_argument("--max-shard-size", type=_size(), default="2GiB", metavar="SIZE",
                   help="checkpoint tensors are written in files of about this size (default 2GiB)")
    _add_calib(c)
    c.add_argument("--no-sequential", action="store_true",
                   help="use the statistics as given for every layer instead of recomputing each block's H "
                        "from the outputs of the already compressed blocks (faster, usually worse)")
    c.add_argument("--stats", default=None, metavar="FILE",
                   help="calibration statistics (safetensors from `lqkit calibrate`); computed and saved "
                        "there if the file does not exist")
    dd = c.add_argument_group("distillation after compression (at fixed bits; see `lqkit distill`)")
    dd.add_argument("--distill", type=_COUNT0, default=0, metavar="STEPS",
                    help="then train each block's L, R and quantization scales (codes frozen) for STEPS steps to "
                         "match the uncompressed block's outputs on the calibration text (default 0: none)")
    dd.add_argument("--distill-kl", type=_COUNT0, default=0, metavar="STEPS",
                    help="then STEPS steps of end-to-end KL on the logits against the uncompressed model (default 0)")
    _add_distill_train(dd, prefix="distill-")
    c.add_argument("--eval", action="store_true", help="evaluate perplexity after compressing")
    _add_eval_protocol(c)
    c.set_defaults(func=cmd_compress)

    k = sub.add_parser("calibrate", parents=[common], help="compute calibration statistics (H, Fisher)",
                       description="Run calibration text through the model, one decoder block at a time, and "
                                   "save per-layer input second moments H and the empirical Fisher diagonal "
                                   "(compress computes and caches them itself; this verb keeps them in a file).",
                       epilog="examples:\n"
                              "  lqkit calibrate --model path/or/hub-id --out stats.safetensors\n"
                              "  lqkit compress --model path/or/hub-id --stats stats.safetensors --method gptq --out out/gptq")
    _add_model(k)
    k.add_argument("--out", required=True, help="output statistics file (.safetensors)")
    k.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_calib(k)
    k.add_argument("--no-fisher", action="store_true", help="only H (skips the backward passes)")
    k.add_argument("--include", type=_regex, action="append", default=None, metavar="REGEX",
                   help="layers to calibrate (repeatable; default: every linear but lm_head)")
    k.add_argument("--exclude", type=_regex, action="append", default=None, metavar="REGEX",
                   help="layers to skip (repeatable; default: lm_head)")
    k.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a checkpoint or model",
                       description="Perplexity on WikiText-2 (or --text) with lqkit's fixed protocol: 40 windows "
                                   "of 512 tokens, BOS first (docs/methods.md).",
                       epilog="examples:\n"
                              "  lqkit eval out/ck\n"
                              "  lqkit eval out/ck --json --device cuda --dtype bfloat16\n"
                              "  lqkit eval path/or/hub-id     # the uncompressed model, same protocol")
    e.add_argument("path", nargs="?", default=None,
                   help="lqkit checkpoint or HF model folder/id (default: the default model)")
    _add_eval_protocol(e)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--device", type=_device, default="cpu", help="where the model runs, e.g. cuda (default cpu)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model runs in (default float32, as the published protocol)")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", parents=[common], help="compress the default model end to end, print a table",
                       description="Baseline, calibration, budget allocation, compression, save, reload and "
                                   "evaluation of google/gemma-3-270m (needs the demo extra).",
                       epilog="examples:\n"
                              "  lqkit demo\n"
                              "  lqkit demo --budget 3.0 --windows 8")
    d.add_argument("--out", default="out/gemma-3-270m-budget", help="checkpoint folder (replaced)")
    d.add_argument("--windows", type=_COUNT, default=40, help="evaluation windows (default 40)")
    d.add_argument("--budget", type=_budget, default=3.25,
                   help="bits per parameter of the linear layers (default 3.25)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", parents=[common], help="a checkpoint's per-matrix plan, bits and error",
                       description="Print the plan and size report of an lqkit checkpoint: per matrix its "
                                   "quantizer, bits, group, rank, outliers, error and GPU kernel path; the solver report.",
                       epilog="examples:\n"
                              "  lqkit inspect out/ck\n"
                              "  lqkit inspect out/ck --json --plot plan.png")
    i.add_argument("path", help="lqkit checkpoint folder")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the plan (bits/param and rank per matrix, by layer and projection) to PNG")
    i.set_defaults(func=cmd_inspect)
    _add_distill_command(sub, common)
    g = sub.add_parser("generate", parents=[common], help="continue a prompt, print tokens/s",
                       description="Greedy generation with an lqkit checkpoint (or a plain HF model, to compare), "
                                   "ready for fast inference as loaded; the second of two calls is timed.",
                       epilog="examples:\n"
                              "  lqkit generate out/ck --prompt \"The tower is\" --max-new-tokens 64\n"
                              "  lqkit generate out/ck --prompt \"The tower is\" --compile   # static KV cache + torch.compile\n"
                              "  lqkit generate out/ck --prompt \"The tower is\" --compile --tune   # tuned here\n"
                              "  lqkit generate path/or/hub-id --prompt \"The tower is\"     # an uncompressed model, same code")
    g.add_argument("path", nargs="?", default=None,
                   help="lqkit checkpoint or HF model folder/id (default: the default model)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=_COUNT, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile of the prompt's forward and of the decoding step (CUDA "
                        "graphs on a GPU); the first, untimed call compiles (about a minute for a 7B model on an "
                        "H100, minutes on the CPU)")
    g.add_argument("--tune", action="store_true",
                   help="on a GPU, time an lqkit checkpoint's one-token kernel launch configurations and keep "
                        "the fastest (under $LQKIT_CACHE/kernels/: timed once per GPU, shape and format; 14-68 s "
                        "the first time on a 7B-shaped model; there, with --compile at batch 1: +6%% tokens/s at "
                        "4 bits, +11%% at 3). Nothing on the CPU or for an uncompressed model")
    g.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when present)")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    g.set_defaults(func=cmd_generate)
    _add_finetune_commands(sub, common)
    p.epilog = _verb_examples(sub)
    return p


def _verb_examples(sub) -> str:
    """The top-level epilog: each verb's first example, in the order of the verb list; for compress also
    its streamed-on-a-GPU and torchrun examples."""
    lines = []
    for verb, parser in sub.choices.items():
        ex = _examples(parser)
        lines += [ex[0]] + [e for e in ex[1:] if verb == "compress" and ("--device cuda" in e or "torchrun" in e)]
    return "examples, one per verb (`lqkit VERB --help` shows more):\n" + \
        "\n".join(f"  {e}" for e in lines)


# ----------------------------------------------------------------------------------------------
# commands


def _protocol(a):
    from .evaluate import EvalProtocol

    return EvalProtocol(windows=a.windows, window_tokens=a.window_tokens, full=a.full, batch_size=a.batch_size)


def _targets() -> tuple[str, ...]:
    from .core.serving import TARGETS

    return tuple(n for n, t in TARGETS.items() if t.ties)


def _csv(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _list(text: str, kind, what: str, example=None, check=None) -> tuple:
    """A comma-separated flag value; ``check(v)`` (raising LqkitError) vets each value, ``example`` is a
    value of the flag that works (its default)."""
    eg = f"; e.g. {what} {_csv(example)}" if example is not None else ""
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise SpecError(f"cannot read {what} {text!r}; write comma-separated values{eg}") from None
    if not values:
        raise SpecError(f"{what} {text!r} gives no value{eg}")
    for v in values:
        try:
            check and check(v)
        except LqkitError as e:
            raise SpecError(f"{what} {text}: {e}{eg}") from None
    return values


def _candidates_from_args(a: argparse.Namespace) -> CandidateSet:
    """The candidate set of a budget; each --cand-* value checked alone against the library's validation, so
    the error names the flag, the value and one that works (the default)."""
    from dataclasses import replace

    d = CandidateSet()
    quantizers = _list(a.cand_quantizers, str, "--cand-quantizers", d.quantizers,
                       lambda v: CandidateSet(quantizers=(v,)))
    base = CandidateSet(quantizers=quantizers)

    def bits_ok(b: int) -> None:  # a bit width counts when one of the chosen quantizers takes it
        replace(base, bits=(b,))

    bits = _list(a.cand_bits, int, "--cand-bits", d.bits)
    usable = [b for b in range(1, 17) if _accepts(bits_ok, b)]
    bad = [b for b in bits if b not in usable]
    if bad:
        raise SpecError(f"--cand-bits {a.cand_bits}: no candidate quantizer ({', '.join(quantizers)}) takes "
                        f"{_csv(bad).replace(',', ', ')} bits; use bits among {_csv(usable)}, "
                        f"e.g. --cand-bits {_csv([b for b in d.bits if b in usable] or usable[:3])}")
    cands = dict(
        quantizers=quantizers, bits=bits,
        group_sizes=_list(a.cand_group_sizes, int, "--cand-group-sizes", d.group_sizes,
                          lambda v: replace(base, group_sizes=(v,))),
        group_dims=_list(a.cand_group_dims, str, "--cand-group-dims", d.group_dims,
                         lambda v: replace(base, group_dims=(v,))),
        ranks=_list(a.cand_ranks, int, "--cand-ranks", d.ranks, lambda v: replace(base, ranks=(v,))),
        outliers=_list(a.cand_outliers, float, "--cand-outliers", d.outliers, lambda v: replace(base, outliers=(v,))),
        factor_dtype=a.factor_dtype, clip=not a.cand_no_clip, act_order=not a.cand_no_act_order,
        rotations=(False, True) if a.rotate else (False,), int_zero=a.int_zero)
    try:
        return CandidateSet(**cands, target=a.target)
    except LqkitError as e:
        if a.target is None or "no valid quantizer configuration" not in str(e):
            raise
    # the target serves none of these: name the bits it serves with these quantizers and group sizes
    served = [b for b in range(1, 17)
              if _accepts(lambda b: CandidateSet(**{**cands, "bits": (b,)}, target=a.target), b)]
    hint = f"e.g. --cand-bits {_csv(served)}" if served else f"e.g. the default candidates, or drop --target {a.target}"
    raise SpecError(f"--target {a.target} serves none of the candidates --cand-quantizers {a.cand_quantizers} "
                    f"--cand-bits {a.cand_bits} --cand-group-sizes {a.cand_group_sizes}; {hint}")


def _accepts(check, v) -> bool:
    try:
        check(v)
    except LqkitError:
        return False
    return True


def _allocation_from_args(a: argparse.Namespace):
    from .allocate import AllocationConfig, Budget, Constraint, parse_bytes
    from .core.embed import RowCandidates

    if a.budget is not None and a.budget_bytes is not None:
        raise SpecError("give either --budget (bits per parameter) or --budget-bytes, not both: e.g. --budget 3.0 "
                        "or --budget-bytes 40MB")
    if a.method is not None:
        raise SpecError("--method sets one method for every matrix and --budget lets lqkit choose per matrix: "
                        "drop one of them, e.g. --budget 3.0 alone or --method gptq --bits 4 alone")
    if a.budget is not None:
        budget = Budget(bits_per_param=a.budget, scope=a.scope)
    else:
        budget = Budget(bytes=parse_bytes(a.budget_bytes), scope=a.scope)
    cands = _candidates_from_args(a)
    cons = tuple(Constraint.parse(t, "min") for t in a.min_bits) + tuple(Constraint.parse(t, "max") for t in a.max_bits)
    tables = RowCandidates(bits=_list(a.cand_table_bits, int, "--cand-table-bits", RowCandidates().bits,
                                      lambda v: RowCandidates(bits=(v,))))
    return AllocationConfig(budget, cands, a.metric, cons, a.refine, a.workers, cache=not a.no_table_cache,
                            tables=tables)


def cmd_compress(a: argparse.Namespace) -> int:
    from . import pipeline

    # a compression run's tensors come in many sizes (an n×n factorisation beside (out, in) stacks): growable
    # segments keep the GPU memory it reserves near what it uses (before any CUDA allocation; a user's own
    # PYTORCH_CUDA_ALLOC_CONF wins)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    if a.budget is not None or a.budget_bytes is not None:
        spec = _allocation_from_args(a)  # validate before loading anything
    elif a.target is not None:
        raise SpecError("--target restricts the candidates of a budget; give --budget or --budget-bytes "
                        "(with --method, check the plan with `lqkit export` instead)")
    elif a.scope != "linear":
        raise SpecError(f"--scope {a.scope} says what a budget counts; give --budget or --budget-bytes with it, e.g. "
                        f"--budget-bytes 300MB --scope {a.scope}")
    elif a.rotate:
        raise SpecError("--rotate adds rotated candidates to a budget's cost table; give --budget or --budget-bytes "
                        "(with --method every matrix gets one unrotated spec)")
    else:
        a.method = a.method or "lq"
        spec = _spec_from_args(a)
    from .allocate import parse_bytes
    from .dist import from_env

    proto = _protocol(a) if a.eval else None
    calib = _calib_config(a)  # validate before loading anything
    shard = parse_bytes(a.max_shard_size)
    dtype = _dtype(a.dtype)
    distill = _distill_config(a, a.distill, a.distill_kl, "distill_") if a.distill or a.distill_kl else None
    group, device = from_env(a.device)  # torchrun: this rank's process group and GPU
    if a.max_gpu_memory is not None:
        pipeline.limit_gpu_memory(device, parse_bytes(a.max_gpu_memory))
    res = pipeline.compress(a.model, spec, a.out, overwrite=a.overwrite, include=a.include, exclude=a.exclude,
                            device=device, eval_protocol=proto, eval_text=a.text, progress=not a.quiet,
                            calib=calib, calib_text=a.calib, stats_path=a.stats, sequential=not a.no_sequential,
                            group=group, dtype=dtype, max_shard_bytes=shard, distill=distill)
    if group.main:
        print(pipeline.format_summary(res))
    return 0


# ----------------------------------------------------------------------------------------------
# distillation after compression


def _add_distill_train(p, prefix: str = "") -> None:
    """The training options shared by `distill` and `compress --distill` (prefixed there)."""
    from .distill import DistillConfig

    d = DistillConfig()
    p.add_argument(f"--{prefix}lr", type=_RATE, default=d.lr, help=f"learning rate of L and R (default {d.lr:g})")
    p.add_argument(f"--{prefix}scale-lr", type=_RATE, default=d.scale_lr,
                   help=f"learning rate of the quantization scales, offsets, absmax, codebooks (default {d.scale_lr:g})")
    p.add_argument(f"--{prefix}batch-size", type=_COUNT, default=d.batch_size,
                   help=f"calibration windows per step (default {d.batch_size})")
    p.add_argument(f"--{prefix}heldout", type=_COUNT0, default=d.heldout,
                   help=f"further calibration windows never trained on, for the reported losses (default {d.heldout})")
    p.add_argument(f"--{prefix}kl-lr", type=_RATE, default=d.kl_lr,
                   help=f"learning rate of the KL stage (default {d.kl_lr:g})")
    p.add_argument(f"--{prefix}kl-batch-size", type=_COUNT, default=d.kl_batch_size,
                   help=f"calibration windows per KL step (default {d.kl_batch_size})")
    p.add_argument(f"--{prefix}zero-points", choices=("auto", "free", "integer"), default=d.zero_points,
                   help="rtn/gptq offsets: free, or integer (offset = -zero*scale with the zero point frozen, so the "
                        "matrix still exports with integer zero points, e.g. to compressed-tensors); auto: integer when "
                        "the plan was made for a --target (default auto); layers that store integer zero points "
                        "(compress --int-zero) keep theirs in every mode")
    p.add_argument(f"--{prefix}no-scales", action="store_true", help="train only L and R (quantization parameters frozen)")
    p.add_argument(f"--{prefix}seed", type=int, default=d.seed, help=f"minibatch order (default {d.seed})")


def _distill_config(a, steps: int, kl_steps: int, prefix: str = ""):
    from .distill import DistillConfig

    g = lambda name: getattr(a, prefix + name)  # noqa: E731
    return DistillConfig(steps=steps, kl_steps=kl_steps, lr=g("lr"), scale_lr=g("scale_lr"), batch_size=g("batch_size"),
                         samples=a.calib_samples, seqlen=a.calib_seqlen, heldout=g("heldout"), kl_lr=g("kl_lr"),
                         kl_batch_size=g("kl_batch_size"), zero_points=g("zero_points"), scales=not g("no_scales"),
                         seed=g("seed"))


def _add_distill_command(sub, common: argparse.ArgumentParser) -> None:
    from .distill import DistillConfig

    d = DistillConfig()
    s = sub.add_parser("distill", parents=[common], help="train a checkpoint against its uncompressed model, same bits",
                       description="Distillation after compression, at fixed bits: each decoder block's L, R and "
                                   "quantization scales/offsets (packed codes frozen) are trained to reproduce the "
                                   "uncompressed block's outputs on the calibration text, one block and its teacher at "
                                   "a time (the teacher streamed from its folder); optionally then end-to-end KL on the "
                                   "logits. Plan, stored dtypes and size stay exactly those of the checkpoint.",
                       epilog="examples:\n"
                              "  lqkit distill out/ck --out out/ck-distilled\n"
                              "  lqkit distill out/ck --out out/ck-distilled --steps 200 --kl-steps 50 --device cuda\n"
                              "  lqkit distill out/ck --out out/ck --overwrite --model path/to/uncompressed")
    s.add_argument("path", help="lqkit checkpoint folder")
    s.add_argument("--out", required=True, help="output checkpoint folder (may be the input with --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.add_argument("--model", default=None,
                   help="the uncompressed model the checkpoint came from (default: the one its lqkit.json names)")
    s.add_argument("--steps", type=_COUNT0, default=d.steps,
                   help=f"optimizer steps per block (default {d.steps}; 0: none)")
    s.add_argument("--kl-steps", type=_COUNT0, default=d.kl_steps,
                   help="then end-to-end KL steps on the logits, every block at once (default 0)")
    _add_distill_train(s)
    _add_calib(s)
    s.add_argument("--device", type=_device, default=None, help="where to train, e.g. cuda (default: cuda when present)")
    s.set_defaults(func=cmd_distill)


def cmd_distill(a: argparse.Namespace) -> int:
    from . import distill

    cfg = _distill_config(a, a.steps, a.kl_steps)
    res = distill.distill(a.path, a.out, cfg, model=a.model, calib_text=a.calib, device=a.device,
                          overwrite=a.overwrite, progress=not a.quiet)
    print(distill.format_result(res))
    return 0


def _dtype(name: str | None):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def cmd_calibrate(a: argparse.Namespace) -> int:
    from . import pipeline

    st = pipeline.calibrate(a.model, a.out, text=a.calib, config=_calib_config(a, fisher=not a.no_fisher),
                            include=a.include, exclude=a.exclude, overwrite=a.overwrite, progress=not a.quiet)
    m = st.meta
    fisher = f", Fisher {m['seconds_fisher']:.0f} s ({m['fisher_windows']} windows)" if m["fisher"] else ""
    print(f"statistics     {a.out}\nlayers         {len(st.names())}\ndata           {m['samples']} x {m['seqlen']} "
          f"tokens of {m['text']}\ntime           H {m['seconds_h']:.0f} s{fisher}\npeak memory    {m['peak_rss_mb']} MiB")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from . import pipeline

    r = pipeline.evaluate(a.path, _protocol(a), text=a.text, progress=not (a.quiet or a.json), device=a.device,
                          dtype=_dtype(a.dtype))
    if a.json:
        print(_json(r))
    else:
        bits = "n/a (uncompressed)" if r["effective_bits"] is None else f"{r['effective_bits']:.3f}"
        print(f"model          {r['model']}\nperplexity     {r['perplexity']:.3f}\neffective bits {bits}\n"
              f"windows        {r['windows']} x {r['window_tokens']} tokens ({r['seconds']:.0f} s)")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from .generate import format_generation, generate

    r = generate(a.path, a.prompt, max_new_tokens=a.max_new_tokens, device=a.device,
                 dtype=getattr(torch, a.dtype) if a.dtype else None, compile=a.compile, tune=a.tune)
    print(_json(r.to_dict()) if a.json else format_generation(r))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from . import demo

    print(demo.run(a.out, a.windows, a.budget))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from . import pipeline

    report = pipeline.inspect(a.path)
    print(_json(report, indent=1) if a.json else pipeline.format_inspect(report))
    if a.plot:
        pipeline.plot_plan(a.path, a.plot)
        if not a.json:
            print(f"plan drawn to {a.plot}")
    return 0


# ----------------------------------------------------------------------------------------------
# fine-tuning of the low-rank part (LQ-LoRA) and PEFT export


def _add_finetune_commands(sub, common: argparse.ArgumentParser) -> None:
    from .finetune import FinetuneConfig

    d = FinetuneConfig()
    f = sub.add_parser("finetune", parents=[common], help="train a checkpoint's low-rank part (LQ-LoRA)",
                       description="Train only L and R of a compressed checkpoint (Q frozen) with a causal-LM loss; "
                                   "writes OUT/best and OUT/last (lqkit checkpoints), OUT/resume, OUT/log.jsonl.",
                       epilog="examples:\n"
                              "  lqkit finetune out/ck-lq --data train.txt --out runs/ft\n"
                              "  lqkit finetune out/ck-lq --data data.jsonl --out runs/ft --resume   # after an interruption")
    f.add_argument("path", help="lqkit checkpoint folder with a low-rank part (rank > 0)")
    f.add_argument("--data", required=True,
                   help="UTF-8 plain text, or JSONL with {\"text\": ...} or {\"prompt\": ..., \"response\": ...} per line")
    f.add_argument("--out", required=True, help="run folder")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    f.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (same options)")
    f.add_argument("--format", dest="data_format", choices=("auto", "text", "jsonl"), default=d.data_format,
                   help="data format (default auto: JSONL for .jsonl/.json, plain text otherwise)")
    f.add_argument("--on-bad-line", choices=("error", "skip"), default=d.on_bad_line,
                   help="JSONL lines that cannot be used: stop with their line number, or skip them (default error)")
    f.add_argument("--steps", type=_COUNT, default=d.steps, help=f"optimizer steps (default {d.steps})")
    f.add_argument("--seq-len", type=_number(int, 2), default=d.seq_len,
                   help=f"tokens per packed sequence (default {d.seq_len})")
    f.add_argument("--batch-size", type=_COUNT, default=d.batch_size,
                   help=f"sequences per micro-batch (default {d.batch_size})")
    f.add_argument("--grad-accum", type=_COUNT, default=d.grad_accum, help="micro-batches per step (default 1)")
    f.add_argument("--lr", type=_RATE, default=d.lr, help=f"peak learning rate (default {d.lr})")
    f.add_argument("--weight-decay", type=_number(float, 0), default=d.weight_decay,
                   help="AdamW weight decay (default 0)")
    f.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=d.schedule,
                   help="learning-rate schedule after warm-up (default cosine)")
    f.add_argument("--warmup-steps", type=_COUNT0, default=d.warmup_steps,
                   help=f"warm-up steps (default {d.warmup_steps})")
    f.add_argument("--max-grad-norm", type=_number(float, 0), default=d.max_grad_norm,
                   help="gradient clipping, 0: off (default 1)")
    f.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision, help="autocast precision (default fp32)")
    f.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                   help="keep activations instead of recomputing them (faster, more memory)")
    f.add_argument("--train-norms", action="store_true", help="also train norm weights")
    f.add_argument("--train-biases", action="store_true", help="also train biases")
    f.add_argument("--eval-every", type=_COUNT0, default=d.eval_every,
                   help=f"steps between held-out evaluations (default {d.eval_every})")
    f.add_argument("--eval-fraction", type=_number(float, 0, 1), default=d.eval_fraction,
                   help=f"share of sequences held out for evaluation (default {d.eval_fraction})")
    f.add_argument("--save-every", type=_COUNT0, default=d.save_every,
                   help=f"steps between resumable states (default {d.save_every})")
    f.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    f.add_argument("--device", type=_device, default=None, help="where to train, e.g. cuda (default cpu)")
    f.add_argument("--export-peft", action="store_true", help="also export the best checkpoint to OUT/peft (see export-peft)")
    f.set_defaults(func=cmd_finetune)

    from .export import FORMATS

    x = sub.add_parser("export", parents=[common], help="export a checkpoint: vLLM / SGLang, PEFT or dense",
                       description="compressed-tensors: a Hugging Face folder vLLM and SGLang serve (int codes, "
                                   "scales, zero points), L·R as a PEFT LoRA in OUT/adapter, OUT/SERVE.md with the "
                                   "commands; peft: OUT/base (dense deq(Q)) + OUT/adapter; dense: one plain model "
                                   "holding deq(Q) + L·R. What a format cannot hold is refused, never dequantized.",
                       epilog="examples:\n"
                              "  lqkit export out/ck --format compressed-tensors --out out/ck-vllm\n"
                              "  lqkit compress --budget 3.0 --target vllm --out out/ck && lqkit export out/ck --out out/ck-vllm\n"
                              "  lqkit export out/ck --format dense --out out/ck-dense")
    x.add_argument("path", help="lqkit checkpoint folder")
    x.add_argument("--format", dest="fmt", choices=tuple(FORMATS), default="compressed-tensors",
                   help="; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()) + " (default compressed-tensors)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the uncompressed tensors and (peft, dense) of the dequantized ones "
                        "(default auto: the checkpoint's stored dtype)")
    x.add_argument("--allow-mixed-fused", action="store_true",
                   help="compressed-tensors: write even when layers that read one input (q/k/v, gate/up; vLLM and "
                        "SGLang fuse them) have different schemes; only transformers then loads the folder")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=cmd_export)

    xp = sub.add_parser("export-peft", parents=[common], help="the same as `export --format peft` (float32 by default)",
                        description="Write OUT/base (plain HF model with deq(Q) weights) and OUT/adapter "
                                    "(adapter_config.json + adapter_model.safetensors, lora_A = R, lora_B = L).",
                        epilog="examples:\n"
                               "  lqkit export-peft runs/ft/best --out export/")
    xp.add_argument("path", help="lqkit checkpoint folder with a low-rank part")
    xp.add_argument("--out", required=True, help="output folder")
    xp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="dtype of the exported base and adapter (default float32)")
    xp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    xp.set_defaults(func=cmd_export_peft, fmt="peft", allow_mixed_fused=False)


def cmd_finetune(a: argparse.Namespace) -> int:
    from . import finetune as ft

    cfg = ft.FinetuneConfig(**{k: getattr(a, k) for k in ft.FinetuneConfig.__dataclass_fields__ if hasattr(a, k)})
    res = ft.finetune(a.path, a.data, a.out, cfg, resume=a.resume, overwrite=a.overwrite, export_peft=a.export_peft,
                      device=a.device, progress=not a.quiet)
    print(ft.format_result(res))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export

    r = export(a.path, a.out, a.fmt, dtype=_dtype(a.dtype), overwrite=a.overwrite, allow_mixed_fused=a.allow_mixed_fused)
    lines = [f"format   {r.format} ({r.matrices} compressed layers, other tensors in {r.dtype})", f"folder   {r.out}"]
    if r.schemes:
        lines.append(f"schemes  {', '.join(f'{k} x{v}' for k, v in sorted(r.schemes.items()))}")
    if r.adapter:
        lines.append(f"adapter  {r.adapter} ({r.lora_modules} LoRA modules, ranks {r.ranks})")
    if r.serve:
        lines.append(f"serve    see {r.serve}")
    print("\n".join(lines))
    return 0


cmd_export_peft = cmd_export  # `export-peft`: the peft format under its old name


def _quiet_transformers() -> None:
    """lqkit draws its own progress bars; transformers' per-load bars would only add noise."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status (2 for any usage or input error, after one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its line already printed)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # lqkit's own debug lines, not every library's (matplotlib's font search, triton's...)
        logging.getLogger("lqkit").setLevel(logging.DEBUG)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock", "huggingface_hub"):
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
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"lqkit {args.command}: error: {e.strerror or e}{where}; nothing was written: free space or choose "
              "a writable place (e.g. another --out) and run again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
