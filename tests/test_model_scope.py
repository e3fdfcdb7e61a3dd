"""The whole model under one budget: quantized embedding / head tables in checkpoints, and budgets of
scope "model" that count every stored tensor (lqkit.allocate, lqkit.pipeline, lqkit.checkpoint)."""

import json

import pytest
import torch
from conftest import tiny_config
from test_cli import _bad

from lqkit import checkpoint, pipeline
from lqkit.allocate import AllocationConfig, Budget
from lqkit.calibrate import CalibConfig
from lqkit.core.allocate import BudgetError
from lqkit.core.costs import CandidateSet
from lqkit.core.embed import RowSpec
from lqkit.errors import SpecError
from lqkit.nn.embedding import QuantizedEmbedding, QuantizedHead, TiedHead, build_tables

CANDS = CandidateSet(quantizers=("rtn", "nf"), bits=(2, 3, 4, 8), group_sizes=(16, 32), ranks=(0, 4), outliers=(0.0,))
CALIB = CalibConfig(samples=4, seqlen=64)


def _tiny(arch: str, tied: bool):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _folder(tmp_path, tok, arch: str, tied: bool):
    d = tmp_path / f"tiny-{arch}-{'tied' if tied else 'untied'}"
    _tiny(arch, tied).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _headers(folder) -> dict:
    """name -> safetensors header entry of every tensor of a checkpoint."""
    out = {}
    for f in checkpoint.tensor_files(checkpoint.read_meta(folder)):
        with open(folder / f, "rb") as fh:
            out.update(json.loads(fh.read(int.from_bytes(fh.read(8), "little"))))
    out.pop("__metadata__", None)
    return out


def _tensor_bytes(folder) -> int:
    """Bytes of every tensor in a checkpoint's safetensors files (their data, headers aside)."""
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in _headers(folder).values())


@pytest.mark.parametrize("arch, tied", [("gemma3", True), ("llama", False), ("llama", True)])
def test_quantized_tables_save_reload_and_run(arch, tied, tmp_path, tiny_tokenizer):
    model = _tiny(arch, tied)
    emb = model.get_input_embeddings()
    tables = {"model.embed_tokens": RowSpec(8)}
    if not tied:
        tables["lm_head"] = RowSpec(4, symmetric=False)
    build_tables(model, tables, {"lm_head": "model.embed_tokens"} if tied else {}, quantize=True)
    assert isinstance(model.lm_head, TiedHead if tied else QuantizedHead)
    assert emb is not model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        ref = model(ids).logits
    out = checkpoint.save(model, tiny_tokenizer, tmp_path / "ck", plan={})
    meta = checkpoint.read_meta(out)
    assert meta["format_version"] == 5 and meta["tables"]["model.embed_tokens"]["tied"] == (["lm_head"] if tied else [])
    back = checkpoint.load(out)
    assert isinstance(back.get_input_embeddings(), QuantizedEmbedding)
    assert isinstance(back.lm_head, TiedHead if tied else QuantizedHead)
    if tied:
        assert back.lm_head.table is back.get_input_embeddings()  # still tied: one stored copy
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref)
    names = set(_headers(out))
    assert "model.embed_tokens.codes" in names and not any(n.startswith("lm_head") for n in names if tied)


