"""What must never happen, whatever the input: data loss, code from a model folder running."""

from __future__ import annotations

import json
import shutil

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


def _rewrite_meta(ck, edit, digest: bool = True) -> None:
    """Edit lqkit.json as someone who knows the format would: its own checksum brought up to date."""
    meta = json.loads((ck / checkpoint.META_FILE).read_text())
    edit(meta)
    if digest:
        meta["meta_sha256"] = checkpoint._meta_digest(meta)
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

    case(lambda: _rewrite_meta(ck, lambda m: m.update(created="x"), digest=False), "its checksum does not match")
    case(lambda: _rewrite_meta(ck, lambda m: m.update(files={})), "lists no tensor files")
    case(lambda: _rewrite_meta(ck, lambda m: m["files"].update({"../good/model.safetensors": {}})), "outside the")
    case(lambda: (ck / "model-extra.safetensors").write_bytes(b"x"), "not listed")
    case(lambda: (ck / "config.json").write_text((ck / "config.json").read_text().replace("silu", "gelu")),
         "config.json is truncated|config.json is corrupted")
    case(lambda: _rewrite_meta(ck, lambda m: m["files"].pop("config.json")), "config.json is not listed")

    def bad_config():
        (ck / "config.json").write_text("{not json")
        digest = hashlib.sha256(b"{not json").hexdigest()
        _rewrite_meta(ck, lambda m: m["files"]["config.json"].update(sha256=digest, bytes=9))

    case(bad_config, "cannot build the model of checkpoint")

    def int16_scales():
        f = ck / checkpoint.TENSOR_FILE
        state = load_file(str(f))
        key = next(k for k in state if k.endswith("q_scale"))
        state[key] = state[key].view(__import__("torch").int16)
        save_file(state, str(f))
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        _rewrite_meta(ck, lambda m: m["files"][checkpoint.TENSOR_FILE].update(sha256=digest, bytes=f.stat().st_size))

    case(int16_scales, "but the plan stores")


def _mutations(meta: dict, rng) -> list:
    """(path, value) edits of lqkit.json: every key of the JSON tree deleted or set to a value of
    another type or an out-of-range one."""
    import random as _random  # noqa: F401

    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + [k])
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                paths.append(path + [i])
                walk(v, path + [i])

    walk(meta, [])
    values = [None, 0, -1, 1, 3, 2**40, 1e308, "", "x", "../x", [], {}, True, [1, 2], {"a": 1}]
    return [(p, values[rng.randrange(len(values))]) for p in paths]


def _apply(meta: dict, path: list, value) -> dict:
    import copy

    meta = copy.deepcopy(meta)
    node = meta
    for k in path[:-1]:
        node = node[k]
    if value is None and isinstance(node, dict) and len(path) % 2:  # some deletions, some nulls
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return meta


