"""Export: compressed-tensors folders that transformers (+ peft) load with lqkit's logits, refusals of
what the format cannot hold, the peft and dense formats, and servable allocation (--target vllm)."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from lqkit import checkpoint
from lqkit.compress import compress_model
from lqkit.core import quant as qmod
from lqkit.core import serving
from lqkit.core.allocate import BudgetError, solve
from lqkit.core.decompose import MatrixSpec
from lqkit.core.quant import QuantSpec
from lqkit.errors import SpecError
from lqkit.nn.surgery import compressed_modules
from lqkit.plan import uniform_plan
from test_allocate import brute_force

X = torch.randint(3, 384, (2, 20), generator=torch.Generator().manual_seed(0))


def _ct():
    return pytest.importorskip("compressed_tensors")


def _load_ct(folder, adapter: bool = False, native: str | None = None):
    """The folder through transformers + compressed-tensors: lqkit's reader (compressed-tensors'
    matching and decompressor per layer), or transformers' own ``from_pretrained`` (``native``:
    "dequantize" decompresses on load, "compressed" on the first forward)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lqkit.export import load_compressed_tensors

    if native is None:
        model = load_compressed_tensors(folder)
    else:
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if native == "dequantize" else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    if adapter:
        peft = pytest.importorskip("peft")
        model = peft.PeftModel.from_pretrained(model, folder / "adapter").eval()
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def _close(a, b, rel=2e-3):
    """Equal up to fp16 rounding of the dequantized weights (compressed-tensors dequantizes in the
    scales' dtype, float16), relative to the logits' scale."""
    assert (a - b).abs().max() <= rel * b.abs().max(), float((a - b).abs().max() / b.abs().max())


def _plan(model, arch):
    """A servable plan mixing schemes, ranks (0, 4, 8) and quantizers; q/k/v and gate/up tied per block."""
    plan = {}
    for n in uniform_plan(model, MatrixSpec("quant", QuantSpec())):
        block = int(n.split(".layers.")[1].split(".")[0])
        if n.endswith(("q_proj", "k_proj", "v_proj")):
            q = QuantSpec("rtn", 3 if block == 0 else 4, 32)
        elif n.endswith(("gate_proj", "up_proj")):
            q = QuantSpec("rtn_sym", 4, 16)
        elif n.endswith("o_proj"):
            q = QuantSpec("rtn", 2, 64, clip=True)  # 64 inputs: one group per row
        else:
            q = QuantSpec("rtn", 2, 32, clip=True)  # down_proj: 160 inputs
        rank = 0 if n.endswith("k_proj") else 8 if n.endswith("down_proj") else 4
        plan[n] = MatrixSpec("lorc", q, rank) if rank else MatrixSpec("quant", q)
    return plan


def _checkpoint(arch, tokenizer, folder, plan_fn=_plan):
    m = tiny_model(arch)
    plan = plan_fn(m, arch)
    compress_model(m, plan, progress=False)
    return checkpoint.save(m, tokenizer, folder, plan=plan)


# ----------------------------------------------------------------------------------------------
# the mapping of lqkit's integer grids onto compressed-tensors' (pure)


@pytest.mark.parametrize("method, bits, gs", [("rtn", b, g) for b in (2, 3, 4, 8) for g in (16, 64)]
                         + [("rtn_sym", 3, 32), ("rtn_sym", 8, 16), ("rtn", 4, 512)])
def test_int_parts_reproduce_lqkit(method, bits, gs):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    spec = QuantSpec(method, bits, gs, clip=method == "rtn")
    qt = qmod.quantize(w, spec)
    p = serving.int_parts(qt.codes, qt.aux, spec)
    assert p.q.dtype == torch.int8 and int(p.q.min()) >= -(1 << bits - 1) and int(p.q.max()) < (1 << bits - 1)
    assert (p.zero is None) == (method == "rtn_sym")
    ref = qmod.dequantize(qt)
    # the same grid; only the float16 rounding of lqkit's stored offset −z·scale differs (half an ulp)
    off = float(qt.aux["offset"].float().abs().max()) if "offset" in qt.aux else 0.0
    torch.testing.assert_close(serving.dequantize_parts(p), ref, rtol=0, atol=off * 2 ** -11 + 1e-7)
    assert serving.scheme(spec, 64) == serving.IntScheme(bits, gs if gs < 64 else None, method == "rtn_sym")


