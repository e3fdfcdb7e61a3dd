"""Budget allocation end to end on a tiny model: plan within budget, saved, reloaded, reported, drawn."""

import json

import pytest

from lqkit import checkpoint, pipeline
from lqkit.allocate import AllocationConfig, Budget, Constraint, CostTable, parse_bytes
from lqkit.calibrate import CalibConfig
from lqkit.core.allocate import BudgetError
from lqkit.core.costs import CandidateSet
from lqkit.errors import SpecError

from test_cli import _bad, run

CANDS = CandidateSet(quantizers=("rtn", "gptq", "nf"), bits=(2, 3, 4, 8), group_sizes=(16, 32), ranks=(0, 4),
                     outliers=(0.0, 0.01))
CALIB = CalibConfig(samples=4, seqlen=64)


def _compress(model_dir, out, budget, **kw):
    cfg = AllocationConfig(Budget(budget), CANDS, **kw)
    return pipeline.compress(str(model_dir), cfg, str(out), calib=CALIB, progress=False)


def test_budget_plan_is_within_budget_saved_and_reloaded(tiny_model_dir, tmp_path, cache):
    res = _compress(tiny_model_dir, tmp_path / "a", 3.0)
    a = res.allocation
    assert a["achieved_bits"] <= a["budget_bits"] and a["achieved_bits_per_param"] <= 3.0
    assert res.summary.effective_bits == pytest.approx(a["achieved_bits_per_param"])  # same exact accounting
    assert len({s.label() for s in res.plan.values()}) > 1  # not a uniform plan
    meta = checkpoint.read_meta(tmp_path / "a")
    assert meta["extra"]["allocation"]["solver_status"] and meta["extra"]["allocation"]["optimal"]
    assert (tmp_path / "a" / "plan.png").stat().st_size > 1000
    model = checkpoint.load(tmp_path / "a")
    from lqkit.nn.surgery import compressed_modules

    assert {n: m.spec for n, m in compressed_modules(model).items()} == res.plan  # the plan round-trips
    # the table is cached: a second budget costs only the solve
    res2 = _compress(tiny_model_dir, tmp_path / "b", 4.0)
    assert res2.allocation["table_cached"] and res2.allocation["table_key"] == a["table_key"]
    assert res2.allocation["objective"] <= a["objective"]
    tables = list((cache / "tables").glob("*.json"))
    assert len(tables) == 1 and CostTable.from_json(json.loads(tables[0].read_text())).key == a["table_key"]


def test_rotated_candidates_end_to_end(tiny_model_dir, tmp_path, cache):
    """--rotate: the table holds both kinds, the plan picks per matrix, the checkpoint reloads to the
    plan (rotations included) and runs."""
    import torch
    from dataclasses import replace

    from lqkit.nn.surgery import compressed_modules

    res = pipeline.compress(str(tiny_model_dir), AllocationConfig(Budget(3.0), replace(CANDS, rotations=(False, True))),
                            str(tmp_path / "r"), calib=CALIB, progress=False)
    kinds = [s.rotation is not None for s in res.plan.values()]
    assert any(kinds) and not all(kinds), kinds
    assert res.allocation["achieved_bits_per_param"] <= 3.0
    model = checkpoint.load(tmp_path / "r")
    assert {n: m.spec for n, m in compressed_modules(model).items()} == res.plan
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3, 20)[None]).logits).all()


def test_constraints_and_minimum_budget(tiny_model_dir, tmp_path, cache):
    res = _compress(tiny_model_dir, tmp_path / "c", 3.5, constraints=(Constraint("down_proj", min_bits=4.5),))
    for name, r in res.reports.items():
        if "down_proj" in name:
            assert r.bits_per_param >= 4.5
    with pytest.raises(BudgetError, match="smallest size these candidates can reach"):  # before calibration
        _compress(tiny_model_dir, tmp_path / "d", 1.0)
    with pytest.raises(BudgetError, match="smallest achievable"):  # with constraints: once the costs are known
        _compress(tiny_model_dir, tmp_path / "d", 3.0, constraints=(Constraint(".", min_bits=4.5),))
    assert not (tmp_path / "d").exists()
    with pytest.raises(SpecError, match="no candidate of"):
        _compress(tiny_model_dir, tmp_path / "e", 3.0, constraints=(Constraint("q_proj", min_bits=99),))


def test_budget_in_bytes():
    assert parse_bytes("40MB") == 40_000_000 and parse_bytes("1.5KiB") == 1536 and parse_bytes("123") == 123
    assert Budget(bytes=1000).total_bits(10 ** 6) == 8000 and Budget(2.5).total_bits(1000) == 2500
    with pytest.raises(SpecError):
        parse_bytes("forty")
    with pytest.raises(SpecError):
        Budget()
    with pytest.raises(SpecError):
        Budget(-1.0)


@pytest.mark.parametrize("args, expect", [
    (["--budget", "3", "--method", "rtn"], "drop one of them"),
    (["--budget", "3", "--budget-bytes", "1MB"], "not both"),
    (["--budget-bytes", "lots"], "e.g. --budget-bytes 40MB"),
    (["--budget", "3", "--min-bits", "noequals"], "REGEX=BITS"),
    (["--budget", "3", "--cand-quantizers", "foo"], "unknown quantizer"),
    (["--budget", "3", "--cand-bits", "x"], "comma-separated"),
    (["--method", "rtn", "--rotate"], "--rotate adds rotated candidates"),
    (["--budget", "3", "--rotate", "--target", "vllm"], "takes no input rotation"),
])
def test_budget_cli_bad_input(args, expect, tmp_path):
    _bad(["compress", "--out", str(tmp_path / "x"), *args], tmp_path, expect)
    assert not (tmp_path / "x").exists()


def test_budget_cli_smoke(tiny_model_dir, tmp_path, cache):
    out = tmp_path / "cli"
    r = run("compress", "--model", str(tiny_model_dir), "--budget", "3.25", "--cand-bits", "2,3,4",
            "--cand-group-sizes", "16,32", "--cand-ranks", "0,4", "--cand-outliers", "0",
            "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "budget" in r.stdout and "achieved" in r.stdout
    r = run("inspect", str(out), "--plot", str(tmp_path / "plan.png"))
    assert r.returncode == 0 and "allocation" in r.stdout and "model.layers.0.self_attn.q_proj" in r.stdout
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    r = run("compress", "--model", str(tiny_model_dir), "--budget", "0.5", "--cand-bits", "2,3,4",
            "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(tmp_path / "low"), "-q")
    assert r.returncode == 2 and "smallest size these candidates can reach" in r.stderr and not (tmp_path / "low").exists()
