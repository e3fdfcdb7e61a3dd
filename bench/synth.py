"""Random-initialised models of real shapes, saved as a user's model folder would be (config, bf16
safetensors shards, a tokenizer), for scale and speed measurements where real weights cannot travel.

The tokenizer is a byte-level BPE trained here on the bundled WikiText-2 text (it may reach fewer
than the model's 32000 ids: every id it produces is valid). Weights are drawn by transformers' own
initialisation on the chosen device (fast on a GPU), so their statistics are a fresh model's, not a
trained one's: times and memory are representative, quality is not.

    python bench/synth.py --shape llama2-7b --layers 8 --out /tmp/llama2-7b-8l
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {  # LlamaConfig fields of public models' shapes
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),  # stacked gate/up 28672 rows, q/k/v 6144
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),  # for checking the scripts on a CPU
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8),
    "smollm-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),  # 210 linears
}
VOCAB = 32000


def tokenizer(vocab: int = VOCAB):
    """A byte-level BPE tokenizer trained on the bundled WikiText-2 validation text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lqkit.data import DEFAULT_CALIB_TEXT, read_text

    text, _ = read_text(None, DEFAULT_CALIB_TEXT)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build(shape: str | dict, layers: int | None, out: Path, device: str = "cuda", dtype: torch.dtype | None = None,
          seed: int = 0, max_shard_size: str = "4GB", vocab: int | None = None) -> Path:
    """Write a random-initialised causal LM of ``shape`` (a name in SHAPES or LlamaConfig fields;
    ``layers`` decoder blocks) to ``out``: bf16 on a GPU, fp32 on a CPU unless ``dtype`` is given.
    ``vocab``: default the shape's, else VOCAB; embeddings untied unless the shape ties them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    vocab = vocab or fields.pop("vocab_size", None) or VOCAB
    fields.pop("vocab_size", None)
    tok = tokenizer(vocab)
    if layers:
        fields["num_hidden_layers"] = layers
    fields = {"tie_word_embeddings": False, **fields}
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **fields)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="stored dtype (default: bf16 on a GPU, fp32 on a CPU)")
    a = ap.parse_args()
    t = time.time()
    build(a.shape, a.layers, Path(a.out), a.device, dtype=getattr(torch, a.dtype) if a.dtype else None)
    print(f"{a.out}: {a.shape}, {a.layers or SHAPES[a.shape]['num_hidden_layers']} layers, {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