def test_packing_is_compressed_tensors_own():
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    for bits in (2, 3, 4, 5, 8):
        q = torch.randint(-(1 << bits - 1), 1 << bits - 1, (12, 64), dtype=torch.int8)
        torch.testing.assert_close(unpack_from_int32(pack_to_int32(q, bits), bits, q.shape), q)


def test_offset_that_is_no_zero_point_is_refused():
    spec = QuantSpec("rtn", 3, 16)
    qt = qmod.quantize(torch.randn(4, 32), spec)
    aux = dict(qt.aux, offset=qt.aux["offset"] + 0.3 * qt.aux["scale"])  # a non-integer zero point
    with pytest.raises(SpecError, match="integer zero point"):
        serving.int_parts(qt.codes, aux, spec)


# ----------------------------------------------------------------------------------------------
# compressed-tensors folders


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_compressed_tensors_loads_with_lqkit_logits(arch, tiny_tokenizer, tmp_path):
    _ct()
    from lqkit.export import export

    ck = _checkpoint(arch, tiny_tokenizer, tmp_path / "ck")
    r = export(ck, tmp_path / "ct")
    assert r.schemes == {"int3-g32-asym": 3, "int4-g32-asym": 3, "int4-g16-sym": 4, "int2-channel-asym": 2,
                         "int2-g32-asym": 2} and r.lora_modules == 12 and r.ranks == {"4": 10, "8": 2}
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert len(cfg["config_groups"]) == 5 and all(t.startswith("re:") for g in cfg["config_groups"].values()
                                                   for t in g["targets"])
    assert cfg["ignore"] == ["lm_head"]
    serve = (tmp_path / "ct" / "SERVE.md").read_text()
    assert f"vllm serve {(tmp_path / 'ct').resolve()}" in serve and "--max-lora-rank 8" in serve and "sglang" in serve
    lq = checkpoint.load(ck)
    full = _logits(lq)
    _close(_logits(_load_ct(tmp_path / "ct", adapter=True)), full)  # Q + L·R through peft
    for m in compressed_modules(lq).values():  # Q alone: the base folder without the adapter
        if m.L is not None:
            m.L.data.zero_()
    _close(_logits(_load_ct(tmp_path / "ct")), _logits(lq))


def test_integer_zero_points_export_as_the_same_zero_points(tiny_tokenizer, tmp_path):
    """Matrices storing integer zero points (QuantSpec.int_zero) export to the same compressed-tensors
    schemes and logits as the float-offset plan."""
    _ct()
    from dataclasses import replace

    from lqkit.export import export

    def iz_plan(model, arch):
        return {n: replace(s, quant=replace(s.quant, int_zero=True)) if s.quant.method == "rtn" else s
                for n, s in _plan(model, arch).items()}

    ck = _checkpoint("llama", tiny_tokenizer, tmp_path / "ck", iz_plan)
    r = export(ck, tmp_path / "ct")
    assert r.schemes == {"int3-g32-asym": 3, "int4-g32-asym": 3, "int4-g16-sym": 4, "int2-channel-asym": 2,
                         "int2-g32-asym": 2}
    lq = checkpoint.load(ck)
    _close(_logits(_load_ct(tmp_path / "ct", adapter=True)), _logits(lq))


@pytest.mark.parametrize("method, native", [("rtn_sym", "compressed"), ("rtn_sym", "dequantize"), ("rtn", "dequantize")])
def test_one_scheme_folder_loads_through_from_pretrained(method, native, tiny_tokenizer, tmp_path):
    _ct()
    from lqkit.export import export

    def plan(m, arch):
        return uniform_plan(m, MatrixSpec("quant", QuantSpec(method, 4, 32)))

    ck = _checkpoint("llama", tiny_tokenizer, tmp_path / "ck", plan)
    r = export(ck, tmp_path / "ct")
    assert r.adapter is None and not (tmp_path / "ct" / "adapter").exists()
    assert "--enable-lora" not in (tmp_path / "ct" / "SERVE.md").read_text()
    _close(_logits(_load_ct(tmp_path / "ct", native=native)), _logits(checkpoint.load(ck)))


