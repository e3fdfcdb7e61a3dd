"""Shared fixtures: tiny randomly initialised causal LMs built from configs, and a tiny tokenizer
trained on the bundled calibration text (no download needed)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The CPU clip search runs eagerly here and in the processes tests start: on the tiny models torch.compile's
# tracing and compiling cost about 12 s a process and save nothing. The compiled path has its own tests
# (test_quant.py: bitwise equal to the eager one), which turn it on; LQKIT_COMPILE=1 runs every test with it.
os.environ.setdefault("LQKIT_COMPILE", "0")

import pytest
import torch

VOCAB = 384

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # an xdist worker (`make test` runs two): its share of the cores
    # (OMP_NUM_THREADS where set), for torch here and for the processes tests start (CLI runs), instead of
    # every worker taking them all
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


pytest_plugins = ["timeguard"]  # --max-test-seconds: `make test` stays fast only if no test grows slow unnoticed


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Statistics and cost tables the tests compute go to a per-session cache, not the user's; the
    converted default model (``models/``) is shared with the user's cache so it is built only once."""
    from lqkit.models import cache_dir

    user = cache_dir()
    (user / "models").mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("lqkit-cache")
    (root / "models").symlink_to(user / "models", target_is_directory=True)
    old = os.environ.get("LQKIT_CACHE")
    os.environ["LQKIT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("LQKIT_CACHE", None)
    else:
        os.environ["LQKIT_CACHE"] = old


def tiny_config(arch: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)  # has q/k/v biases
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lqkit.data import DEFAULT_CALIB_TEXT, read_text

    text, _ = read_text(None, DEFAULT_CALIB_TEXT)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")
    assert fast.bos_token_id == 1 and fast.eos_token_id == 2
    return fast


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of the test's own (statistics, cost tables, runs)."""
    monkeypatch.setenv("LQKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["llama", "gemma3", "qwen2"])
def arch(request):
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny llama saved as a plain HF folder with its tokenizer."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and far faster on a machine busy with other work
    (the training tests use it: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