def test_loader_fuzz_never_loads_a_different_model(tmp_path, tiny_tokenizer):
    """Random byte flips and truncations of every file of a tiny checkpoint, JSON edits of every key
    of lqkit.json, and tensor edits with the checksums updated: each case ends in one-line
    CheckpointError-style error (an LqkitError) or loads a model identical to the original."""
    import hashlib
    import random
    import shutil
    import time

    import torch
    from safetensors.torch import load_file, save_file

    from lqkit.errors import LqkitError

    ck = _tiny_checkpoint(tmp_path, tiny_tokenizer)
    ref = {k: v.clone() for k, v in checkpoint.load(ck, prepare=False).state_dict().items()}
    good = tmp_path / "good"
    shutil.copytree(ck, good)
    meta0 = json.loads((good / checkpoint.META_FILE).read_text())
    rng = random.Random(0)
    outcomes = {"error": 0, "identical": 0}
    t0 = time.time()

    def check(label):
        try:
            model = checkpoint.load(ck, prepare=False)
        except LqkitError as e:
            assert "\n" not in str(e), (label, str(e))
            outcomes["error"] += 1
            return
        except Exception as e:  # noqa: BLE001 — anything else is a failure of the loader's checks
            raise AssertionError(f"{label}: {type(e).__name__}: {e}") from None
        state = model.state_dict()
        assert state.keys() == ref.keys(), label
        for k, v in ref.items():
            assert state[k].dtype == v.dtype and torch.equal(state[k], v), (label, k)
        outcomes["identical"] += 1

    def fresh():
        shutil.rmtree(ck)
        shutil.copytree(good, ck)

    files = sorted(p.name for p in good.iterdir())
    for i in range(120):  # byte flips and truncations of any file
        fresh()
        f = ck / rng.choice(files)
        data = bytearray(f.read_bytes())
        if i % 2 and data:
            j = rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
        else:
            data = data[:rng.randrange(len(data) + 1)]
        f.write_bytes(bytes(data))
        check(f"{f.name} damaged ({i})")
    muts = _mutations(meta0, rng)
    for i, (path, value) in enumerate(rng.sample(muts, min(len(muts), 200))):  # JSON edits
        fresh()
        meta = _apply(meta0, path, value)
        if i % 2 and isinstance(meta, dict):  # a deliberate edit: lqkit.json's own checksum brought up to date
            meta["meta_sha256"] = checkpoint._meta_digest(meta)
        (ck / checkpoint.META_FILE).write_text(json.dumps(meta))
        check(f"lqkit.json {path} = {value!r}" + (" (checksum updated)" if i % 2 else ""))

    def rewrite(edit):  # a tensor edit, with the checksum brought up to date
        f = ck / checkpoint.TENSOR_FILE
        state = load_file(str(f))
        edit(state)
        save_file(state, str(f))
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        meta = json.loads((ck / checkpoint.META_FILE).read_text())
        meta["files"][checkpoint.TENSOR_FILE].update(sha256=digest, bytes=f.stat().st_size)
        meta["meta_sha256"] = checkpoint._meta_digest(meta)
        (ck / checkpoint.META_FILE).write_text(json.dumps(meta))

    keys = sorted(load_file(str(good / checkpoint.TENSOR_FILE)))
    edits = {
        "dropped": lambda s, k: s.pop(k),
        "renamed": lambda s, k: s.update({k + "x": s.pop(k)}),
        "reshaped": lambda s, k: s.update({k: s[k].reshape(-1)[:-1] if s[k].numel() > 1 else s[k].reshape(1, 1)}),
        "retyped": lambda s, k: s.update({k: s[k].to(torch.float64 if s[k].is_floating_point() else torch.int32)}),
        "extra": lambda s, k: s.update({"model.extra.weight": torch.zeros(2)}),
    }
    for name, edit in edits.items():
        for k in rng.sample(keys, 8):
            fresh()
            rewrite(lambda s, k=k, edit=edit: edit(s, k))
            check(f"tensor {k} {name}, checksum updated")
    assert outcomes["error"] > 250, outcomes
    assert time.time() - t0 < 60, f"fuzz took {time.time() - t0:.0f} s"


# ----------------------------------------------------------------------------------------------
# output folders: one run at a time, atomic swaps, no leftovers, the user's umask


def test_a_second_run_to_the_same_out_stops_at_once(tmp_path):
    import subprocess
    import sys

    from lqkit import outdir

    out = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lqkit import outdir; "
                               f"outdir.check_out_dir({str(out)!r}, False); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match="another lqkit run is writing"):
            outdir.check_out_dir(out, False)
    finally:
        holder.kill()
        holder.wait()
    outdir.check_out_dir(out, False)  # a killed holder's lock is free again
    outdir.release(out)
    assert not list(tmp_path.iterdir())  # no lock file left


def test_overwrite_swaps_atomically_and_leftovers_are_removed(tmp_path, monkeypatch):
    from lqkit import outdir

    out = tmp_path / "ck"
    out.mkdir()
    (out / "old").write_text("old")
    (tmp_path / ".ck.tmp-killed").mkdir()  # what a save killed with -9 leaves
    (tmp_path / ".ck.old-killed").mkdir()
    outdir.check_out_dir(out, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.lock", "ck"]
    for fallback in (False, True):
        if fallback:  # where renameat2 is missing: two renames
            monkeypatch.setattr(outdir, "_renameat2", lambda: None)
        new = outdir.make_temp_dir(out)
        (new / "new").write_text(str(fallback))
        seen = []
        real = shutil.rmtree

        def rmtree(p, *a, **k):
            seen.append(sorted(x.name for x in out.iterdir()))  # --out while the old copy is removed
            real(p, *a, **k)

        monkeypatch.setattr(outdir.shutil, "rmtree", rmtree)
        outdir.swap_in(new, out, overwrite=True)
        monkeypatch.setattr(outdir.shutil, "rmtree", real)
        assert seen == [["new"]] and (out / "new").read_text() == str(fallback)
    blocked = outdir.make_temp_dir(out)
    with pytest.raises(CheckpointError, match="appeared while this run was working"):
        outdir.swap_in(blocked, out, overwrite=False)
    outdir.release(out)


def test_outputs_take_the_users_umask(tmp_path, tiny_tokenizer):
    import os
    import stat

    old = os.umask(0o022)
    try:
        ck = _tiny_checkpoint(tmp_path, tiny_tokenizer)
        checkpoint.write_atomic(tmp_path / "x.json", b"{}")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [ck, *ck.iterdir(), tmp_path / "x.json"]}
    assert modes.pop("ck") == 0o755 and set(modes.values()) == {0o644}, modes


