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