REFUSED = [  # (spec, what the one line says, the option it names)
    (MatrixSpec("quant", QuantSpec("nf", 3, 32)), "nf codebooks", "--quantizer rtn"),
    (MatrixSpec("quant", QuantSpec("nuq", 3, 128)), "nuq codebooks", "--quantizer rtn"),
    (MatrixSpec("quant", QuantSpec("rtn", 3, 32, "out")), "groups along the output dim", "--group-dim in"),
    (MatrixSpec("quant", QuantSpec("rtn", 3, 32, outliers=0.01)), "kept fp16 outliers", "--outliers 0"),
    (MatrixSpec("quant", QuantSpec("rtn", 3, 32, outlier_features=0.05)), "16-bit feature columns",
     "--outlier-features 0"),
    (MatrixSpec("lowrank", None, 8), "no quantized part", "lq, lorc"),
    (MatrixSpec("quant", QuantSpec("rtn", 3, 48)), "groups of 48 over 64 inputs", "a divisor of 64"),
]


@pytest.mark.parametrize("spec, why, option", REFUSED, ids=[r[1].split()[0] for r in REFUSED])
def test_what_the_format_cannot_hold_is_refused(spec, why, option):
    from lqkit.export import _check_ct

    plan = {f"model.layers.{i}.mlp.up_proj": spec for i in range(5)}
    plan["model.layers.0.self_attn.q_proj"] = MatrixSpec("quant", QuantSpec("rtn", 4, 32))
    meta = {"plan": {n: s.to_dict() for n, s in plan.items()},
            "reports": {n: {"shape": [160, 64]} for n in plan}}
    with pytest.raises(SpecError) as e:
        _check_ct(meta)
    msg = str(e.value)
    assert "\n" not in msg and why in msg and option in msg and "--target vllm" in msg
    assert "model.layers.0.mlp.up_proj" in msg and "(+2 more)" in msg and "q_proj" not in msg
    assert serving.refusal(spec, (160, 64), serving.TARGETS["vllm"]) is not None


def test_bits_the_target_lacks_are_refused():
    spec = MatrixSpec("quant", QuantSpec("rtn", 3, 32))
    why, option = serving.refusal(spec, (64, 64), serving.TARGETS["vllm-marlin"])
    assert "3-bit codes" in why and "4,8" in option
    assert serving.refusal(MatrixSpec("quant", QuantSpec("rtn", 4, 16)), (64, 64), serving.TARGETS["vllm-marlin"])
    assert serving.refusal(spec, (64, 64), serving.TARGETS["vllm"]) is None


