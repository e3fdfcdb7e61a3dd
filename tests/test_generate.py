"""lqkit.generate: a checkpoint (or a plain HF folder) continues a prompt; eager and compiled agree."""

import pytest

from lqkit import pipeline
from lqkit.core import MatrixSpec, QuantSpec
from lqkit.errors import DataError, SpecError
from lqkit.generate import format_generation, generate

PROMPT = "The tower is"


@pytest.fixture
def tiny_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    pipeline.compress(str(tiny_model_dir), MatrixSpec("quant", QuantSpec("rtn", 4, 32)), str(out), progress=False)
    return out


def test_generate_checkpoint_eager_and_compiled(tiny_checkpoint):
    g = generate(str(tiny_checkpoint), PROMPT, max_new_tokens=6, device="cpu")
    assert g.text.startswith(PROMPT) and 1 <= g.new_tokens <= 6 and g.prompt_tokens >= 3
    assert g.tokens_per_s == pytest.approx(g.new_tokens / g.seconds)
    assert g.device == "cpu" and g.dtype == "float32" and not g.compiled
    c = generate(str(tiny_checkpoint), PROMPT, max_new_tokens=6, device="cpu", compile=True,
                 compile_backend="aot_eager")
    assert c.compiled and c.text == g.text and c.new_tokens == g.new_tokens
    assert "tokens/s" in format_generation(c) and "compiled" in format_generation(c)


def test_generate_plain_model_and_bad_input(tiny_model_dir):
    g = generate(str(tiny_model_dir), PROMPT, max_new_tokens=3, device="cpu")
    assert g.text.startswith(PROMPT) and g.new_tokens >= 1
    with pytest.raises(SpecError, match="max-new-tokens"):
        generate(str(tiny_model_dir), PROMPT, max_new_tokens=0)
    with pytest.raises(DataError, match="prompt"):
        generate(str(tiny_model_dir), "")


def test_greedy_loop_equals_transformers_generate_and_stops_at_eos(tiny_checkpoint, monkeypatch):
    import torch

    from lqkit import checkpoint, nn
    from lqkit.generate import greedy_loop

    model = checkpoint.load(str(tiny_checkpoint), dtype=torch.float32, device="cpu")
    ids = torch.randint(4, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                         do_sample=False, pad_token_id=0)
    bound = []
    monkeypatch.setattr(nn, "bind_calls", lambda m, shape: bound.append(shape) or 0)
    assert torch.equal(greedy_loop(model, ids, 20, backend="aot_eager", check_every=4), ref)
    with torch._dynamo.config.patch(error_on_recompile=True):  # reuses the cache and both compiled graphs
        assert torch.equal(greedy_loop(model, ids, 20, backend="aot_eager", check_every=4), ref)
    assert bound == [(2, 1)]  # a new batch's one-token kernel calls bound once, before the step is compiled
    assert torch.equal(greedy_loop(model, ids, 20, backend="aot_eager", compile_prefill=False), ref)
    eos = int(ref[0, 7])  # an id both rows have produced by their last check
    cut = greedy_loop(model, ids, 20, eos_token_id=eos, backend="aot_eager", check_every=4)
    first = [int((ref[r, 5:] == eos).nonzero()[0]) if (ref[r, 5:] == eos).any() else None for r in range(2)]
    if all(f is not None for f in first):
        assert torch.equal(cut, ref[:, :5 + max(first) + 1])
    else:
        assert torch.equal(cut, ref)
