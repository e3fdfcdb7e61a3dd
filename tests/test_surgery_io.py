"""Surgery and checkpoint save/load on tiny random llama / gemma3 / qwen2 models."""


import pytest
import torch
from torch import nn

from conftest import tiny_model
from lqkit import checkpoint
from lqkit.compress import compress_model, size_summary
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.errors import CheckpointError, SpecError
from lqkit.nn import compressed_modules, find_linears
from lqkit.plan import plan_from_json, rotated_plan, uniform_plan

SPECS = [
    MatrixSpec("lq", QuantSpec("rtn", 3, 32), rank=4, iters=4),
    MatrixSpec("lorc", QuantSpec("nf", 2, 16, "out", True), rank=3),
    MatrixSpec("quant", QuantSpec("rtn_sym", 4, 64, "out")),
    MatrixSpec("lowrank", None, rank=5),
]


def _x(seed=0):
    return torch.randint(3, 384, (2, 17), generator=torch.Generator().manual_seed(seed))


def test_find_linears_architecture_free(arch):
    m = tiny_model(arch)
    names = list(find_linears(m))
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert not any("lm_head" in n for n in names)
    only_mlp = find_linears(m, include=[r"\.mlp\."], exclude=[r"down_proj"])
    assert len(only_mlp) == 4 and all("mlp" in n and "down" not in n for n in only_mlp)


