"""Distillation after compression at fixed bits: block losses go down, codes and size stay, saved ==
in memory, the command line and its errors. Tiny random llama only."""

import shutil

import pytest
import torch

from conftest import tiny_model
from lqkit import checkpoint, pipeline
from lqkit.calibrate import CalibConfig, calibration_ids
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.core.serving import int_parts
from lqkit.data import DEFAULT_CALIB_TEXT, read_text
from lqkit.distill import DistillConfig, distill, distill_model, model_nll, stored_layout
from lqkit.errors import LqkitError, SpecError
from lqkit.nn.surgery import compressed_modules
from lqkit.stream import open_model
from test_cli import run

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = DistillConfig(steps=40, lr=1e-3, scale_lr=1e-4, batch_size=2, samples=8, seqlen=64, heldout=2)
SMALL = ["--calib-samples", "4", "--calib-seqlen", "32", "--heldout", "1", "--batch-size", "2"]


def _plan(model):
    """Attention: LQ (rtn3 + rank 4); gate/up: rtn2 alone; down: nf3 alone (absmax trained)."""
    plan = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            if ".self_attn." in n:
                plan[n] = MatrixSpec("lq", QuantSpec("rtn", 3, 32), 4, iters=2)
            elif n.endswith("down_proj"):
                plan[n] = MatrixSpec("quant", QuantSpec("nf", 3, 32))
            else:
                plan[n] = MatrixSpec("quant", QuantSpec("rtn", 2, 32))
    return plan


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("src") / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ckpt(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "ck"
    pipeline.compress(str(folder), _plan(tiny_model("llama")), str(out), progress=False)
    return out


def _ids(tok, cfg=CFG):
    body = read_text(None, DEFAULT_CALIB_TEXT)[0]
    return calibration_ids(tok, body, CalibConfig(cfg.samples + cfg.heldout, cfg.seqlen, fisher=False))


def _student(ckpt):
    m = checkpoint.load(ckpt, prepare=False)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _tensors(folder):
    """name -> (dtype, shape) of every stored tensor (the file's header; its key order may differ)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()})  # noqa: SIM118
    return out


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_block_losses_fall_codes_and_size_stay(ckpt, folder, tiny_tokenizer):
    student = _student(ckpt)
    before, layout = _state(student), stored_layout(student)
    ids = _ids(tiny_tokenizer)
    held = ids[torch.linspace(0, ids.shape[0] - 1, CFG.heldout).round().long()]  # the windows never trained on
    nll0 = model_nll(student, held)
    rep = distill_model(student, open_model(str(folder), "cpu"), ids, CFG, integer_zero=False, progress=False)
    assert len(rep.blocks) == 2
    for b in rep.blocks:
        assert b.mse_after <= b.mse_before and b.trained_tensors > 0
    assert any(b.kept and b.mse_after < 0.9 * b.mse_before for b in rep.blocks)
    n = rep.heldout_nll  # windows never trained on
    assert n["after"] < n["before"] and n["before"] == pytest.approx(nll0)
    assert model_nll(student, held) == pytest.approx(n["after"]) and n["after"] < nll0
    assert stored_layout(student) == layout  # shapes and stored dtypes: the size is the same
    after = _state(student)
    for name, m in compressed_modules(student).items():
        assert torch.equal(after[f"{name}.qcodes"], before[f"{name}.qcodes"])  # codes bit for bit
        changed = [k for k in (["q_absmax"] if m.spec.quant.method == "nf" else ["q_scale", "q_offset"])
                   + (["L", "R"] if m.L is not None else []) if not torch.equal(after[f"{name}.{k}"], before[f"{name}.{k}"])]
        assert changed, name
        if m.L is not None:  # L and R hold exactly their stored fp16 values
            assert torch.equal(m.L, m.L.half().float()) and torch.equal(m.R, m.R.half().float())
    # only what a compressed layer stores changed: embeddings, norms, head are the teacher's
    for k in before:
        if not any(k.startswith(n + ".") for n in compressed_modules(student)):
            assert torch.equal(after[k], before[k]), k


def test_checkpoint_equals_in_memory_and_keeps_plan_and_bits(ckpt, folder, tiny_tokenizer, tmp_path):
    student = _student(ckpt)
    distill_model(student, open_model(str(folder), "cpu"), _ids(tiny_tokenizer), CFG, integer_zero=False,
                  progress=False)
    res = distill(ckpt, tmp_path / "d", CFG, progress=False)
    back = checkpoint.load(tmp_path / "d")
    x = _ids(tiny_tokenizer)[:2]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, student(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    old, new = checkpoint.read_meta(ckpt), checkpoint.read_meta(tmp_path / "d")
    assert new["plan"] == old["plan"] and new["summary"] == old["summary"]
    assert _tensors(tmp_path / "d") == _tensors(ckpt)  # the same names, shapes and dtypes: the same bytes
    d = new["extra"]["distill"]
    assert d["config"]["steps"] == CFG.steps and len(d["blocks"]) == 2 and d["seconds"] > 0
    assert all(b["mse_after"] <= b["mse_before"] for b in d["blocks"])
    assert res.effective_bits == old["summary"]["effective_bits"]
    assert set(d["weight_error"]) == set(old["plan"])


def test_integer_zero_points_stay_exportable(ckpt, folder, tiny_tokenizer):
    student = _student(ckpt)
    before = _state(student)
    cfg = DistillConfig(**{**CFG.to_dict(), "steps": 10, "zero_points": "integer"})
    distill_model(student, open_model(str(folder), "cpu"), _ids(tiny_tokenizer), cfg, integer_zero=True,
                  progress=False)
    for name, m in compressed_modules(student).items():
        if m.spec.quant.method == "rtn":
            from lqkit.core import packing

            codes = packing.unpack(m.qcodes, m.spec.quant.bits, m.in_features * m.out_features).view(m.shape)
            int_parts(codes, m.aux(), m.spec.quant)  # raises when an offset is off −z·scale
            assert not torch.equal(m.q_scale, before[f"{name}.q_scale"])


def test_auto_zero_points_follow_the_plans_target():
    from lqkit.distill import _integer_zero

    def meta(target):
        return {"extra": {"allocation": {"target": target} if target else {}}}

    auto = DistillConfig()
    assert _integer_zero(auto, meta("vllm")) and _integer_zero(auto, meta("vllm-marlin"))
    assert not _integer_zero(auto, meta("lqkit-gpu")) and not _integer_zero(auto, meta(None))  # float offsets
    assert _integer_zero(DistillConfig(zero_points="integer"), meta("lqkit-gpu"))


def test_stored_integer_zero_points_train_their_scales_only(folder, tiny_tokenizer, tmp_path):
    """A plan whose rtn matrices store integer zero points (QuantSpec.int_zero): distillation trains
    their scales (the offsets −z·scale follow), the packed zero points and codes stay bit for bit, and
    the checkpoint keeps its tensors' names, shapes and dtypes."""
    from dataclasses import replace

    plan = {n: replace(s, quant=replace(s.quant, int_zero=True)) if s.quant.method == "rtn" else s
            for n, s in _plan(tiny_model("llama")).items()}
    ck = tmp_path / "ck"
    pipeline.compress(str(folder), plan, str(ck), progress=False)
    student = _student(ck)
    before = _state(student)
    rep = distill_model(student, open_model(str(folder), "cpu"), _ids(tiny_tokenizer), CFG, integer_zero=False,
                        progress=False)
    assert any(b.kept for b in rep.blocks) and rep.zero_points == "integer"
    after = _state(student)
    rtn = {n: m for n, m in compressed_modules(student).items() if m.spec.quant.method == "rtn"}
    assert rtn and all(m.aux_names == ("scale", "zero") for m in rtn.values())
    for name in rtn:
        assert torch.equal(after[f"{name}.q_zero"], before[f"{name}.q_zero"])
        assert torch.equal(after[f"{name}.qcodes"], before[f"{name}.qcodes"])
    assert any(not torch.equal(after[f"{n}.q_scale"], before[f"{n}.q_scale"]) for n in rtn)
    res = distill(ck, tmp_path / "d", CFG, progress=False)
    assert _tensors(tmp_path / "d") == _tensors(ck)
    assert res.effective_bits == checkpoint.read_meta(ck)["summary"]["effective_bits"]


def test_kl_stage(ckpt, folder, tiny_tokenizer):
    student = _student(ckpt)
    cfg = DistillConfig(**{**CFG.to_dict(), "steps": 0, "kl_steps": 8, "kl_lr": 1e-4})
    rep = distill_model(student, open_model(str(folder), "cpu"), _ids(tiny_tokenizer), cfg, integer_zero=False,
                        progress=False)
    assert rep.blocks == () and rep.kl["after"] <= rep.kl["before"] and rep.kl["measured_on"] == "heldout"


def test_config_is_checked():
    with pytest.raises(SpecError, match="nothing to distill"):
        DistillConfig(steps=0)
    with pytest.raises(SpecError, match="zero points"):
        DistillConfig(zero_points="maybe")
    with pytest.raises(SpecError, match="learning rate|lr"):
        DistillConfig(lr=0)


def test_cli_distill(ckpt, tmp_path):
    r = run("distill", str(ckpt), "--out", str(tmp_path / "d"), "--steps", "3", *SMALL, "-q")
    assert r.returncode == 0, r.stderr
    assert "block-wise" in r.stdout and "held-out loss" in r.stdout and "unchanged" in r.stdout
    meta = checkpoint.read_meta(tmp_path / "d")
    assert meta["extra"]["distill"]["config"]["steps"] == 3
    assert "distilled against" in pipeline.format_inspect(pipeline.inspect(str(tmp_path / "d")))


def test_cli_compress_distill_eval(folder, tmp_path):
    out = tmp_path / "c"
    r = run("compress", "--model", str(folder), "--method", "lq", "--bits", "3", "--group-size", "32", "--rank", "4",
            "--iters", "2", "--out", str(out), "--distill", "3", "--calib-samples", "4", "--calib-seqlen", "32",
            "--distill-heldout", "1", "--distill-batch-size", "2", "--eval", "--windows", "2", "--window-tokens", "64",
            "-q")
    assert r.returncode == 0, r.stderr
    meta = checkpoint.read_meta(out)
    assert meta["extra"]["distill"]["config"]["steps"] == 3 and len(meta["extra"]["distill"]["blocks"]) == 2
    assert meta["extra"]["eval"]["perplexity"] > 1 and "distilled" in r.stdout and "perplexity" in r.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_cli_errors_are_one_line(folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    ck = tmp_path / "ck"
    pipeline.compress(str(src), MatrixSpec("quant", QuantSpec("rtn", 3, 32)), str(ck), progress=False)
    r = run("distill", str(ck), "--out", str(tmp_path / "a"), "--no-scales", *SMALL)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nothing to distill" in r.stderr
    shutil.rmtree(src)
    r = run("distill", str(ck), "--out", str(tmp_path / "b"), *SMALL)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "source model" in r.stderr and "--model" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(LqkitError, match="does not exist"):
        distill(ck, tmp_path / "c", CFG, progress=False)
