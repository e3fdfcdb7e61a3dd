"""nn.fuse: layers that share an input run as one stacked kernel call. On the CPU the kernel call is
replaced by a torch reference over the stacked layout (``layout.reference_weight``), which checks the
stacking, the factors' block structure and the hand-out logic; tests/test_kernels.py runs the real
kernels on stacked weights (GPU, or triton's CPU interpreter)."""

from dataclasses import replace

import pytest
import torch

from conftest import tiny_model
from lqkit import kernels
from lqkit.compress import compress_model
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.core.stats import MatrixStats
from lqkit.kernels import layout
from lqkit.nn import CompressedLinear, find_shared_inputs, fuse_shared_inputs, unfuse
from lqkit.plan import rotated_plan, uniform_plan

SPEC = MatrixSpec("lq", QuantSpec("rtn", 4, 32), rank=4, iters=2)


def _x(seed=0):
    return torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(seed))


def _compressed(arch, plan_edit=None):
    m = tiny_model(arch)
    plan = dict(uniform_plan(m, SPEC))
    if plan_edit:
        plan = plan_edit(plan)
    compress_model(m, plan, progress=False, stats=_stats(m, plan) if plan_edit else None)
    return m


def _stats(model, plan):
    """Synthetic calibration statistics (random H and Fisher) for every planned matrix."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in plan:
        w = model.get_submodule(name).weight
        a = torch.randn(w.shape[1], w.shape[1], generator=g)
        out[name] = MatrixStats(h=a @ a.t() / w.shape[1] + torch.eye(w.shape[1]),
                                fisher=torch.rand(w.shape, generator=g) + 0.1)
    return out


def _layer_sets(names):
    return sorted(tuple(n.rsplit(".", 1)[-1] for n in g) for g in names)


def test_find_shared_inputs_groups_siblings(arch):
    """q/k/v and gate/up of every layer (o and down read their own inputs), found by running the model."""
    m = _compressed(arch)
    groups = find_shared_inputs(m, _x())
    assert len(groups) == 4  # two layers × (q, k, v) and (gate, up)
    assert _layer_sets(groups) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    assert all(len({g.split(".")[2] for g in grp}) == 1 for grp in groups)  # within one layer


def test_find_shared_inputs_splits_by_format():
    """Only layers of one format stack: a 3-bit v_proj leaves q + k."""
    def edit(plan):
        for n in plan:
            if n.endswith("v_proj"):
                plan[n] = MatrixSpec("lq", QuantSpec("rtn", 3, 32), rank=4, iters=2)
        return plan

    groups = find_shared_inputs(_compressed("llama", edit), _x())
    assert _layer_sets(groups) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj")] * 2


def _codebooks_and_outliers(plan):
    """q/v: nuq codebooks; k: rtn with exactly kept outliers; gate: nuq with outlier features."""
    for n in plan:
        if n.endswith(("q_proj", "v_proj")):
            plan[n] = MatrixSpec("lorc", QuantSpec("nuq", 3), rank=4)
        elif n.endswith("k_proj"):
            plan[n] = MatrixSpec("lorc", QuantSpec("rtn", 4, 32, outliers=0.02), rank=4)
        elif n.endswith("gate_proj"):
            plan[n] = MatrixSpec("lorc", QuantSpec("nuq", 4, outlier_features=0.05), rank=4)
    return plan


def test_outlier_layers_are_not_stacked():
    """A layer with exactly kept outliers adds its own sparse pass: its siblings stack without it."""
    groups = find_shared_inputs(_compressed("llama", _codebooks_and_outliers), _x())
    assert _layer_sets(groups) == [("q_proj", "v_proj")] * 2


def _reference_kernels(monkeypatch):
    """The kernel path on the CPU: kernels.linear as torch over the (stacked) layout; counts calls."""
    calls = []

    def linear(x, kw, L=None, R=None, bias=None, config=None, out=None, rotation=None):
        calls.append(kw.shape)
        if rotation is not None:
            x = rotation(x)
        y = x @ layout.reference_weight(kw).to(x.dtype).t()
        if L is not None:
            y = y + (x @ R.to(x.dtype).t()) @ L.to(x.dtype).t()
        return y + bias.to(x.dtype) if bias is not None else y

    monkeypatch.setattr(kernels, "linear", linear)
    monkeypatch.setattr(CompressedLinear, "resolve_backend", lambda self, x: "triton")
    return calls


@pytest.mark.parametrize("arch_", ["llama", "qwen2"])  # qwen2: q/k/v have biases
def test_fused_model_matches_unfused(arch_, monkeypatch):
    m = _compressed(arch_)
    with torch.no_grad():
        ref = m(_x(1)).logits  # torch path
    groups = fuse_shared_inputs(m, _x())
    calls = _reference_kernels(monkeypatch)
    with torch.no_grad():
        y = m(_x(1)).logits
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * 4  # per layer: q+k+v, o, gate+up, down (7 launches unfused)
    assert sorted({c for c in calls if c[0] > 64}) == [(128 + 128 + 32, 64), (256 + 160, 64)]  # members padded to 128 rows
    assert all(g.launches == 1 and g._pending is None for g in groups)  # every output handed out
    assert unfuse(m) == 2 * 5
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(m(_x(1)).logits, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * 7


def test_codebook_and_outlier_layers_take_the_kernel_path(monkeypatch):
    """nuq codebooks and exactly kept outliers reach the kernels' layout from a compressed model (the
    module's stored buffers, prepared once) and give the torch path's outputs, fused or not."""
    m = _compressed("llama", _codebooks_and_outliers)
    assert {kernels.path_for(mod.spec.quant) for mod in m.modules() if isinstance(mod, CompressedLinear)} == \
        {"triton/frag", "triton/interleaved"}
    with torch.no_grad():
        ref = m(_x(1)).logits
    calls = _reference_kernels(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(m(_x(1)).logits, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * 7
    fixes = [mod.kernel_weight().fix for mod in m.modules() if isinstance(mod, CompressedLinear)]
    assert sum(f is not None for f in fixes) == 2 * 2  # k_proj and gate_proj of both layers
    fuse_shared_inputs(m, _x())
    with torch.no_grad():
        torch.testing.assert_close(m(_x(1)).logits, ref, rtol=1e-4, atol=1e-4)


def test_group_recomputes_for_another_or_changed_input(monkeypatch):
    m = _compressed("llama")
    fuse_shared_inputs(m, _x())
    _reference_kernels(monkeypatch)
    attn = m.model.layers[0].self_attn
    g = attn.q_proj.__dict__["_shared_input"]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        q = attn.q_proj(x)
        x2 = torch.randn(2, 3, 64)
        k2 = attn.k_proj(x2)  # another input: computed for it
        assert g.launches == 2
        x2.mul_(2)  # changed in place: not the tensor the pending outputs were computed for
        v2 = attn.v_proj(x2)
        assert g.launches == 3
        k3 = attn.k_proj(x2)  # same tensor, same version: handed out
        assert g.launches == 3
    for mod, inp, y in ((attn.q_proj, x, q), (attn.k_proj, x2 / 2, k2), (attn.v_proj, x2, v2), (attn.k_proj, x2, k3)):
        ref = inp @ mod.merged_weight().t()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_group_rebuilds_stack_when_a_member_changes(monkeypatch):
    """Fine-tuned factors (or reloaded codes) change the members' tensors: the stack follows."""
    m = _compressed("llama")
    fuse_shared_inputs(m, _x())
    _reference_kernels(monkeypatch)
    mlp = m.model.layers[1].mlp
    x = torch.randn(1, 64)
    with torch.no_grad():
        mlp.gate_proj(x), mlp.up_proj(x)
        mlp.up_proj.L.mul_(3)
        up = (mlp.gate_proj(x), mlp.up_proj(x))[1]
    torch.testing.assert_close(up, x @ mlp.up_proj.merged_weight().t(), rtol=1e-4, atol=1e-4)