def test_unwritable_or_bad_out_is_refused_before_any_work(tmp_path, monkeypatch):
    from lqkit import outdir

    monkeypatch.chdir(tmp_path)
    for bad, match in ((".", "current folder"), (str(tmp_path.parent), "current folder"),
                       ("/proc/lqkit-x", "cannot write to")):
        with pytest.raises(CheckpointError, match=match):
            outdir.check_out_dir(bad, True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        outdir.check_out_dir(tmp_path / "f", True)
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(CheckpointError, match="GiB free"):
        outdir.check_free_space(tmp_path / "ck", 1 << 30)


def test_a_failed_write_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys, cache):
    import errno

    from lqkit import cli

    def full(self, key, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint._ShardFile, "add", full)
    out = tmp_path / "out" / "ck"
    rc = cli.main(["compress", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                   "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# early checks, one-line errors, and the rest of the list


def test_flags_are_checked_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import torch

    from lqkit import cli, stream

    monkeypatch.setattr(stream, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "-q"]
    for extra, match in ((["--method", "rtn", "--include", "attn("], "not a valid regular expression"),
                         (["--method", "rtn", "--device", "bogus"], "is not a device"),
                         (["--method", "rtn", "--device", "cuda"], "no CUDA device"),
                         (["--budget", "100"], "above 16 bits/param")):
        with pytest.raises(SystemExit) as e:
            rc = cli.main(base + extra)
            raise SystemExit(rc)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and match in err[0], (extra, err)


def test_an_unreachable_budget_is_refused_before_calibration(tiny_model_dir, tmp_path, monkeypatch, cache):
    from lqkit import blockwise, pipeline
    from lqkit.allocate import AllocationConfig, Budget
    from lqkit.core.allocate import BudgetError

    monkeypatch.setattr(blockwise, "statistics_sweep", lambda *a, **k: pytest.fail("calibration ran"), raising=False)
    monkeypatch.setattr(pipeline, "_statistics_and_costs", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises(BudgetError, match="smallest size these candidates can reach"):
        pipeline.compress(str(tiny_model_dir), AllocationConfig(Budget(bytes=1000)), str(tmp_path / "o"),
                          progress=False)


def test_damaged_caches_are_computed_again(tmp_path):
    import torch

    from lqkit.blockwise import RunStore
    from lqkit.core.stats import MatrixStats

    store = RunStore(tmp_path)
    store.save(0, {"a": MatrixStats(h=torch.eye(4))}, None)
    assert store.done(0, costs=False)
    f = store._stats(0)
    f.write_bytes(f.read_bytes()[:-5])
    assert not store.done(0, costs=False) and not f.exists()  # removed: the block is computed again


def test_json_output_is_strict(capsys):
    from lqkit.cli import _json

    out = json.loads(_json({"perplexity": float("inf"), "nll": float("nan"), "rows": [1.5, float("-inf")]}))
    assert out == {"perplexity": None, "nll": None, "rows": [1.5, None]}


def test_hub_id_without_network_is_one_line_at_once(monkeypatch):
    import time

    from lqkit import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    t = time.time()
    with pytest.raises(ModelLoadError, match="cannot be reached") as e:
        models.resolve("some-org/some-model")
    assert len(str(e.value).splitlines()) == 1 and time.time() - t < 10


def test_lqkit_load(tmp_path, tiny_tokenizer):
    import torch

    import lqkit

    ck = _tiny_checkpoint(tmp_path, tiny_tokenizer)
    a, b = lqkit.load(ck, prepare=False), checkpoint.load(ck, prepare=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