@pytest.mark.parametrize("arch, tied", [("gemma3", True), ("llama", False)])
def test_model_scope_meets_the_byte_budget_of_the_written_tensors(arch, tied, tmp_path, tiny_tokenizer, cache):
    folder = _folder(tmp_path, tiny_tokenizer, arch, tied)
    budget = 75_000
    res = pipeline.compress(str(folder), AllocationConfig(Budget(bytes=budget, scope="model"), CANDS),
                            str(tmp_path / "ck"), calib=CALIB, progress=False)
    written = _tensor_bytes(tmp_path / "ck")
    m = res.allocation["model"]
    assert written <= budget and written == m["achieved_bytes"] == res.summary.model_bits // 8
    assert m["achieved_bits"] == res.summary.model_bits  # the solver's count is the checkpoint's
    assert res.summary.table_params > 0 and m["tables"]["model.embed_tokens"]["spec"] != "kept"
    assert res.allocation["achieved_bits_per_param"] == pytest.approx(res.summary.effective_bits)  # linear-only too
    back = checkpoint.load(tmp_path / "ck")
    assert isinstance(back.get_input_embeddings(), QuantizedEmbedding)
    with torch.no_grad():
        assert torch.isfinite(back(torch.tensor([[1, 5, 9]])).logits).all()
    text = pipeline.format_inspect(pipeline.inspect(str(tmp_path / "ck")))
    assert "whole model" in text and "model.embed_tokens" in text
    # bits per parameter over all parameters; the cached statistics and rows: only the solve again
    res2 = pipeline.compress(str(folder), AllocationConfig(Budget(6.0, scope="model"), CANDS), str(tmp_path / "b"),
                             calib=CALIB, progress=False)
    assert _tensor_bytes(tmp_path / "b") * 8 <= 6.0 * res2.allocation["model"]["params"]
    assert res2.allocation["table_cached"]


def test_model_scope_budget_below_the_minimum_names_one_that_works(tmp_path, tiny_tokenizer, cache):
    folder = _folder(tmp_path, tiny_tokenizer, "llama", False)
    with pytest.raises(BudgetError, match=r"--budget-bytes \d+ --scope model"):
        pipeline.compress(str(folder), AllocationConfig(Budget(bytes=20_000, scope="model"), CANDS),
                          str(tmp_path / "low"), calib=CALIB, progress=False)
    assert not (tmp_path / "low").exists()


def test_budget_scope_is_checked():
    with pytest.raises(SpecError, match="--scope model"):
        Budget(3.0, scope="everything")
    with pytest.raises(SpecError, match="--metric kfac"):
        AllocationConfig(Budget(3.0, scope="model"), metric="hessian")
    assert Budget(bytes=10, scope="model").label() == "10 bytes (whole model)"


@pytest.mark.parametrize("args, expect", [
    (["--scope", "model"], "give --budget or --budget-bytes with it"),
    (["--method", "rtn", "--scope", "model"], "give --budget or --budget-bytes with it"),
    (["--budget", "3", "--scope", "model", "--metric", "hessian"], "--metric kfac"),
    (["--budget", "3", "--scope", "model", "--target", "vllm"], "cannot serve a quantized embedding"),
    (["--budget", "3", "--scope", "model", "--cand-table-bits", "9"], "e.g. 8, 6 or 4"),
    (["--budget", "3", "--scope", "model", "--stats", "s.safetensors"], "drop them, or use --scope linear"),
])
def test_scope_cli_bad_input(args, expect, tmp_path):
    _bad(["compress", "--out", str(tmp_path / "x"), *args], tmp_path, expect)
    assert not (tmp_path / "x").exists()


def test_linear_then_whole_model_budget_share_the_run(tmp_path, tiny_tokenizer, cache):
    """A whole-model budget after a linear-only one on the same model and candidates sweeps again for
    the tables' statistics only: the linear layers' cost rows are the cached ones."""
    folder = _folder(tmp_path, tiny_tokenizer, "llama", True)
    a = pipeline.compress(str(folder), AllocationConfig(Budget(3.0), CANDS), str(tmp_path / "a"), calib=CALIB,
                          progress=False)
    b = pipeline.compress(str(folder), AllocationConfig(Budget(bytes=75_000, scope="model"), CANDS),
                          str(tmp_path / "b"), calib=CALIB, progress=False)
    assert b.allocation["table_cached"] and b.allocation["table_key"] == a.allocation["table_key"]
    assert "model" in b.allocation and "model" not in a.allocation
    assert _tensor_bytes(tmp_path / "b") <= 75_000 < _tensor_bytes(tmp_path / "a")
