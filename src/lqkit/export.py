"""Export an lqkit checkpoint as a PEFT LoRA adapter over its dequantized base.

Folder layout written by :func:`export_peft`:
- ``base/``: a plain Hugging Face model folder in which every compressed layer is an ``nn.Linear``
  holding deq(Q) (zeros for a low-rank-only layer) and its bias; everything else as in the
  checkpoint (including norms or biases that fine-tuning changed); the tokenizer.
- ``adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors``: one LoRA per layer with a
  low-rank part, ``lora_A = R`` (r, in) and ``lora_B = L`` (out, r), ``lora_alpha = r`` so PEFT's
  scaling alpha/r is 1 and ``base(x) + B(A x)`` is exactly lqkit's ``x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ``.

    base = AutoModelForCausalLM.from_pretrained("out/base")
    model = PeftModel.from_pretrained(base, "out/adapter")   # or .merge_and_unload() for a dense model

The base is dense: this form is for interoperability (transformers + peft, LoRA-serving runtimes),
not for memory; the lqkit checkpoint stays the compact form.

Which runtime serves which form:
- lqkit checkpoint (packed Q + L, R): lqkit only (transformers with CompressedLinear; torch path on
  CPU/GPU, fused Triton kernels on CUDA for inference). The compact form.
- base + adapter: transformers + peft (tested: same logits as lqkit), and runtimes that load standard
  PEFT LoRA adapters over an HF base (e.g. vLLM, TGI, SGLang multi-LoRA; not tested here).
- merged (``PeftModel.merge_and_unload()`` + ``save_pretrained``): any runtime that reads a plain HF
  model (transformers, vLLM, llama.cpp after GGUF conversion, ...), at the dense model's size.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import checkpoint
from .errors import CheckpointError
from .models import load_tokenizer
from .nn.surgery import compressed_modules, set_submodule

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules


@dataclass(frozen=True)
class PeftExport:
    out: str
    base: str
    adapter: str
    modules: int  # layers with a LoRA
    ranks: dict[str, int]  # rank -> count, as strings for JSON
    dtype: str


def lora_tensors(model: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT-named LoRA tensors (lora_A = R, lora_B = L) and the rank of each adapted module."""
    tensors, ranks = {}, {}
    for name, m in compressed_modules(model).items():
        if m.L is None:
            continue
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.R.detach().to(dtype).contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.L.detach().to(dtype).contiguous()  # (out, r)
        ranks[name] = m.spec.rank
    return tensors, ranks


def dequantize_in_place(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Replace each CompressedLinear by an ``nn.Linear`` holding deq(Q) (zeros without Q) and its bias."""
    for name, m in compressed_modules(model).items():
        w = m.dequantized_weight(dtype)
        device = (m.qcodes if m.spec.quant is not None else m.L).device
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            lin.weight.copy_(w if w is not None else torch.zeros_like(lin.weight))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        set_submodule(model, name, lin)


def adapter_config(ranks: dict[str, int], base: str) -> dict:
    """A PEFT LoRA config targeting exactly ``ranks``' modules with scaling 1 (alpha = r)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "revision": None,
    }


def export_peft(path: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> PeftExport:
    """Write ``out/base`` (dequantized dense model) and ``out/adapter`` (PEFT LoRA) for the lqkit
    checkpoint ``path``; atomically (temporary folder, then rename)."""
    out = checkpoint.check_out_dir(out, overwrite)
    meta = checkpoint.read_meta(path)
    if not any(s.get("rank") for s in meta["plan"].values()):
        raise CheckpointError(f"checkpoint {str(path)!r} has no low-rank part (rank 0 in every layer): there is no "
                              "LoRA to export; the dequantized model alone is a plain HF model")
    model = checkpoint.load(path, dtype=torch.float32, prepare=False)  # read, not run: no dense copies
    tok = load_tokenizer(str(path))
    tensors, ranks = lora_tensors(model, dtype)
    dequantize_in_place(model, torch.float32)
    model.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        (tmp / "adapter").mkdir()
        save_file(tensors, str(tmp / "adapter" / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        cfg = adapter_config(ranks, str((out / "base").resolve()))
        (tmp / "adapter" / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(tmp / "adapter")
        checkpoint._replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {str(k): v for k, v in sorted(Counter(ranks.values()).items())}
    log.info("exported %d LoRA modules (ranks %s) over a dequantized base to %s", len(ranks), counts, out)
    return PeftExport(str(out), str(out / "base"), str(out / "adapter"), len(ranks), counts,
                      str(dtype).removeprefix("torch."))