def test_stack_refuses_mixed_formats_and_builds_block_factors():
    torch.manual_seed(0)
    from lqkit.core import quant as qmod

    def prep(spec, shape):
        q = qmod.quantize(torch.randn(shape), spec)
        return kernels.prepare(q.packed, q.aux, spec, shape, "cpu")

    a, b = prep(QuantSpec("rtn", 4, 32), (40, 96)), prep(QuantSpec("rtn", 3, 32), (24, 96))
    assert "formats differ" in kernels.stackable([a, b])
    with pytest.raises(ValueError, match="cannot stack"):
        kernels.stack([a, b])
    c = prep(QuantSpec("rtn", 4, 32, "out"), (64, 96))
    assert "'out'" in kernels.stackable([c, c])  # interleaved layout, groups along out
    s, offs = kernels.stack([a, a])
    assert offs == (0, 128) and s.shape == (168, 96)
    ref = layout.reference_weight(a)
    torch.testing.assert_close(layout.reference_weight(s), torch.cat([ref, torch.zeros(88, 96), ref]))
    L1, R1 = torch.randn(40, 3), torch.randn(3, 96)
    L, R, bias = kernels.stack_factors([L1, None], [R1, None], [None, torch.ones(40)], (40, 40), offs, 168)
    assert L.shape == (168, 3) and R.shape == (3, 96) and torch.equal(L[:40], L1) and not L[40:].any()
    assert not bias[:128].any() and bias[128:].eq(1).all()


@pytest.mark.cuda
def test_fused_model_on_gpu_matches_unfused():
    """The real kernels (CUDA): a fused bf16 model gives the unfused kernel path's logits, in half the
    launches for q/k/v and gate/up."""
    if not kernels.available():
        pytest.skip("needs CUDA and triton")
    m = _compressed("qwen2").to("cuda", torch.bfloat16)
    x = _x(1).cuda()
    with torch.no_grad():
        ref = m(x).logits.float()
        groups = fuse_shared_inputs(m, _x().cuda())
        y = m(x).logits.float()
        y1 = m(x[:, :1]).logits.float()  # one token: the decode case
        ref1 = (unfuse(m), m(x[:, :1]).logits.float())[1]
    assert len(groups) == 4 and all(g.launches == 2 for g in groups)
    for a, b in ((y, ref), (y1, ref1)):
        assert torch.isfinite(a).all()
        assert float((a - b).norm() / b.norm()) <= 1e-2


def test_rotated_layers_stack_when_they_share_their_rotation(monkeypatch):
    """Siblings with one rotation (q/k/v, gate/up: rotated_plan's seeds) stack and the stack rotates the
    shared input once; an unrotated v_proj leaves q + k."""
    m = tiny_model("llama")
    plan = rotated_plan(m, uniform_plan(m, SPEC))
    compress_model(m, plan, progress=False)
    with torch.no_grad():
        ref = m(_x(1)).logits  # torch path
    groups = fuse_shared_inputs(m, _x())
    assert len(groups) == 4 and all(g.rotation is not None for g in groups)
    calls = _reference_kernels(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(m(_x(1)).logits, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * 4
    unfuse(m)
    for n, mod in m.named_modules():
        if n.endswith("v_proj"):
            mod.spec = replace(mod.spec, rotation=None)  # the key only: stacking is decided by the specs
    assert _layer_sets(find_shared_inputs(m, _x())) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj")] * 2
