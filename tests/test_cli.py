"""The command line: a smoke run and the bad inputs a user can hit (exit 2, one line, nothing written)."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

SMALL_EVAL = ["--windows", "2", "--window-tokens", "64"]


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", LQKIT_CACHE=os.environ.get("LQKIT_CACHE", ""))
    return subprocess.run([sys.executable, "-m", "lqkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_help():
    for cmd in ([], ["compress"], ["eval"], ["inspect"], ["generate"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def test_help_lists_every_verb_with_examples():
    from lqkit.cli import build_parser

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    r = run("--help")
    assert r.returncode == 0
    for verb in verbs:  # one line each: the verb, then what it does
        assert re.search(rf"^ +{re.escape(verb)} +\S", r.stdout, re.M), (verb, r.stdout)
    assert "examples:" in r.stdout and "lqkit compress --model" in r.stdout and "torchrun --nproc-per-node" in r.stdout
    for verb, parser in verbs.items():
        assert "examples:" in parser.format_help() and f"lqkit {verb}" in parser.epilog, verb


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
    r = run("inspect", str(out), "--json")
    d = json.loads(r.stdout)
    assert len(d["plan"]) == 14 and set(d["gpu"].values()) == {"triton/frag"}


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
    (["--method", "nf", "--bits", "5"], "supports bits"),
    (["--method", "rtn", "--bits", "9"], "supports bits"),
    (["--rank", "1000"], "rank 1000 is larger"),
    (["--group-size", "0"], "group size"),
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