def test_fused_layers_with_different_schemes_are_refused(tiny_tokenizer, tmp_path, capsys):
    _ct()
    from lqkit.cli import main

    def plan(m, arch):
        p = _plan(m, arch)
        p["model.layers.1.self_attn.k_proj"] = MatrixSpec("quant", QuantSpec("rtn", 3, 32))  # q, v: 4 bits
        return p

    ck = _checkpoint("llama", tiny_tokenizer, tmp_path / "ck", plan)
    assert main(["export", str(ck), "--out", str(tmp_path / "ct"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--target vllm" in err and "--allow-mixed-fused" in err
    assert "model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj" in err
    assert not (tmp_path / "ct").exists()
    assert main(["export", str(ck), "--out", str(tmp_path / "ct"), "--allow-mixed-fused", "-q"]) == 0
    _close(_logits(_load_ct(tmp_path / "ct", adapter=True)), _logits(checkpoint.load(ck)))


def test_cli_formats_and_refusals(tiny_tokenizer, tmp_path, capsys):
    _ct()
    from lqkit.cli import main
    from transformers import AutoModelForCausalLM

    ck = _checkpoint("qwen2", tiny_tokenizer, tmp_path / "ck")
    assert main(["export", str(ck), "--out", str(tmp_path / "ct"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "schemes  " in out and "SERVE.md" in out
    assert main(["export", str(ck), "--format", "dense", "--out", str(tmp_path / "dense"), "-q"]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    lq = _logits(checkpoint.load(ck))
    torch.testing.assert_close(_logits(dense), lq, rtol=1e-4, atol=1e-4)
    assert main(["export", str(ck), "--format", "peft", "--out", str(tmp_path / "peft"), "-q"]) == 0
    assert main(["export-peft", str(ck), "--out", str(tmp_path / "peft2"), "-q"]) == 0
    assert (tmp_path / "peft2" / "base" / "config.json").is_file() and "adapter " in capsys.readouterr().out
    for args, expect in [([str(ck), "--out", str(tmp_path / "ct")], "--overwrite"),
                         ([str(ck), "--out", str(ck), "--overwrite"], "would replace the checkpoint"),
                         ([str(ck), "--out", str(tmp_path), "--overwrite"], "would replace the checkpoint"),
                         ([str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "does not exist")]:
        assert main(["export", *args, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err
    assert checkpoint.read_meta(ck)  # untouched
    nf = _checkpoint("llama", tiny_tokenizer, tmp_path / "nf",
                     lambda m, a: uniform_plan(m, MatrixSpec("quant", QuantSpec("nf", 3, 32))))
    assert main(["export", str(nf), "--out", str(tmp_path / "nfct"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nf codebooks" in err and "(+11 more)" in err
    assert main(["export", str(nf), "--format", "peft", "--out", str(tmp_path / "nfp"), "-q"]) == 2
    assert "no low-rank part" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# servable allocation: ties in the integer program


@pytest.mark.parametrize("seed", range(30))
def test_tied_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    bits = [rng.integers(1, 40, size=int(rng.integers(2, 6))) for _ in range(n)]
    err = [rng.random(len(b)) * 10 ** rng.uniform(-2, 2) for b in bits]
    labels = [rng.integers(0, 3, size=len(b)) for b in bits]
    for b in labels:  # every matrix has label 0: each tie has a label in common
        b[0] = 0
    ties = [tuple(range(0, min(3, n)))] + ([(3, 4)] if n == 5 else [])
    budget = int(rng.integers(sum(int(b.min()) for b in bits), sum(int(b.max()) for b in bits) + 1))
    best, _ = brute_force(bits, err, budget, labels, ties)
    if not np.isfinite(best):
        with pytest.raises(BudgetError):
            solve(bits, err, budget, labels=labels, ties=ties)
        return
    a = solve(bits, err, budget, labels=labels, ties=ties)
    assert a.objective == pytest.approx(best, rel=1e-6, abs=1e-12) and a.bits <= budget
    for t in ties:
        assert len({labels[m][a.choice[m]] for m in t}) == 1


def test_tie_keeps_a_label_dominated_in_one_member():
    # matrix 1's label-1 candidate is dominated there, but it is what the tie with matrix 0 needs
    bits = [np.array([10, 4]), np.array([10, 12])]
    err = [np.array([0.0, 5.0]), np.array([1.0, 1.5])]
    labels = [np.array([0, 1]), np.array([0, 1])]
    a = solve(bits, err, 16, labels=labels, ties=[(0, 1)])
    assert a.choice == (1, 1) and a.objective == pytest.approx(6.5)
    with pytest.raises(BudgetError, match="no candidate scheme in common"):
        solve(bits, err, 30, labels=[np.array([0, 0]), np.array([1, 1])], ties=[(0, 1)])


def test_target_vllm_plan_ties_fused_layers_and_exports(tiny_model_dir, tmp_path, cache):
    _ct()
    from lqkit import pipeline
    from lqkit.allocate import AllocationConfig, Budget
    from lqkit.calibrate import CalibConfig
    from lqkit.core.costs import CandidateSet
    from lqkit.export import export

    cands = CandidateSet(quantizers=("rtn", "nf"), bits=(2, 3, 4), group_sizes=(16, 32), group_dims=("in", "out"),
                         ranks=(0, 4), outliers=(0.0, 0.01), target="vllm")
    assert {s.method for s in cands.quant_specs()} == {"rtn"} and cands.to_dict()["target"] == "vllm"
    res = pipeline.compress(str(tiny_model_dir), AllocationConfig(Budget(3.5), cands), str(tmp_path / "ck"),
                            calib=CalibConfig(samples=4, seqlen=64), progress=False)
    plan = res.plan
    assert all(serving.servable(s, res.reports[n].shape, serving.TARGETS["vllm"]) for n, s in plan.items())
    ties = res.allocation["ties"]
    assert sorted(len(t) for t in ties) == [2, 2, 3, 3]  # q/k/v and gate/up of each block, found from the inputs
    for t in ties:
        assert len({serving.scheme(plan[n].quant, res.reports[n].shape[1]) for n in t}) == 1
    assert res.allocation["achieved_bits_per_param"] <= 3.5
    # the same table solved without the ties: they bind at some budgets, and cost error there
    from lqkit.allocate import CostTable, allocate, table_path

    table = CostTable.from_json(json.loads(table_path(res.allocation["table_key"]).read_text()))
    for b in (3.25, 3.5, 3.75, 4.0, 4.5):
        cfg = AllocationConfig(Budget(b), cands)
        tied, free = allocate(table, cfg, ties=ties), allocate(table, cfg)
        assert all(len({serving.scheme(tied.plan[n].quant, 64) for n in t}) == 1 for t in ties)
        assert any(len({serving.scheme(free.plan[n].quant, 64) for n in t}) > 1 for t in ties)
        assert tied.allocation.objective >= free.allocation.objective
    r = export(tmp_path / "ck", tmp_path / "ct")
    _close(_logits(_load_ct(tmp_path / "ct", adapter=r.adapter is not None)), _logits(checkpoint.load(tmp_path / "ck")))


def test_rotated_matrices_refused_by_compressed_tensors_and_exact_in_dense_and_peft(tiny_tokenizer, tmp_path):
    """compressed-tensors has no input transform: one line naming the rotated matrices and --rotate.
    The dense formats rotate back: deq(Q)·Rot in the base, R·Rot as lora_A, the checkpoint's logits."""
    from lqkit.export import _check_ct, export
    from lqkit.plan import rotated_plan

    ck = _checkpoint("llama", tiny_tokenizer, tmp_path / "ck",
                     lambda m, a: rotated_plan(m, {n: s for n, s in _plan(m, a).items() if "layers.1." in n}))
    with pytest.raises(SpecError) as e:
        _check_ct(checkpoint.read_meta(ck))
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.1.self_attn.q_proj" in msg
    assert "input rotation" in msg and "--rotate" in msg
    lq = _logits(checkpoint.load(ck))
    from transformers import AutoModelForCausalLM

    export(ck, tmp_path / "dense", "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(dense), lq, rtol=1e-3, atol=1e-3)
    peft = pytest.importorskip("peft")
    export(ck, tmp_path / "peft", "peft")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    torch.testing.assert_close(_logits(model), lq, rtol=1e-3, atol=1e-3)


def test_target_lqkit_gpu_plan_runs_on_the_fragment_kernel_in_stacks(tiny_model_dir, tmp_path, cache):
    """--target lqkit-gpu: every matrix in a format the fragment GEMV reads, and the layers that read one
    input in one kernel format (what stacking them needs), whatever the candidate set offers."""
    from lqkit import pipeline
    from lqkit.allocate import AllocationConfig, Budget
    from lqkit.calibrate import CalibConfig
    from lqkit.core.costs import CandidateSet
    from lqkit.kernels.layout import frag_ok

    cands = CandidateSet(quantizers=("rtn", "nf", "gptq", "nuq"), bits=(2, 3, 4, 8), group_sizes=(8, 16, 32),
                         group_dims=("in", "out"), ranks=(0, 4), outliers=(0.0, 0.01), target="lqkit-gpu")
    target = serving.TARGETS["lqkit-gpu"]
    specs = [s for s in cands.quant_specs() if serving.refusal(MatrixSpec("quant", s), (64, 64), target) is None]
    assert {s.method for s in specs} == {"rtn", "gptq"} and {s.bits for s in specs} == {2, 3, 4}
    assert {s.group_size for s in specs} == {16, 32} and {s.group_dim for s in specs} == {"in"}
    assert all(frag_ok(qmod.kernel_spec(s)) for s in specs)
    for g in (100, 128):  # not a multiple of 16; wider than the input (stored at its own size: no stacking)
        assert serving.refusal(MatrixSpec("quant", QuantSpec("rtn", 4, g)), (64, 64), target) is not None
    assert serving.refusal(MatrixSpec("quant", QuantSpec("rtn", 4, 64)), (64, 64), target) is None
    with pytest.raises(SpecError, match="takes no input rotation"):
        CandidateSet(target="lqkit-gpu", rotations=(False, True))
    res = pipeline.compress(str(tiny_model_dir), AllocationConfig(Budget(3.0), cands), str(tmp_path / "ck"),
                            calib=CalibConfig(samples=4, seqlen=64), progress=False)
    plan = res.plan
    assert all(frag_ok(qmod.kernel_spec(s.quant)) and not s.quant.outliers for s in plan.values())
    ties = res.allocation["ties"]
    assert sorted(len(t) for t in ties) == [2, 2, 3, 3]
    for t in ties:
        assert len({qmod.kernel_spec(plan[n].quant) for n in t}) == 1
    assert res.allocation["achieved_bits_per_param"] <= 3.0