def test_bad_pattern():
    with pytest.raises(SpecError, match="regular expression"):
        find_linears(tiny_model("llama"), include=["("])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_compressed_forward_matches_reconstruction(arch, spec):
    m = tiny_model(arch)
    plan = uniform_plan(m, spec)
    compress_model(m, plan, progress=False)
    for name, mod in compressed_modules(m).items():
        x = torch.randn(3, 5, mod.in_features)
        ref = x @ mod.merged_weight().t() + (mod.bias if mod.bias is not None else 0)
        torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-5)
        assert not hasattr(mod, "weight")  # no dense copy is kept


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: s.label())
def test_save_load_identity(arch, spec, tmp_path, tiny_tokenizer):
    m = tiny_model(arch)
    plan = uniform_plan(m, spec)
    reports = compress_model(m, plan, progress=False)
    with torch.no_grad():
        y = m(_x()).logits
    out = checkpoint.save(m, tiny_tokenizer, tmp_path / "ck", plan=plan,
                          reports={k: r.to_dict() for k, r in reports.items()},
                          summary=size_summary(m).to_dict())
    assert {"config.json", "lqkit.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    m2 = checkpoint.load(out)
    with torch.no_grad():
        y2 = m2(_x()).logits
    assert torch.equal(y, y2)  # exactly, not approximately
    assert set(compressed_modules(m2)) == set(plan)
    for name in plan:
        a, b = m.get_submodule(name), m2.get_submodule(name)
        assert torch.equal(a.qcodes, b.qcodes) if spec.quant else True
    if m.config.tie_word_embeddings:
        assert m2.get_output_embeddings().weight is m2.get_input_embeddings().weight


def test_load_builds_no_dense_copy(tmp_path, monkeypatch):
    m = tiny_model("llama")
    plan = uniform_plan(m, SPECS[0])
    compress_model(m, plan, progress=False)
    checkpoint.save(m, None, tmp_path / "ck", plan=plan)
    created = []
    orig_init = nn.Linear.__init__

    def spy(self, in_f, out_f, *a, **kw):
        orig_init(self, in_f, out_f, *a, **kw)
        created.append(self.weight.device.type)

    monkeypatch.setattr(nn.Linear, "__init__", spy)
    checkpoint.load(tmp_path / "ck")
    assert created and set(created) == {"meta"}  # linear layers only ever exist as meta skeletons


def test_tuned_launch_configs_kept_across_loads(tmp_path, monkeypatch, caplog):
    """The table of timed launch configurations: written whole by a temporary file and a rename, read
    back; an unreadable file warns and reads as empty (timed again); on the CPU load(tune=True) times
    nothing and writes nothing."""
    monkeypatch.setenv("LQKIT_CACHE", str(tmp_path / "cache"))
    assert checkpoint.read_tuned() == {}
    checkpoint.write_tuned({"b": {"kind": "frag", "pf": 4}, "a": {}})
    assert checkpoint.read_tuned() == {"a": {}, "b": {"kind": "frag", "pf": 4}}
    assert [f.name for f in checkpoint.tuned_path().parent.iterdir()] == ["tuned.json"]
    checkpoint.tuned_path().write_text("{not json")
    with caplog.at_level("WARNING"):
        assert checkpoint.read_tuned() == {}
    assert "timed again" in caplog.text
    checkpoint.tuned_path().write_text('{"format": 99, "configs": {"a": {}}}')
    assert checkpoint.read_tuned() == {}
    checkpoint.tuned_path().unlink()
    m = tiny_model("llama")
    plan = uniform_plan(m, SPECS[0])
    compress_model(m, plan, progress=False)
    checkpoint.save(m, None, tmp_path / "ck", plan=plan)
    checkpoint.load(tmp_path / "ck", tune=True)
    assert not checkpoint.tuned_path().exists()


def test_plan_roundtrip_in_checkpoint(tmp_path):
    m = tiny_model("qwen2")
    plan = uniform_plan(m, SPECS[1])
    plan[next(iter(plan))] = SPECS[0]  # mixed plan
    compress_model(m, plan, progress=False)
    checkpoint.save(m, None, tmp_path / "ck", plan=plan)
    from lqkit.plan import plan_from_json

    assert plan_from_json(checkpoint.read_meta(tmp_path / "ck")["plan"]) == plan


def _saved(tmp_path):
    m = tiny_model("llama")
    plan = uniform_plan(m, SPECS[0])
    compress_model(m, plan, progress=False)
    return checkpoint.save(m, None, tmp_path / "ck", plan=plan), m, plan


def test_existing_out_needs_overwrite(tmp_path):
    out, m, plan = _saved(tmp_path)
    before = (out / "lqkit.json").read_text()
    with pytest.raises(CheckpointError, match="--overwrite"):
        checkpoint.save(m, None, out, plan=plan)
    assert (out / "lqkit.json").read_text() == before
    checkpoint.save(m, None, out, plan=plan, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folders left behind


def test_corrupted_checkpoint_detected(tmp_path):
    out, _, _ = _saved(tmp_path)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoint.load(out)


def test_truncated_checkpoint_detected(tmp_path):
    out, _, _ = _saved(tmp_path)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="not an lqkit checkpoint"):
        checkpoint.load(tmp_path / "d")
    out, _, _ = _saved(tmp_path)
    (out / "lqkit.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoint.load(out)


def test_size_summary_counts_tied_once():
    m = tiny_model("gemma3")  # ties embeddings and lm_head
    plan = uniform_plan(m, MatrixSpec("quant", QuantSpec("rtn", 4, 32)))
    compress_model(m, plan, progress=False)
    s = size_summary(m)
    assert s.compressed_params == sum(mod.in_features * mod.out_features for mod in compressed_modules(m).values())
    assert s.effective_bits == pytest.approx(4 + 32 / 32)
    emb = m.get_input_embeddings().weight.numel()
    assert emb <= s.other_params < 2 * emb


def test_materialized_gives_identical_outputs():
    from lqkit.nn import materialized

    m = tiny_model("gemma3")
    compress_model(m, uniform_plan(m, SPECS[1]), progress=False)
    with torch.no_grad():
        y = m(_x()).logits
        with materialized(m):
            assert all(mod._dense_q is not None for mod in compressed_modules(m).values())
            y2 = m(_x()).logits
    assert torch.equal(y, y2)
    assert all(mod._dense_q is None for mod in compressed_modules(m).values())


@pytest.mark.parametrize("arch_", ["llama", "gemma3"])  # gemma3: 160-wide mlp inputs, rotated in blocks of 32
def test_rotated_plan_forward_save_load(arch_, tmp_path, tiny_tokenizer):
    """Every matrix rotated: the layers rotate their input (the forward is the dense W·x of their
    reconstruction), the checkpoint keeps the rotations in its plan (format 4) and loads to the same logits."""
    m = tiny_model(arch_)
    plan = rotated_plan(m, uniform_plan(m, SPECS[0]))
    assert len({s.rotation for s in plan.values()}) == 2 * 3  # per layer: q/k/v (o: 64 inputs too), gate/up, down
    ref = tiny_model(arch_)
    compress_model(m, plan, progress=False)
    for name, mod in compressed_modules(m).items():
        x = torch.randn(3, 5, mod.in_features)
        merged = mod.merged_weight().detach()
        torch.testing.assert_close(mod(x), x @ merged.t() + (mod.bias if mod.bias is not None else 0),
                                   rtol=1e-4, atol=1e-5)
        w = ref.get_submodule(name).weight.detach()
        assert float((merged - w).norm() / w.norm()) < 0.5  # rotated back: close to W, not to W·Rᵀ
    with torch.no_grad():
        y = m(_x()).logits
    out = checkpoint.save(m, tiny_tokenizer, tmp_path / "ck", plan=plan)
    meta = checkpoint.read_meta(out)
    assert meta["format_version"] == 4 and plan_from_json(meta["plan"]) == plan
    m2 = checkpoint.load(out)
    with torch.no_grad():
        assert torch.equal(m2(_x()).logits, y)
    assert {n: mod.spec for n, mod in compressed_modules(m2).items()} == plan


def test_unrotated_checkpoints_keep_format_3(tmp_path):
    out, _, _ = _saved(tmp_path)
    assert checkpoint.read_meta(out)["format_version"] == 3


@pytest.mark.parametrize("spec", [MatrixSpec("quant", QuantSpec("rtn", 3, 32, clip=True)),
                                  MatrixSpec("lorc", QuantSpec("rtn", 4, 16, "out"), rank=3)], ids=lambda s: s.label())
def test_integer_zero_points_same_model_smaller_checkpoint(spec, tmp_path, tiny_tokenizer):
    """A plan whose matrices store integer zero points gives the float-offset plan's logits bit for bit,
    saves fewer bytes (format 6), and loads back to the same logits and plan."""
    from dataclasses import replace

    iz = replace(spec, quant=replace(spec.quant, int_zero=True))
    models, ys, outs = [], [], []
    for s in (spec, iz):
        m = tiny_model("llama")
        plan = uniform_plan(m, s)
        compress_model(m, plan, progress=False)
        with torch.no_grad():
            ys.append(m(_x()).logits)
        outs.append(checkpoint.save(m, tiny_tokenizer, tmp_path / s.label().replace("/", "_"), plan=plan))
        models.append(m)
    assert torch.equal(ys[0], ys[1])
    a, b = (size_summary(m) for m in models)
    assert b.compressed_bits < a.compressed_bits and b.effective_bits < a.effective_bits
    assert all("q_zero" in dict(mod.named_buffers()) and "q_offset" not in dict(mod.named_buffers())
               for mod in compressed_modules(models[1]).values())
    meta = checkpoint.read_meta(outs[1])
    assert meta["format_version"] == 6 and checkpoint.read_meta(outs[0])["format_version"] == 3
    m2 = checkpoint.load(outs[1])
    with torch.no_grad():
        assert torch.equal(m2(_x()).logits, ys[1])
    assert all(mod.spec == iz for mod in compressed_modules(m2).values())
