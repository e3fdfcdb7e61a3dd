"""Streamed compression (lqkit.stream, lqkit.blockwise): one block at a time from the folder's
safetensors files, statistics equal to the whole-model ones, per-block caches that resume, sharded
checkpoints in the source dtype, data-free runs that never calibrate."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from lqkit import blockwise, checkpoint, pipeline
from lqkit.allocate import AllocationConfig, Budget
from lqkit.calibrate import CalibConfig, calibrate, calibration_ids
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.core.costs import CandidateSet
from lqkit.data import DEFAULT_CALIB_TEXT, read_text
from lqkit.models import LoadedModel
from lqkit.nn.surgery import compressed_modules, find_linears
from lqkit.stream import FileSource, MemorySource, open_model

CANDS = CandidateSet(quantizers=("rtn", "gptq", "nf", "nuq"), bits=(2, 3, 4), group_sizes=(32,), ranks=(0, 4),
                     outliers=(0.0, 0.01))
CALIB = CalibConfig(samples=4, seqlen=48)


def _folder(tmp_path, tok, arch="llama", dtype=torch.float32, shard=None):
    d = tmp_path / f"{arch}-{str(dtype)[6:]}"
    model = tiny_model(arch).to(dtype)
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(d)
    return d, model


def test_file_source_reads_one_block_at_a_time(tmp_path, tiny_tokenizer):
    d, ref = _folder(tmp_path, tiny_tokenizer, shard="40KB")
    assert len(list(d.glob("*.safetensors"))) > 2  # sharded, with an index
    src = open_model(str(d))
    assert isinstance(src, FileSource) and src.streamed
    on = lambda: {n for n, p in src.model.named_parameters() if p.device.type != "meta"}  # noqa: E731
    assert not on()
    src.load_rest()
    rest = on()
    assert rest and not any(n.startswith(f"{src.prefix}.") for n in rest)
    block = src.load_block(1)
    assert on() - rest == {f"{src.prefix}.1.{n}" for n, _ in block.named_parameters()}
    for n, p in block.named_parameters():
        assert torch.equal(p, ref.get_parameter(f"{src.prefix}.1.{n}"))
    src.release_block(1)
    assert on() == rest


def test_streamed_statistics_equal_whole_model_calibration(arch, tiny_tokenizer, tmp_path, monkeypatch):
    """H from the forward sweep and the per-window Fisher from the streamed backward (block inputs
    kept — on disk for gemma3 here —, blocks recomputed in reverse) equal lqkit.calibrate's, which
    runs the whole model; under bf16 autocast H stays exact (an fp32 forward) and F close."""
    if arch == "gemma3":
        monkeypatch.setattr(blockwise, "ACTIVATIONS_IN_MEMORY", 0)
    model = tiny_model(arch)
    names = list(find_linears(model))
    text, _ = read_text(None, DEFAULT_CALIB_TEXT)
    cfg = CalibConfig(5, 48, fisher_dtype="float32")
    ref = calibrate(model, tiny_tokenizer, text, names, cfg, progress=False)
    src = MemorySource(LoadedModel(model, tiny_tokenizer, "tiny", "tiny"), torch.device("cpu"))
    by_block, outside = blockwise.block_linears(src, names)
    assert not outside
    got = {}
    sweep = blockwise.Sweep(chunk=2, tail_chunk=3, progress=False)  # batches that do not divide 5 windows
    info = blockwise.statistics(src, calibration_ids(tiny_tokenizer, text, cfg), by_block, True, list(by_block),
                                lambda k, st: got.update(st), sweep, tmp_path)
    assert info["windows"] == 5 and set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n].h, ref.get(n).h, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[n].fisher, ref.get(n).fisher, rtol=1e-4, atol=1e-12)
    assert not (tmp_path / "activations").exists()  # the kept inputs are gone
    bf = {}
    blockwise.statistics(src, calibration_ids(tiny_tokenizer, text, cfg), by_block, True, list(by_block),
                         lambda k, st: bf.update(st), sweep, tmp_path, autocast="bfloat16")
    for n in names:
        torch.testing.assert_close(bf[n].h, got[n].h, rtol=1e-5, atol=1e-7)
        assert float((bf[n].fisher - got[n].fisher).norm() / got[n].fisher.norm()) < 0.05


def test_data_free_methods_never_calibrate(tiny_model_dir, tmp_path, cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(blockwise, "first_inputs", boom)
    monkeypatch.setattr(blockwise, "statistics", boom)
    for i, spec in enumerate([MatrixSpec("quant", QuantSpec("rtn", 4, 32)), MatrixSpec("quant", QuantSpec("nf", 3, 32)),
                              MatrixSpec("lq", QuantSpec("rtn", 3, 32), rank=4, iters=2)]):
        res = pipeline.compress(str(tiny_model_dir), spec, str(tmp_path / f"o{i}"), progress=False, calib=CALIB)
        assert "calibrate" not in res.stage_seconds
    assert not (cache / "runs").exists()


def test_checkpoint_keeps_the_source_dtype_in_shards(tmp_path, tiny_tokenizer, cache):
    d, ref = _folder(tmp_path, tiny_tokenizer, dtype=torch.bfloat16)
    spec = MatrixSpec("lorc", QuantSpec("rtn", 4, 32), rank=4)
    pipeline.compress(str(d), spec, str(tmp_path / "ck"), progress=False, max_shard_bytes=20_000)
    meta = checkpoint.read_meta(tmp_path / "ck")
    files = checkpoint.tensor_files(meta)
    assert len(files) > 2 and all(f.startswith("model-") and f.endswith(".safetensors") for f in files)
    assert meta["dtype"] == "bfloat16"
    from safetensors import safe_open

    dtypes = {}
    for f in files:
        with safe_open(str(tmp_path / "ck" / f), framework="pt") as fh:
            dtypes.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    assert dtypes["model.layers.0.self_attn.q_proj.L"] == "F16"  # factors in the plan's factor dtype
    assert dtypes["model.layers.0.self_attn.q_proj.q_scale"] == "F16"  # scales as the plan stores them, not bf16
    model = checkpoint.load(tmp_path / "ck", dtype=torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert len(compressed_modules(model)) == 14
    (tmp_path / "ck" / files[1]).write_bytes(b"x")  # every shard is checked
    with pytest.raises(checkpoint.CheckpointError, match="truncated or altered"):
        checkpoint.load(tmp_path / "ck")


def test_shard_file_round_trips_every_dtype(tmp_path):
    """Shards are written tensor by tensor (host memory: one tensor); safetensors reads them back
    exactly: every dtype a checkpoint stores, scalars, empty and non-contiguous tensors."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    ts = {"bf16": torch.randn(3, 5, generator=g).bfloat16(), "f32": torch.randn(7, generator=g),
          "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4), "mask": torch.rand(4, generator=g) > 0.5,
          "codes": torch.randint(-100, 100, (5, 3), dtype=torch.int8, generator=g),
          "transposed": torch.randn(6, 4, generator=g).t(), "f16": torch.randn(2, 2, generator=g).half(),
          "idx": torch.randint(0, 1000, (9,), dtype=torch.int32, generator=g),
          "packed": torch.randint(0, 255, (4, 4), dtype=torch.uint8, generator=g)}
    f = checkpoint._ShardFile(tmp_path / "x.safetensors")
    for k, v in ts.items():
        f.add(k, v)
    f.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert sorted(back) == sorted(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # the data file is gone


def test_streamed_plan_equals_whole_model_plan(tiny_model_dir, tmp_path, cache, monkeypatch):
    """The same budget through the streamed stages and through the whole-model pipeline (statistics
    from one file) gives the same plan and the same checkpoint, bit for bit, when windows run one at
    a time as there (batched windows change float rounding, which GPTQ at 2 bits amplifies)."""
    monkeypatch.setattr(blockwise, "windows_per_call", lambda *a, **k: 1)
    cfg, calib = AllocationConfig(Budget(3.0), CANDS), CalibConfig(4, 48, fisher_dtype="float32")
    a = pipeline.compress(str(tiny_model_dir), cfg, str(tmp_path / "a"), calib=calib, progress=False)
    b = pipeline.compress(str(tiny_model_dir), cfg, str(tmp_path / "b"), calib=calib, progress=False,
                          stats_path=str(tmp_path / "stats.safetensors"))
    assert a.plan == b.plan
    assert len({s.label() for s in a.plan.values()}) > 2
    assert any(s.quant.method == "nuq" or s.quant.outliers for s in a.plan.values())  # whole Fisher kept where used
    ma, mb = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert all(torch.equal(t, mb.state_dict()[k]) for k, t in ma.state_dict().items())


def test_killed_budget_run_resumes_from_finished_blocks(tiny_model_dir, tmp_path, cache, monkeypatch):
    cfg = AllocationConfig(Budget(3.0), CANDS)
    real = blockwise.block_costs
    seen = []

    def dies_after_one(src, names, *a, **k):
        if seen:
            raise KeyboardInterrupt  # as kill -9: nothing after this runs
        seen.append(names[0])
        return real(src, names, *a, **k)

    monkeypatch.setattr(blockwise, "block_costs", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        pipeline.compress(str(tiny_model_dir), cfg, str(tmp_path / "o"), calib=CALIB, progress=False)
    assert not (tmp_path / "o").exists()
    assert seen == ["model.layers.1.self_attn.q_proj"]  # the Fisher's backward sweep: last block first
    done = []
    monkeypatch.setattr(blockwise, "block_costs", lambda src, names, *a, **k: done.append(names[0]) or real(src, names, *a, **k))
    res = pipeline.compress(str(tiny_model_dir), cfg, str(tmp_path / "o"), calib=CALIB, progress=False)
    assert done == ["model.layers.0.self_attn.q_proj"] and not res.allocation["table_cached"]
    runs = list((cache / "runs").iterdir())
    assert len(runs) == 1 and len(list(runs[0].glob("*.costs.json"))) == 2
    st = json.loads((runs[0] / "block-00000.costs.json").read_text())
    assert set(st) == {n for n in res.plan if n.startswith("model.layers.0.")}


def test_rows_in_two_worker_processes_give_the_in_process_plan(tiny_model_dir, tmp_path, cache, monkeypatch):
    """Cost-table rows computed in two worker processes (the CPU path) give the plan and checkpoint
    of rows computed in-process, and every block's rows are saved for a resumed run."""
    a = pipeline.compress(str(tiny_model_dir), AllocationConfig(Budget(3.0), CANDS, workers=2), str(tmp_path / "a"),
                          calib=CALIB, progress=False)
    runs = list((cache / "runs").iterdir())
    assert len(runs) == 1 and len(list(runs[0].glob("*.costs.json"))) == 2
    monkeypatch.setenv("LQKIT_CACHE", str(tmp_path / "other"))
    b = pipeline.compress(str(tiny_model_dir), AllocationConfig(Budget(3.0), CANDS, workers=1), str(tmp_path / "b"),
                          calib=CALIB, progress=False)
    assert a.plan == b.plan
    ma, mb = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert all(torch.equal(t, mb.state_dict()[k]) for k, t in ma.state_dict().items())


def test_torchrun_two_processes_give_the_single_process_checkpoint(tiny_model_dir, tmp_path):
    """``torchrun --nproc-per-node 2 -m lqkit compress`` (gloo on the CPU) splits the cost table and
    the decompositions over the ranks and writes the same plan and tensors as one process."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["compress", "--model", str(tiny_model_dir), "--budget", "3", "--device", "cpu", "-q",
            "--cand-quantizers", "rtn,gptq,nf,nuq", "--cand-bits", "2,3,4", "--cand-group-sizes", "32",
            "--cand-ranks", "0,4", "--cand-outliers", "0,0.01", "--calib-samples", "4", "--calib-seqlen", "48"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = {"one": [sys.executable, "-m", "lqkit"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "lqkit"]}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + args + ["--out", str(tmp_path / name)], capture_output=True, text=True, timeout=300,
                           env=dict(env, LQKIT_CACHE=str(tmp_path / f"cache-{name}")))
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (checkpoint.read_meta(tmp_path / n) for n in runs)
    assert two["extra"]["processes"] == 2 and one["extra"]["processes"] == 1
    assert one["plan"] == two["plan"] and len({json.dumps(s) for s in one["plan"].values()}) > 2
    for f in checkpoint.tensor_files(one):
        a, b = load_file(str(tmp_path / "one" / f)), load_file(str(tmp_path / "two" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_size_summary_counts_tied_weights_once(tmp_path, tiny_tokenizer, cache):
    """gemma3 ties its head to the embedding: the streamed summary counts it once, as the summary of
    the loaded model does, and the checkpoint stores it once."""
    from lqkit.compress import size_summary

    d, _ = _folder(tmp_path, tiny_tokenizer, arch="gemma3")
    res = pipeline.compress(str(d), MatrixSpec("quant", QuantSpec("rtn", 4, 32)), str(tmp_path / "ck"), progress=False)
    model = checkpoint.load(tmp_path / "ck", prepare=False)
    assert res.summary == size_summary(model)
    assert checkpoint.read_meta(tmp_path / "ck")["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_gpu_memory_limit_sizes_gptq_stacks_to_the_share(monkeypatch):
    """--max-gpu-memory: the fraction PyTorch enforces, and the free memory lqkit sizes its stacks by
    (the share less what is reserved), on a mocked 100 GiB GPU with 90 GiB free."""
    from lqkit.core import gptq

    gib = 2**30
    state = {"frac": 1.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 100 * gib}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: state.update(frac=f))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: state["frac"], raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (90 * gib, 100 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 30 * gib)
    dev = torch.device("cuda:0")
    assert gptq.free_memory(dev) == 90 * gib  # no limit: the device's free memory
    pipeline.limit_gpu_memory("cuda:0", 40 * gib)
    assert state["frac"] == pytest.approx(0.4)
    assert gptq.free_memory(dev) == 10 * gib  # 40 GiB share, 30 reserved
    assert gptq.max_stack(dev) == max(gptq.MAX_STACK, min(gptq.MAX_STACK_CUDA, 10 * gib // 40))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 45 * gib)
    assert gptq.free_memory(dev) == 0  # over the share already: nothing more
    state["frac"] = 1.0
    pipeline.limit_gpu_memory("cuda:0", 200 * gib)  # more than the GPU has: no limit set
    assert state["frac"] == 1.0

    def needs_index(f, d):  # as torch's own: a device without an index is refused
        assert isinstance(d, int) or d.index is not None, d
        state.update(frac=f)

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", needs_index)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    pipeline.limit_gpu_memory("cuda", 37 * gib)  # --device cuda, the usual spelling
    assert state["frac"] == pytest.approx(0.37)


def test_gpu_memory_limit_on_a_cpu_run_is_refused(tiny_model_dir, tmp_path):
    from test_cli import run

    out = tmp_path / "ck"
    r = run("compress", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--device", "cpu",
            "--max-gpu-memory", "40GB", "--out", str(out), "-q")
    assert r.returncode != 0 and "--max-gpu-memory" in r.stderr and "--device cuda" in r.stderr, r.stderr
    assert not out.exists()
    r = run("compress", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(out),
            "--max-gpu-memory", "lots")
    assert r.returncode == 2 and "e.g. 40GB" in r.stderr, r.stderr


def test_default_device_is_the_gpu_when_present_else_the_cpu(monkeypatch):
    from lqkit.dist import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device(None) == "cpu" and default_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device(None) == "cuda" and default_device("cpu") == "cpu"
