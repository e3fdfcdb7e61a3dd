"""The command line: a smoke run and the bad inputs a user can hit (exit 2, one line, nothing written)."""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

SMALL_EVAL = ["--windows", "2", "--window-tokens", "64"]


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", LQKIT_CACHE=os.environ.get("LQKIT_CACHE", ""), COLUMNS="80")
    return subprocess.run([sys.executable, "-m", "lqkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _verbs():
    from lqkit.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_lists_every_verb_with_examples():
    verbs = _verbs()
    assert {"compress", "eval", "generate", "export", "distill", "inspect", "finetune"} <= set(verbs)
    r = run("--help")
    assert r.returncode == 0
    listing, examples = r.stdout.split("\nexamples", 1)
    lines = listing.splitlines()
    for verb in verbs:  # one line each: the verb, then what it does, not wrapped onto a second line
        i = next((i for i, ln in enumerate(lines) if re.match(rf" +{re.escape(verb)} +\S", ln)), None)
        assert i is not None, (verb, r.stdout)
        assert i + 1 == len(lines) or not re.match(r" {10,}\S", lines[i + 1]), (verb, lines[i + 1])
    for verb in verbs:  # and an example command line for each verb
        assert re.search(rf"^  lqkit {re.escape(verb)}( |$)", examples, re.M), (verb, examples)
    assert re.search(r"^  lqkit compress --model \S+ --budget [\d.]+ .*--device cuda", examples, re.M)  # streamed
    assert re.search(r"^  torchrun --nproc-per-node \d+ -m lqkit compress ", examples, re.M)
    for verb, parser in verbs.items():
        assert "examples:" in parser.format_help() and f"lqkit {verb}" in parser.epilog, verb


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_every_verb_help_renders_with_an_example(verb, capsys):
    from lqkit.cli import main

    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lqkit {verb}") and re.search(rf"^  (lqkit|torchrun .* -m lqkit) {verb}", out, re.M)


def _accepted(argv: list[str]) -> None:
    """Parse ``argv`` and run the checks a verb makes before it loads anything (raises on a bad value)."""
    from lqkit import cli

    a = cli.build_parser().parse_args(argv)
    if a.command == "compress":
        if a.budget is not None or a.budget_bytes is not None:
            cli._allocation_from_args(a)
        else:
            a.method = a.method or "lq"
            cli._spec_from_args(a)
        cli._protocol(a), cli._calib_config(a)
    elif a.command in ("eval",):
        cli._protocol(a)


NO_MODEL = "/nonexistent/lqkit-test-model"  # a flag that passed its checks would fail here, at once


@pytest.mark.parametrize("args, flag, works", [
    (["compress", "--method", "nf", "--bits", "5"], "--bits", "4"),
    (["compress", "--method", "rtn", "--bits", "9"], "--bits", "8"),
    (["compress", "--quantizer", "nf", "--bits", "8"], "--bits", "4"),
    (["compress", "--group-size", "0"], "--group-size", "128"),
    (["compress", "--method", "sparse", "--outliers", "0.7"], "--outliers", None),
    (["compress", "--method", "gptq", "--damp", "0"], "--damp", "0.01"),
    (["compress", "--calib-seqlen", "1"], "--calib-seqlen", "512"),
    (["compress", "--max-shard-size", "huge"], "--max-shard-size", "2GiB"),
    (["compress", "--budget", "-1"], "--budget", "3.0"),
    (["compress", "--budget", "abc"], "--budget", "3.0"),
    (["compress", "--budget-bytes", "lots"], "--budget-bytes", "40MB"),
    (["compress", "--budget", "3", "--cand-bits", "9"], "--cand-bits", None),
    (["compress", "--budget", "3", "--cand-quantizers", "nuq", "--cand-bits", "6"], "--cand-bits", "2,3,4"),
    (["compress", "--budget", "3", "--cand-quantizers", "rtn,foo"], "--cand-quantizers", None),
    (["compress", "--budget", "3", "--cand-group-sizes", "0"], "--cand-group-sizes", None),
    (["compress", "--budget", "3", "--cand-outliers", "0.9"], "--cand-outliers", None),
    (["compress", "--budget", "3", "--target", "vllm-marlin", "--cand-bits", "3"], "--cand-bits", None),
    (["compress", "--budget", "3", "--min-bits", "down_proj"], "--min-bits", None),
    (["compress", "--budget", "3", "--workers", "0"], "--workers", None),
    (["eval", "--windows", "0"], "--windows", "40"),
    (["eval", "--window-tokens", "1"], "--window-tokens", "512"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens", "64"),
    (["demo", "--budget", "0"], "--budget", "3.0"),
    (["distill", "ck", "--out", "o", "--lr", "0"], "--lr", None),
    (["finetune", "ck", "--data", "d.txt", "--out", "o", "--eval-fraction", "1.5"], "--eval-fraction", None),
    (["finetune", "ck", "--data", "d.txt", "--out", "o", "--weight-decay", "-1"], "--weight-decay", None),
])
def test_bad_flag_values_name_a_value_that_works(args, flag, works, capsys, tmp_path):
    """Each message names the flag and a value of it that works, and that value passes the same checks."""
    from lqkit.cli import main

    if args[0] in ("compress",):
        args = [*args, "--model", NO_MODEL, "--out", str(tmp_path / "o")]
    code = main([*args, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert flag in err, err
    m = re.search(rf"e\.g\. {re.escape(flag)} ('[^']*'|[^\s;)]+)", err)
    assert m, f"no working value of {flag} named: {err}"
    value = shlex.split(m.group(1))[0]
    if works is not None:
        assert value == works, err
    i = len(args) - 1 - args[::-1].index(flag)  # the suggested value in place of the bad one
    _accepted([*args[:i + 1], value, *args[i + 2:]])


def test_a_bad_flag_exits_non_zero_in_one_line():
    r = run("compress", "--model", NO_MODEL, "--out", "o", "--method", "nf", "--bits", "5")
    assert r.returncode == 2 and r.stderr.strip() == ("lqkit compress: error: --bits 5 is not supported with "
                                                      "--method nf; use one of 2, 3, 4, e.g. --bits 4"), r.stderr
    r = run("eval", "--windows", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "e.g. --windows 40" in r.stderr


@pytest.mark.parametrize("args, expect", [
    ([], "e.g. lqkit compress --model"),
    (["compress", "--bits", "x", "--out", "o"], "e.g. --bits 3"),
    (["compress", "--budget", "3"], "e.g. lqkit compress --model"),  # --out missing
    (["generate", "--prompt"], "e.g. lqkit generate out/ck --prompt"),
    (["compress", "--budget", "3", "--budget-bytes", "4MB", "--out", "o"], "e.g. --budget 3.0"),
    (["compress", "--budget", "3", "--cand-ranks", "8,x", "--out", "o"], "e.g. --cand-ranks 0,8,16"),
])
def test_usage_errors_name_a_value_that_works(args, expect, capsys):
    from lqkit.cli import main

    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expect in err, err


def test_int_zero_flag(tiny_model_dir, tmp_path):
    """--int-zero: rtn with integer zero points, 4 + 20/32 bits at 4-bit g32 (the float offsets' 4 + 32/32
    less 12/32); refused in one line for a quantizer without zero points."""
    out = tmp_path / "ck"
    r = run("compress", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--int-zero", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "lqkit.json").read_text())
    assert all(s["quant"]["int_zero"] for s in meta["plan"].values())
    assert meta["summary"]["effective_bits"] == pytest.approx(4 + 20 / 32)
    r = run("compress", "--model", str(tiny_model_dir), "--method", "nf", "--bits", "4", "--int-zero",
            "--out", str(tmp_path / "nf"), "-q")
    assert r.returncode == 2 and "integer zero points" in r.stderr and not (tmp_path / "nf").exists()


def test_compress_eval_inspect_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    r = run("compress", "--model", str(tiny_model_dir), "--method", "lq", "--bits", "3", "--group-size", "32",
            "--rank", "4", "--iters", "3", "--out", str(out), "--eval", *SMALL_EVAL, "-q")
    assert r.returncode == 0, r.stderr
    assert "effective bits" in r.stdout and "perplexity" in r.stdout
    r = run("eval", str(out), "--json", *SMALL_EVAL)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"perplexity", "effective_bits", "windows", "window_tokens"} <= set(d)
    assert d["windows"] == 2 and d["window_tokens"] == 64 and 3 < d["effective_bits"] < 8
    assert d["perplexity"] > 1
    r = run("eval", str(tiny_model_dir), "--json", *SMALL_EVAL)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["effective_bits"] is None
    r = run("inspect", str(out))
    assert r.returncode == 0 and "model.layers.1.mlp.down_proj" in r.stdout and "lq:rtn3/g32in+r4" in r.stdout
    assert "triton/frag" in r.stdout  # where each matrix runs on a GPU (rtn 3-bit, groups along in)
    assert "on a CUDA GPU: 14 on the tensor-core GEMV" in r.stdout and "--target lqkit-gpu" not in r.stdout
    r = run("inspect", str(out), "--json")
    d = json.loads(r.stdout)
    assert len(d["plan"]) == 14 and set(d["gpu"].values()) == {"triton/frag"}
    assert d["gpu_summary"] == {"paths": {"triton/frag": 14}, "outlier_pass": 0, "rotated": 0, "budget": False}


def test_inspect_gpu_summary_names_slow_paths():
    from lqkit import kernels, pipeline
    from lqkit.core import MatrixSpec, QuantSpec
    from lqkit.core.rotation import Rotation

    plan = {"a": MatrixSpec("quant", QuantSpec("gptq", 3, 128)),
            "b": MatrixSpec("quant", QuantSpec("gptq", 2, 128, outliers=0.005)),
            "c": MatrixSpec("quant", QuantSpec("nf", 3, 64)),
            "d": MatrixSpec("quant", QuantSpec("rtn", 3, 128, group_dim="out")),
            "e": MatrixSpec("lowrank", None, rank=8),
            "f": MatrixSpec("quant", QuantSpec("rtn", 4, 128), rotation=Rotation(seed=0, block=128))}
    paths = {n: kernels.path_for(s.quant) for n, s in plan.items()}
    g = pipeline.gpu_summary(paths, plan, budget=True)
    assert g == {"paths": {"triton/frag": 3, "triton/interleaved": 2, "torch": 1}, "outlier_pass": 1, "rotated": 1,
                 "budget": True}
    line = pipeline.format_gpu_summary(g)
    assert line.startswith("on a CUDA GPU: 3 on the tensor-core GEMV")
    assert "1 of them with one sparse outlier pass" in line
    assert "1 rotating their input first" in line and "--target lqkit-gpu" in line
    line = pipeline.format_gpu_summary(pipeline.gpu_summary(paths, plan))  # one method for every matrix: no --target
    assert "--target" not in line and "groups along in" in line
    fast = {"a": plan["a"]}
    assert "run fastest" not in pipeline.format_gpu_summary(pipeline.gpu_summary({"a": "triton/frag"}, fast, True))


def test_generate_smoke(tiny_model_dir, tmp_path):
    from lqkit import pipeline
    from lqkit.core import MatrixSpec, QuantSpec

    out = tmp_path / "ck"
    pipeline.compress(str(tiny_model_dir), MatrixSpec("quant", QuantSpec("rtn", 4, 32)), str(out), progress=False)
    r = run("generate", str(out), "--prompt", "The tower is", "--max-new-tokens", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The tower is") and "tokens/s" in r.stdout and "eager" in r.stdout
    r = run("generate", str(out), "--prompt", "x", "--max-new-tokens", "0")
    assert r.returncode == 2 and "max-new-tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _bad(args, tmp_path, expect):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert expect in err, err
    return r


@pytest.mark.parametrize("args, expect", [
    (["--method", "foo"], "invalid choice"),
    (["--method", "nf", "--bits", "5"], "--bits 5 is not supported with --method nf; use one of 2, 3, 4"),
    (["--method", "rtn", "--bits", "9"], "use one of 2, 3, 4, 5, 6, 7, 8, e.g. --bits 8"),
    (["--rank", "1000"], "rank 1000 is larger"),
    (["--group-size", "0"], "e.g. --group-size 128"),
    (["--include", "nomatch_xyz"], "no linear layer matches"),
    (["--eval", "--text", "{empty}"], "empty"),
    (["--eval", "--text", "{short}"], "at least 63"),
])
def test_bad_compress_inputs(args, expect, tiny_model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a few words only")
    args = [a.format(empty=tmp_path / "empty.txt", short=tmp_path / "short.txt") for a in args]
    out = tmp_path / "ck"
    _bad(["compress", "--model", str(tiny_model_dir), "--out", str(out), "--group-size", "32", "--rank", "4",
          *SMALL_EVAL, *args], tmp_path, expect)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_missing_model_path(tmp_path):
    _bad(["compress", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "ck")], tmp_path, "does not exist")
    _bad(["eval", str(tmp_path / "nope")], tmp_path, "does not exist")


def test_existing_out_needs_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _bad(["compress", "--model", str(tiny_model_dir), "--out", str(out)], tmp_path, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_corrupted_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    assert run("compress", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
               "--out", str(out), "-q").returncode == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    _bad(["eval", str(out), *SMALL_EVAL], tmp_path, "truncated")


def test_a_target_without_a_fitting_group_size_names_one():
    import torch

    from lqkit.core.costs import CandidateSet, matrix_costs
    from lqkit.errors import SpecError

    cands = CandidateSet(quantizers=("rtn",), bits=(4,), group_sizes=(64,), ranks=(0,), outliers=(0.0,), target="vllm")
    with pytest.raises(SpecError) as e:
        matrix_costs(torch.randn(16, 96), None, cands, metric="hessian")
    m = re.search(r"e\.g\. --cand-group-sizes ([\d,]+)$", str(e.value))
    assert m, str(e.value)
    sizes = [int(g) for g in m.group(1).split(",")]
    assert sizes[:-1] == [64] and 96 % sizes[-1] == 0 and sizes[-1] < 96
