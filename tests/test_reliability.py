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
