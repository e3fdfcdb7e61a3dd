import math

import pytest
import torch

from conftest import tiny_model
from lqkit.data import read_text
from lqkit.errors import DataError, SpecError
from lqkit.evaluate import EvalProtocol, perplexity, tokenize, window_starts


def test_window_starts_fixed_subset():
    p = EvalProtocol(windows=40)
    s = window_starts(292281, p)
    assert len(s) == 40 and s[0] == 0
    assert s == [i * (292281 - 511) // 40 for i in range(40)]
    assert all(x + 511 <= 292281 for x in s)


def test_window_starts_full():
    s = window_starts(2000, EvalProtocol(full=True))
    assert s == [0, 511, 1022]  # complete non-overlapping windows only


def test_too_short():
    with pytest.raises(DataError, match="at least 511"):
        window_starts(100, EvalProtocol())


def test_bad_protocol():
    with pytest.raises(SpecError):
        EvalProtocol(windows=0)


def test_matches_plain_hf_loss(tiny_tokenizer):
    """lqkit's perplexity equals exp(mean HF loss) over the same BOS-prefixed windows."""
    model = tiny_model("llama")
    text, _ = read_text(None)
    text = text[:60_000]
    proto = EvalProtocol(windows=5, window_tokens=64, batch_size=2)
    r = perplexity(model, tiny_tokenizer, text, proto, progress=False)
    ids = tokenize(tiny_tokenizer, text)
    losses = []
    for s in window_starts(ids.numel(), proto):
        x = torch.cat([torch.tensor([tiny_tokenizer.bos_token_id]), ids[s:s + 63]]).unsqueeze(0)
        with torch.no_grad():
            losses.append(float(model(input_ids=x, labels=x).loss))  # HF shifts labels internally
    assert r.windows == 5 and r.tokens_scored == 5 * 63
    assert r.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_batch_size_does_not_change_result(tiny_tokenizer):
    model = tiny_model("gemma3")
    text = read_text(None)[0][:40_000]
    a = perplexity(model, tiny_tokenizer, text, EvalProtocol(windows=4, window_tokens=48, batch_size=1), progress=False)
    b = perplexity(model, tiny_tokenizer, text, EvalProtocol(windows=4, window_tokens=48, batch_size=4), progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)


def test_read_text_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        read_text(tmp_path / "bin.txt")


def test_bundled_texts_are_disjoint_wikitext_splits():
    test, _ = read_text(None)
    valid, _ = read_text(None, "wikitext2-valid.txt")
    assert " = Robert Boulter = " in test and " = Homarus gammarus = " in valid
    assert " = Robert Boulter = " not in valid


def test_nll_inplace_equals_cross_entropy_with_extreme_logits():
    from lqkit.core.loss import nll_inplace

    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 3000, generator=g) * 40  # rows spanning hundreds of nats: subnormal exp without the floor
    z[:, :10] -= 500.0
    y = torch.randint(0, 3000, (50,), generator=g)
    y[:3] = torch.arange(3)  # targets among the lowest logits
    ref = torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(nll_inplace(z.clone(), y), ref, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("arch,softcap", [("llama", None), ("gemma3", None), ("gemma3", 3.0)])
def test_chunked_output_layer_equals_plain_path(tiny_tokenizer, monkeypatch, arch, softcap):
    """The chunked fp32 head (reused buffer, in-place log-softmax) gives the model's own losses; a
    model that transforms its logits (soft-capping) is detected by the probe and keeps the plain path."""
    from lqkit import evaluate

    model = tiny_model(arch)
    if softcap is not None:
        model.config.final_logit_softcapping = softcap
    text = read_text(None)[0][:40_000]
    proto = EvalProtocol(windows=3, window_tokens=40, batch_size=2)
    monkeypatch.setattr(evaluate, "HEAD_CHUNK", 17)  # several chunks per batch, the buffer reused
    used = []
    real = evaluate._ChunkedHead.__init__
    monkeypatch.setattr(evaluate._ChunkedHead, "__init__", lambda self, *a: real(self, *a) or used.append(self.ok))
    fast = perplexity(model, tiny_tokenizer, text, proto, progress=False)
    assert used == [softcap is None]
    monkeypatch.setattr(evaluate._ChunkedHead, "__init__", lambda self, *a: setattr(self, "ok", False))
    plain = perplexity(model, tiny_tokenizer, text, proto, progress=False)
    assert fast.perplexity == pytest.approx(plain.perplexity, rel=1e-5)
