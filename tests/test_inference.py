"""nn.inference / nn.ops: a compressed model prepared for inference, eagerly and under torch.compile.

The CUDA kernels cannot run here, so the prepared kernel path is checked with ``kernels.bind``
replaced by a torch reference over the kernels' layout (``layout.reference_weight``): everything
else — the runners, the stacks of layers that share an input, the hand-out of their outputs, the
``lqkit::linear`` custom op, its fake implementation and the compiled graphs (fullgraph, static
cache) — is the real code. tests/test_kernels.py checks ``kernels.bind`` itself on the kernels.
"""

import pytest
import torch

from conftest import tiny_model
from lqkit import kernels
from lqkit.compress import compress_model
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.kernels import layout
from lqkit.nn import CompressedLinear, compressed_modules, inference, ops, prepare_for_inference, unprepare
from lqkit.plan import rotated_plan, uniform_plan

SPEC = MatrixSpec("lorc", QuantSpec("rtn", 4, 32), rank=4)


def _compressed(arch="llama", spec=SPEC, rotate=False):
    m = tiny_model(arch)
    plan = uniform_plan(m, spec)
    compress_model(m, rotated_plan(m, plan) if rotate else plan, progress=False)
    return m


def _ids(seed=0, t=9):
    return torch.randint(3, 384, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def reference_kernels(monkeypatch):
    """The kernel path on the CPU: kernels usable, ``kernels.bind`` as a torch reference; returns
    the list of (N, tokens) of every prepared call made."""
    calls = []

    def bind(x, kw, L=None, R=None, bias=None, config=None, rotation=None):
        w = layout.reference_weight(kw)  # (N, K) fp32, decoded once per bound call

        def f(x2, shape=None):  # as kernels.BoundLinear: x's rows, y allocated as ``shape``
            calls.append((kw.shape[0], x2.numel() // x2.shape[-1]))
            if rotation is not None:  # the input rotation inside the call (one token)
                x2 = rotation(x2.reshape(-1, x2.shape[-1]))
            y = x2 @ w.to(x2.dtype).t()
            if L is not None:
                y = y + (x2 @ R.to(x2.dtype).t()) @ L.to(x2.dtype).t()
            y = y + bias.to(x2.dtype) if bias is not None else y
            return y.view(shape) if shape is not None else y

        return f, f(x)

    monkeypatch.setattr(kernels, "bind", bind)
    monkeypatch.setattr(inference, "_kernels_usable", lambda device: True)
    return calls


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v have biases
def test_prepared_kernel_path_matches_torch(arch, reference_kernels):
    m = _compressed(arch)
    ref = _logits(m, _ids(1))
    p = prepare_for_inference(m)
    assert p.kernel_layers == 14 and len(p.stacks) == 4 and p.dense_layers == 0
    assert sorted(len(s) for s in p.stacks) == [2, 2, 3, 3]
    mods = compressed_modules(m)
    assert all(mod._runner is not None for mod in mods.values())
    assert len({id(mod._runner) for mod in mods.values()}) == 2 * 4  # q/k/v and gate/up share theirs
    reference_kernels.clear()
    torch.testing.assert_close(_logits(m, _ids(1)), ref, rtol=1e-4, atol=1e-4)
    assert len(reference_kernels) == 2 * 4  # per layer: q+k+v, o, gate+up, down
    assert all(g._pending is None for g in {mod._group for mod in mods.values()} - {None})
    # bound once per input shape and dtype: prepare bound one token, the forward (2, 9); nothing else is bound
    assert all({(s[:-1], dt) for s, dt in mod._runner.calls} == {((1,), torch.float32), ((2, 9), torch.float32)}
               for mod in mods.values())


def test_tuned_table_used_and_filled_once_per_distinct_call(reference_kernels, monkeypatch):
    """prepare_for_inference(tuned=table): each distinct (shape, format, tokens) call is timed once
    (kernels.tuned_config, faked here: timing needs a GPU) and added to the table; a table that holds
    them all times nothing; without a table nothing is timed."""
    timed = []

    def fake(x, kw, L=None, R=None, bias=None, known=None):
        key = f"{kw.shape}|{x.shape[0]}|{L is not None}"
        if known and key in known:
            return key, known[key], False
        if kw.shape[1] == 160:  # a call without candidates (here: down_proj), nothing to keep
            return key, None, False
        timed.append(key)
        return key, {"kind": "frag", "pf": 4}, True

    monkeypatch.setattr(kernels, "tuned_config", fake)
    m = _compressed()
    ref = _logits(m, _ids(1))
    table = {}
    p = prepare_for_inference(m, tuned=table)
    # per layer: the q/k/v stack, o, the gate/up stack, down; both layers alike: 4 distinct calls, of
    # which the one without candidates is neither timed nor kept
    assert p.tuned == 3 == len(timed) == len(set(timed)) and set(table) == set(timed)
    assert all(v == {"kind": "frag", "pf": 4} for v in table.values())
    torch.testing.assert_close(_logits(m, _ids(1)), ref, rtol=1e-4, atol=1e-4)
    timed.clear()
    assert prepare_for_inference(m, tuned=table).tuned == 0 and timed == []
    assert prepare_for_inference(m).tuned == 0 and timed == []


def test_bind_calls_binds_a_decoding_steps_calls_ahead(reference_kernels, monkeypatch):
    """bind_calls(model, (batch, 1)) binds every prepared layer's call for one decoding step of that
    batch (outside any CUDA graph), so that the step itself binds nothing."""
    binds = []
    bind = kernels.bind
    monkeypatch.setattr(kernels, "bind", lambda x, kw, *a, **k: binds.append(x.shape) or bind(x, kw, *a, **k))
    m = _compressed()
    prepare_for_inference(m)
    binds.clear()
    assert inference.bind_calls(m, (2, 1)) == 2 * 4 == len(binds) and {s[0] for s in binds} == {2}
    assert inference.bind_calls(m, (2, 1)) == 0
    binds.clear()
    with torch.no_grad():
        m(_ids(2, t=1))
    assert binds == []


def test_prepared_state_is_dropped_by_train_and_to(reference_kernels):
    m = _compressed()
    ref = _logits(m, _ids(1))
    prepare_for_inference(m)
    m.train()
    assert all(mod._runner is None and mod._group is None for mod in compressed_modules(m).values())
    m.eval()
    reference_kernels.clear()
    torch.testing.assert_close(_logits(m, _ids(1)), ref, rtol=1e-4, atol=1e-4)  # unprepared torch path
    assert reference_kernels == []
    prepare_for_inference(m)
    m.to(torch.float64)
    assert all(mod._runner is None for mod in compressed_modules(m).values())


def test_changed_layers_need_preparing_again(reference_kernels):
    """The prepared call checks nothing: after a change in place, unprepare (torch path) or prepare
    again to see it."""
    m = _compressed()
    prepare_for_inference(m)
    up = m.model.layers[1].mlp.up_proj
    x = torch.randn(1, 64)
    with torch.no_grad():
        up(x)
        up.L.mul_(3)
        ref = x @ up.merged_weight().t()
        unprepare(m)
        torch.testing.assert_close(up(x), ref, rtol=1e-4, atol=1e-4)
        prepare_for_inference(m)
        reference_kernels.clear()
        torch.testing.assert_close(m.model.layers[1].mlp.up_proj(x), ref, rtol=1e-4, atol=1e-4)
    assert reference_kernels == [(256 + 160, 1)]  # gate/up stacked (gate padded to 256 rows)


def test_prepare_on_cpu_keeps_dense_q():
    """The CPU default: deq(Q) dense in the compute dtype, the same outputs, dropped by train()."""
    m = _compressed()
    ref = _logits(m, _ids(1))
    p = prepare_for_inference(m)
    assert p.device == "cpu" and p.kernel_layers == 0 and p.dense_layers == 14
    mods = compressed_modules(m).values()
    assert all(mod._dense_q is not None and mod._dense_q.dtype == torch.float32 for mod in mods)
    assert torch.equal(_logits(m, _ids(1)), ref)
    assert prepare_for_inference(m, dense_cpu=False).dense_layers == 0
    prepare_for_inference(m)
    m.train()
    assert all(mod._dense_q is None for mod in mods)


def test_op_passes_opcheck():
    """lqkit::linear: schema, fake implementation and the compile paths agree (torch.library.opcheck)."""
    w = torch.randn(24, 16)
    fn = lambda x: x @ w.t()  # noqa: E731  (kept alive: the registry holds functions weakly)
    h = ops.register(fn)
    for shape in ((3, 16), (2, 5, 16)):
        torch.library.opcheck(ops.linear, (torch.randn(shape), h, 24))
    del fn
    with pytest.raises(RuntimeError, match="compile it again"):
        ops.linear(torch.randn(3, 16), h, 24)


def _compile(m):
    torch._dynamo.reset()
    return torch.compile(m, fullgraph=True, backend="aot_eager")


def test_compiled_prepared_model_is_one_graph(reference_kernels):
    """fullgraph compile of the prepared kernel path: the same logits, one op call per stack (the
    hand-out to the other members happens at trace time), for two sequence lengths."""
    m = _compressed("qwen2")
    ref = [_logits(m, _ids(i, t)) for i, t in ((1, 9), (2, 1))]
    prepare_for_inference(m)
    c = _compile(m)
    for (i, t), r in zip(((1, 9), (2, 1)), ref):
        reference_kernels.clear()
        torch.testing.assert_close(_logits(c, _ids(i, t)), r, rtol=1e-4, atol=1e-4)
        assert len(reference_kernels) == 2 * 4
    assert all(g._pending is None for g in {mod._group for mod in compressed_modules(m).values()} - {None})


def _generate(m, **kw):
    with torch.no_grad():
        return m.generate(_ids(3, 6), max_new_tokens=5, min_new_tokens=5, do_sample=False, **kw)


def _static_compiled(m):
    """transformers' recipe: a static cache, and generate() compiling the decoding step."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    cc = CompileConfig(fullgraph=True, backend="aot_eager", mode="default")
    cc._compile_all_devices = True  # compile on the CPU too (transformers' switch for testing)
    return _generate(m, cache_implementation="static", compile_config=cc)


def test_generate_static_cache_compiled_on_prepared_kernel_path(reference_kernels):
    m = _compressed()
    ref = _generate(m)  # eager, unprepared, torch path
    prepare_for_inference(m)
    assert torch.equal(_generate(m), ref)
    reference_kernels.clear()
    assert torch.equal(_static_compiled(m), ref)
    assert {t for _, t in reference_kernels} == {12, 2}  # prefill (2 x 6 tokens), then decoding steps of 2
    assert hasattr(m, "_compiled_call")


def test_generate_with_compiled_forward(reference_kernels):
    """The other common recipe: model.forward replaced by its torch.compile'd self (prefill and
    decoding steps compiled), static cache."""
    m = _compressed()
    ref = _generate(m)
    prepare_for_inference(m)
    torch._dynamo.reset()
    m.forward = torch.compile(m.forward, fullgraph=True, backend="aot_eager")
    assert torch.equal(_generate(m, cache_implementation="static"), ref)


def test_generate_static_cache_compiled_on_cpu():
    """The real CPU path (dense deq(Q), no kernels) compiles as one graph as well."""
    m = _compressed()
    ref = _generate(m)
    prepare_for_inference(m)
    assert torch.equal(_static_compiled(m), ref)


def test_unprepared_model_compiles_as_torch_path():
    m = _compressed()
    ref = _logits(m, _ids(1))
    torch.testing.assert_close(_logits(_compile(m), _ids(1)), ref, rtol=1e-4, atol=1e-4)
    for mod in compressed_modules(m).values():
        mod.backend = "triton"
    with pytest.raises(Exception, match="prepare_for_inference"):
        _logits(_compile(m), _ids(1))


def test_model_that_cannot_run_on_token_ids_is_prepared_unstacked(reference_kernels, caplog):
    m = _compressed()
    ref = _logits(m, _ids(1))
    real = m.forward
    m.forward = lambda *a, **k: (_ for _ in ()).throw(TypeError("needs pixel values"))
    with caplog.at_level("WARNING"):
        p = prepare_for_inference(m)
    assert p.kernel_layers == 14 and p.stacks == () and "needs pixel values" in caplog.text
    m.forward = real
    reference_kernels.clear()
    torch.testing.assert_close(_logits(m, _ids(1)), ref, rtol=1e-4, atol=1e-4)
    assert len(reference_kernels) == 14


def test_layers_without_kernel_format_stay_on_torch(reference_kernels):
    """Low-rank-only layers have no Q for the kernels: not prepared, torch path."""
    m = _compressed(spec=MatrixSpec("lowrank", None, rank=5))
    p = prepare_for_inference(m)
    assert p.kernel_layers == 0 and p.stacks == ()
    assert all(isinstance(mod, CompressedLinear) and mod._runner is None for mod in compressed_modules(m).values())


def test_rotated_layers_prepared_and_compiled(reference_kernels):
    """Rotated layers on the prepared kernel path (each runner rotates its input, a stack once for all
    its members), eagerly and compiled as one graph (the rotation inside the opaque op)."""
    m = _compressed("qwen2", rotate=True)
    ref = _logits(m, _ids(1))
    p = prepare_for_inference(m)
    assert p.kernel_layers == 14 and len(p.stacks) == 4
    runners = {id(mod._runner): mod._runner for mod in compressed_modules(m).values()}.values()
    assert all(r.rotate is not None for r in runners)
    reference_kernels.clear()
    torch.testing.assert_close(_logits(m, _ids(1)), ref, rtol=1e-4, atol=1e-4)
    assert len(reference_kernels) == 2 * 4
    reference_kernels.clear()
    torch.testing.assert_close(_logits(_compile(m), _ids(1)), ref, rtol=1e-4, atol=1e-4)
    assert len(reference_kernels) == 2 * 4


def test_rotated_torch_path_compiles_and_trains():
    """Unprepared, a rotated layer's torch path compiles as one graph through ``lqkit::rotate`` (whose
    backward is the inverse rotation: L and R of a rotated layer fine-tune)."""
    from lqkit.core.rotation import Rotation

    x = torch.randn(3, 160, dtype=torch.float64, requires_grad=True)
    for inverse in (False, True):
        torch.library.opcheck(ops._rotate, (x, 7, 32, inverse))
    torch.testing.assert_close(ops.rotate(x, Rotation(7, 32)), ops._rotate(x, 7, 32, False))
    m = _compressed(rotate=True)
    ref = _logits(m, _ids(1))
    torch.testing.assert_close(_logits(_compile(m), _ids(1)), ref, rtol=1e-4, atol=1e-4)
    up = m.model.layers[0].mlp.up_proj
    loss = m(_ids(1)).logits.square().mean()
    loss.backward()
    assert up.R.grad is not None and torch.isfinite(up.R.grad).all()
