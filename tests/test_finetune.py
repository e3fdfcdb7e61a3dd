"""Fine-tuning of the low-rank part (LQ-LoRA): what trains, what stays frozen, exact resumption,
PEFT export, bad input, and the command line. Tiny models only."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_model
from lqkit import checkpoint
from lqkit.compress import compress_model
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.errors import CheckpointError, DataError, SpecError
from lqkit.finetune import FinetuneConfig, finetune, freeze_all_but, train, trainable_parameters
from lqkit.plan import uniform_plan
from lqkit.train_data import IGNORE, load_packed, pack, read_examples

pytestmark = pytest.mark.usefixtures("one_thread")

LQ = MatrixSpec("lq", QuantSpec("rtn", 3, 32), 4, iters=2)
CFG = FinetuneConfig(steps=6, seq_len=32, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1, eval_every=3,
                     save_every=3, eval_fraction=0.1, max_eval_sequences=2)


def _compressed(arch="llama", plan=None, tok=None):
    m = tiny_model(arch)
    plan = plan or uniform_plan(m, LQ)
    compress_model(m, plan, progress=False)
    return m, plan


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from lqkit.data import DEFAULT_CALIB_TEXT, read_text

    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(read_text(None, DEFAULT_CALIB_TEXT)[0][:6000])
    return p


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer):
    m, plan = _compressed()
    return checkpoint.save(m, tiny_tokenizer, tmp_path / "ck", plan=plan)


def test_only_factors_train_and_q_is_untouched(tiny_tokenizer, text_file):
    m, _ = _compressed("qwen2")  # qwen2: biased q/k/v
    params = trainable_parameters(m)
    assert params and all(n.endswith((".L", ".R")) for n in params)
    assert len(trainable_parameters(m, train_norms=True, train_biases=True)) > len(params)
    data = load_packed(text_file, tiny_tokenizer, 32, eval_fraction=0.1)
    freeze_all_but(m, params)
    x = data.input_ids[:2]
    m(input_ids=x).logits.sum().backward()
    got_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got_grad == set(params)
    m.zero_grad(set_to_none=True)
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if n not in params}
    before = {n: p.detach().clone() for n, p in params.items()}
    res = train(m, data, FinetuneConfig(steps=3, seq_len=32, batch_size=2, lr=1e-2, eval_every=0), progress=False)
    assert len(res.losses) == 3 and res.trainable_params == sum(p.numel() for p in params.values())
    for n, b in m.named_buffers():
        assert torch.equal(b, buffers[n]), n  # Q codes and scales bit-for-bit
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(params[n], before[n]) for n in params)


def test_resume_after_crash_matches_uninterrupted(ckpt, text_file, tmp_path):
    straight = finetune(ckpt, text_file, tmp_path / "a", CFG, progress=False)
    assert straight.train.steps == 6 and len(straight.train.losses) == 6

    def crash(record):
        if record["step"] == 4:  # one step past the state saved at step 3: its log line must be dropped
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(ckpt, text_file, tmp_path / "b", CFG, progress=False, on_step=crash)
    resumed = finetune(ckpt, text_file, tmp_path / "b", CFG, progress=False, resume=True)
    assert resumed.train.resumed_from == 3
    torch.testing.assert_close(torch.tensor(resumed.train.losses), torch.tensor(straight.train.losses),
                               rtol=0, atol=1e-6)
    assert [s for s, _ in resumed.train.evals] == [s for s, _ in straight.train.evals] == [3, 6]
    assert [v for _, v in resumed.train.evals] == pytest.approx([v for _, v in straight.train.evals], abs=1e-6)
    logs = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert logs[0] == pytest.approx(logs[1], abs=1e-6) and len(logs[1]) == 6
    a, b = (checkpoint.load(tmp_path / d / "last") for d in "ab")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    meta = checkpoint.read_meta(tmp_path / "a" / "best")
    assert meta["extra"]["finetune"]["step"] == straight.train.best_step
    with pytest.raises(SpecError, match="different settings"):
        finetune(ckpt, text_file, tmp_path / "b", FinetuneConfig(**{**CFG.to_dict(), "lr": 1.0, "betas": (0.9, 0.999)}),
                 progress=False, resume=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_peft_export_gives_the_same_logits(arch, tiny_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lqkit.export import export_peft

    m = tiny_model(arch)
    plan = uniform_plan(m, LQ)
    names = list(plan)
    plan[names[0]] = MatrixSpec("quant", QuantSpec("rtn", 4, 32))  # rank 0: no LoRA there
    plan[names[-1]] = MatrixSpec("lorc", QuantSpec("nf", 3, 32), 8)  # another rank: rank_pattern
    compress_model(m, plan, progress=False)
    with torch.no_grad():  # as after training with --train-norms/--train-biases
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    ck = checkpoint.save(m, tiny_tokenizer, tmp_path / "ck", plan=plan)
    exp = export_peft(ck, tmp_path / "peft")
    assert exp.modules == len(plan) - 1 and exp.ranks == {"4": len(plan) - 2, "8": 1}
    lq = checkpoint.load(ck)
    base = AutoModelForCausalLM.from_pretrained(exp.base, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, exp.adapter).eval()
    x = torch.randint(3, 384, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, lq(input_ids=x).logits, rtol=1e-4, atol=1e-4)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=x).logits, lq(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_jsonl_prompt_masking_and_bad_lines(tiny_tokenizer, tmp_path):
    good = [{"text": "The tower is 324 metres tall. " * 3}, {"prompt": "Question: why? Answer:", "response": " because."}]
    lines = [json.dumps(good[0]), "{not json", "", json.dumps([1, 2]), json.dumps({"prompt": "x"}), json.dumps(good[1])]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines * 4) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid JSON"):
        read_examples(p)
    ex, skipped, _ = read_examples(p, on_bad_line="skip")
    assert len(ex) == 8 and skipped[:3] == (2, 4, 5)
    prompt_len, resp_len = (len(tiny_tokenizer(good[1][k], add_special_tokens=False)["input_ids"])
                            for k in ("prompt", "response"))
    packed = pack(tiny_tokenizer, ex[1:2], prompt_len + resp_len + 2, eval_fraction=0)  # BOS + ... + EOS
    assert (packed.labels[0, 1:1 + prompt_len] == IGNORE).all() and (packed.labels[0, 1 + prompt_len:] != IGNORE).any()
    assert packed.input_ids[0, 0] == tiny_tokenizer.bos_token_id


def test_bad_inputs(tmp_path, tiny_tokenizer, ckpt, text_file):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("a few words")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    cfg = FinetuneConfig(steps=1, seq_len=32, batch_size=1)
    for name, match in [("nope.txt", "does not exist"), ("empty.txt", "is empty"),
                        ("short.txt", "fewer than one sequence"), ("bad.jsonl", "line 2")]:
        with pytest.raises(DataError, match=match):
            finetune(ckpt, tmp_path / name, tmp_path / "run", cfg, progress=False)
        assert not (tmp_path / "run").exists()
    m = tiny_model("llama")
    plan = uniform_plan(m, MatrixSpec("quant", QuantSpec("rtn", 4, 32)))
    compress_model(m, plan, progress=False)
    ck0 = checkpoint.save(m, tiny_tokenizer, tmp_path / "ck0", plan=plan)
    with pytest.raises(CheckpointError, match="no low-rank part"):
        finetune(ck0, text_file, tmp_path / "run", cfg, progress=False)
    with pytest.raises(CheckpointError, match="no resumable state"):
        finetune(ckpt, text_file, tmp_path / "run", cfg, progress=False, resume=True)
    with pytest.raises(SpecError, match="steps"):
        FinetuneConfig(steps=0)


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lqkit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_cli_smoke(ckpt, text_file, tmp_path, capsys):
    from lqkit.cli import main

    assert main(["finetune", str(ckpt), "--data", str(text_file), "--out", str(tmp_path / "a"), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--eval-every", "1", "--export-peft", "-q"]) == 0
    assert "best checkpoint" in capsys.readouterr().out
    assert (tmp_path / "a" / "peft" / "adapter" / "adapter_config.json").is_file()
    assert checkpoint.read_meta(tmp_path / "a" / "best")["extra"]["finetune"]["step"] in (1, 2)
    assert main(["export-peft", str(tmp_path / "a" / "last"), "--out", str(tmp_path / "exp"), "-q"]) == 0
    assert "adapter" in capsys.readouterr().out and (tmp_path / "exp" / "base" / "config.json").is_file()
    for args, expect in [(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")], "does not exist"),
                         (["--data", str(text_file), "--out", str(tmp_path / "a")], "--overwrite"),
                         (["--data", str(text_file), "--out", str(tmp_path / "a"), "--seq-len", "1"], "at least 2")]:
        assert main(["finetune", str(ckpt), *args, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err


@pytest.mark.slow  # several CLI processes: about a minute on a loaded 2-core machine
def test_cli_kill9_resume_and_export(ckpt, text_file, tmp_path):
    opts = ["--data", text_file, "--steps", 8, "--seq-len", 32, "--batch-size", 2, "--save-every", 1,
            "--eval-every", 4, "--warmup-steps", 2, "-q"]
    a = _cli("finetune", ckpt, "--out", tmp_path / "a", *opts, "--export-peft")
    b = _cli("finetune", ckpt, "--out", tmp_path / "b", *opts)
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err
    assert "best checkpoint" in out and (tmp_path / "a" / "peft" / "adapter" / "adapter_config.json").is_file()
    latest = tmp_path / "b" / "resume" / "LATEST"
    deadline = time.time() + 240
    while b.poll() is None and not (latest.exists() and latest.read_text() >= "step-00000002"):
        assert time.time() < deadline
        time.sleep(0.02)
    b.send_signal(signal.SIGKILL)  # possibly mid-write of a state or log line
    b.wait()
    r = _cli("finetune", ckpt, "--out", tmp_path / "b", *opts, "--resume")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert len(losses[1]) == 8 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    e = _cli("export-peft", tmp_path / "b" / "best", "--out", tmp_path / "exp")
    out, err = e.communicate(timeout=300)
    assert e.returncode == 0 and "adapter" in out, err
    for args, expect in [(["finetune", ckpt, "--data", tmp_path / "missing.txt", "--out", tmp_path / "c"], "does not exist"),
                         (["finetune", ckpt, "--data", text_file, "--out", tmp_path / "a"], "--overwrite"),
                         (["finetune", ckpt, "--data", text_file, "--out", tmp_path / "c", "--on-bad-line", "x"], "invalid choice")]:
        p = _cli(*args)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and len(err.strip().splitlines()) == 1 and expect in err, err


def test_bf16_autocast_and_no_checkpointing(tiny_tokenizer, text_file):
    m, _ = _compressed("gemma3")
    data = load_packed(text_file, tiny_tokenizer, 32, eval_fraction=0.1, max_eval_sequences=1)
    res = train(m, data, FinetuneConfig(steps=2, seq_len=32, batch_size=2, precision="bf16", grad_checkpointing=False,
                                        schedule="linear", warmup_steps=0), progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses))) and res.evals and res.best_step is not None
    assert all(p.dtype == torch.float32 for p in trainable_parameters(m).values())  # fp32 masters
    assert not any(getattr(mod, "_dense_q", None) is not None for mod in m.modules())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_chunked_loss_matches_full_logits(arch, monkeypatch):
    from lqkit import finetune as ft

    monkeypatch.setattr(ft, "LOSS_CHUNK_ELEMENTS", 384 * 10)  # 10 tokens per chunk: several chunks
    m, _ = _compressed(arch)
    if arch == "gemma3":
        m.config.final_logit_softcapping = 5.0
    cfg = FinetuneConfig(seq_len=24)
    x = torch.randint(3, 384, (2, 24))
    y = x.clone()
    y[0, :7] = IGNORE  # a masked prompt
    split = ft.loss_split(m, x, cfg)
    assert split is not None
    params = trainable_parameters(m)
    grads = []
    for s in (None, split):
        nll = ft._nll_sum(m, x, y, cfg, s)
        grads.append(torch.autograd.grad(nll, list(params.values())))
        grads[-1] = (nll.detach(), grads[-1])
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
