"""Calibration statistics: block-wise H equals a brute-force full-model hook, Fisher equals
per-sequence squared gradients, save/load identity, bad input, CLI."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from lqkit import checkpoint
from lqkit.calibrate import CalibConfig, calibrate, calibration_ids, find_blocks
from lqkit.cli import main
from lqkit.data import DEFAULT_CALIB_TEXT, read_text
from lqkit.errors import DataError
from lqkit.nn.surgery import find_linears

CFG = CalibConfig(samples=3, seqlen=48)


@pytest.fixture(scope="module")
def text():
    return read_text(None, DEFAULT_CALIB_TEXT)[0][:20_000]


def test_blockwise_h_matches_full_model_hooks(arch, tiny_tokenizer, text):
    model = tiny_model(arch)
    names = list(find_linears(model))
    st = calibrate(model, tiny_tokenizer, text, names, CFG, progress=False)
    ids = calibration_ids(tiny_tokenizer, text, CFG)
    assert ids.shape == (3, 48) and (ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    ref = {n: 0 for n in names}

    def hook(n):
        def f(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            ref[n] = ref[n] + x.T @ x
        return f

    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    assert find_blocks(model)[0] == "model.layers"
    for n in names:
        torch.testing.assert_close(st.get(n).h.double(), ref[n] / ids.numel(), rtol=1e-4, atol=1e-6)
    assert st.h_alias  # q/k/v share their input
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored


def test_fisher_is_mean_of_per_sequence_squared_gradients(tiny_tokenizer, text):
    model = tiny_model("llama")
    names = list(find_linears(model))[:3]
    st = calibrate(model, tiny_tokenizer, text, names, CalibConfig(3, 48, fisher_dtype="float32"), progress=False)
    bf = calibrate(model, tiny_tokenizer, text, names, CFG, progress=False)  # bf16 autocast: close
    ids = calibration_ids(tiny_tokenizer, text, CFG)
    ws = [model.get_submodule(n).weight for n in names]
    ref = [torch.zeros_like(w) for w in ws]
    for i in range(ids.shape[0]):
        x = ids[i:i + 1]
        loss = F.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:])
        for r, g in zip(ref, torch.autograd.grad(loss, ws)):
            r += g * g / ids.shape[0]
    for n, r in zip(names, ref):
        torch.testing.assert_close(st.fisher[n], r, rtol=1e-4, atol=1e-12)
        assert float((bf.fisher[n] - r).norm() / r.norm()) < 0.1
    assert st.meta["fisher_windows"] == 3


def test_stats_save_load_identity(tmp_path, tiny_tokenizer, text):
    model = tiny_model("gemma3")
    names = list(find_linears(model))
    st = calibrate(model, tiny_tokenizer, text, names, CFG, progress=False, model_label="tiny")
    p = checkpoint.save_stats(st, tmp_path / "s.safetensors")
    back = checkpoint.load_stats(p)
    assert back.meta == st.meta and back.count == st.count and back.h_alias == st.h_alias
    for n in names:
        a, b = st.get(n), back.get(n)
        assert torch.equal(a.h, b.h) and torch.equal(a.fisher, b.fisher)
    with pytest.raises(checkpoint.CheckpointError, match="exists"):
        checkpoint.save_stats(st, p)


def test_text_shorter_than_one_sequence(tiny_tokenizer):
    with pytest.raises(DataError, match="calibration text"):
        calibration_ids(tiny_tokenizer, "too short", CFG)


def test_cli_calibrate_then_compress_with_stats(tmp_path, tiny_model_dir, capsys):
    stats = tmp_path / "stats.safetensors"
    common = ["--calib-samples", "2", "--calib-seqlen", "32", "-q"]
    assert main(["calibrate", "--model", str(tiny_model_dir), "--out", str(stats), *common]) == 0
    assert "statistics" in capsys.readouterr().out
    for extra in (["--method", "gptq", "--act-order"], ["--method", "nuq"], ["--method", "sparse"],
                  ["--method", "lq", "--rank", "4", "--weighting", "fisher", "--group-dim", "auto"],
                  ["--method", "lorc", "--quantizer", "gptq", "--rank", "4", "--weighting", "hessian"]):
        out = tmp_path / ("ck-" + extra[1])
        assert main(["compress", "--model", str(tiny_model_dir), "--out", str(out), "--stats", str(stats),
                     "--group-size", "32", "--overwrite", *common, *extra]) == 0
        assert main(["eval", str(out), "--windows", "2", "--window-tokens", "32", "-q", "--json"]) == 0
    # statistics computed on the fly (no --stats file) and a too-short calibration text
    assert main(["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "g"), "--method", "gptq",
                 "--group-size", "32", *common]) == 0
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    code = main(["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "h"), "--method", "gptq",
                 "--calib", str(short), *common])
    assert code == 2 and "calibration text" in capsys.readouterr().err


def test_sequential_compression(tiny_tokenizer, text):
    """Block k's H comes from the compressed blocks before it: block 0 is as with fixed statistics,
    later blocks differ; data-free specs are unaffected; every layer sees its own fresh inputs."""
    from lqkit.compress import compress_model
    from lqkit.core import MatrixSpec, QuantSpec
    from lqkit.plan import uniform_plan

    ids = calibration_ids(tiny_tokenizer, text, CFG)
    base = tiny_model("llama")
    st = calibrate(base, tiny_tokenizer, text, list(find_linears(base)), CalibConfig(3, 48, fisher=False),
                   progress=False)

    def run(spec, sequential):
        m = tiny_model("llama")
        compress_model(m, uniform_plan(m, spec), progress=False, stats=st, sequential=ids if sequential else None)
        return m

    gptq = MatrixSpec("quant", QuantSpec("gptq", 2, 16))
    fixed, seq = run(gptq, False), run(gptq, True)
    w = lambda m, n: m.get_submodule(n).merged_weight()  # noqa: E731
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        torch.testing.assert_close(w(fixed, n), w(seq, n), rtol=0, atol=1e-6)
    assert not torch.allclose(w(fixed, "model.layers.1.self_attn.q_proj"), w(seq, "model.layers.1.self_attn.q_proj"))
    rtn = MatrixSpec("quant", QuantSpec("rtn", 2, 16))
    a, b = run(rtn, False), run(rtn, True)
    x = ids[:1]
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, rtol=0, atol=0)
