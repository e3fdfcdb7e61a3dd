"""What must never happen, whatever the input: data loss, code from a model folder running."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from lqkit import checkpoint
from lqkit.errors import CheckpointError, ModelLoadError
from lqkit.finetune import FinetuneConfig, finetune
from lqkit.models import load_model
from lqkit.stream import open_model

from test_finetune import ckpt, text_file  # noqa: F401  (fixtures)

CFG = FinetuneConfig(steps=1, seq_len=32, batch_size=2)


def test_finetune_overwrite_never_deletes_the_source_or_other_files(ckpt, text_file, tmp_path):  # noqa: F811
    """--out equal to the checkpoint, a folder holding it, or a folder of other files: one clear
    error, nothing deleted. An earlier run's folder is replaced."""
    parent = ckpt.parent
    (parent / "notes.txt").write_text("mine")
    before = sorted(p.name for p in ckpt.iterdir())
    for out in (ckpt, parent):
        with pytest.raises(CheckpointError, match="would replace the checkpoint being fine-tuned"):
            finetune(ckpt, text_file, out, CFG, overwrite=True, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a fine-tuning run folder"):
        finetune(ckpt, text_file, other, CFG, overwrite=True, progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == before and (parent / "notes.txt").read_text() == "mine"
    assert (other / "data.bin").exists()
    run = tmp_path / "run"
    finetune(ckpt, text_file, run, CFG, progress=False)
    finetune(ckpt, text_file, run, CFG, overwrite=True, progress=False)  # an earlier run: replaced
    assert (run / "finetune.json").is_file()


def test_no_code_from_a_model_folder_runs(tmp_path, tiny_tokenizer):
    """A config that asks for custom code (auto_map, unknown model_type) is refused with one line,
    whichever way the folder is loaded; the folder's Python file never runs."""
    d = tmp_path / "evil"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    marker = tmp_path / "ran"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig as EvilConfig\n"
                               "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil-arch", auto_map={"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    for load in (lambda: load_model(str(d)), lambda: open_model(str(d))):
        with pytest.raises(ModelLoadError) as e:
            load()
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(Exception):
        checkpoint.load(d)  # not a checkpoint: refused before any config is read
    assert not marker.exists()


def _tiny_checkpoint(tmp_path, tok):
    from lqkit.compress import compress_model
    from lqkit.core import MatrixSpec, QuantSpec
    from lqkit.plan import uniform_plan

    m = tiny_model("llama")
    plan = uniform_plan(m, MatrixSpec("quant", QuantSpec("rtn", 4, 32)))
    compress_model(m, plan, progress=False)
    return checkpoint.save(m, tok, tmp_path / "ck", plan=plan)


def _rewrite_meta(ck, edit) -> None:
    meta = json.loads((ck / checkpoint.META_FILE).read_text())
    edit(meta)
    (ck / checkpoint.META_FILE).write_text(json.dumps(meta))


def test_checksums_cannot_be_bypassed(tmp_path, tiny_tokenizer):
    """Every tensor file in the folder must be listed and match; names stay inside the folder;
    config.json is checksummed; a tensor rewritten in another dtype (checksum updated) is refused."""
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file

    ck = _tiny_checkpoint(tmp_path, tiny_tokenizer)
    checkpoint.load(ck, prepare=False)
    good = tmp_path / "good"
    shutil.copytree(ck, good)

    def case(edit, match):
        shutil.rmtree(ck)
        shutil.copytree(good, ck)
        edit()
        with pytest.raises(CheckpointError, match=match):
            checkpoint.load(ck, prepare=False)

    case(lambda: _rewrite_meta(ck, lambda m: m.update(files={})), "lists no tensor files")
    case(lambda: _rewrite_meta(ck, lambda m: m["files"].update({"../good/model.safetensors": {}})), "outside the")
    case(lambda: (ck / "model-extra.safetensors").write_bytes(b"x"), "not listed")
    case(lambda: (ck / "config.json").write_text((ck / "config.json").read_text().replace("silu", "gelu")),
         "config.json is truncated|config.json is corrupted")
    case(lambda: _rewrite_meta(ck, lambda m: m["files"].pop("config.json")), "config.json is not listed")

    def int16_scales():
        f = ck / checkpoint.TENSOR_FILE
        state = load_file(str(f))
        key = next(k for k in state if k.endswith("q_scale"))
        state[key] = state[key].view(__import__("torch").int16)
        save_file(state, str(f))
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        _rewrite_meta(ck, lambda m: m["files"][checkpoint.TENSOR_FILE].update(sha256=digest, bytes=f.stat().st_size))

    case(int16_scales, "but the plan stores")
