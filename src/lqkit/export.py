"""Export an lqkit checkpoint to the forms other runtimes read: one verb, a registry of formats.

``compressed-tensors`` (:func:`export`, ``lqkit export CKPT --format compressed-tensors --out DIR``),
what vLLM and SGLang serve:
- ``DIR``: a Hugging Face folder whose ``config.json`` carries a compressed-tensors
  ``quantization_config`` (format ``pack-quantized``; one config group per distinct integer scheme,
  its layers as anchored ``re:`` targets; every other linear layer in ``ignore``), each compressed
  layer as ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape`` packed by
  the ``compressed-tensors`` package itself (``pack_to_int32``), every other tensor in the
  checkpoint's stored dtype, the tokenizer;
- ``DIR/adapter``: L·R as a PEFT LoRA (below), when any layer has a low-rank part;
- ``DIR/SERVE.md``: the exact ``vllm serve`` / SGLang / transformers commands for this folder.
What the format cannot express (codebooks, groups along the output dim, kept outliers or feature
columns, no Q, group sizes that do not divide the inputs), and — for vLLM/SGLang, which fuse them —
layers that read one input but have different schemes, is refused with one line naming the
matrices and the option that avoids it; nothing is silently dequantized. ``lqkit compress --target
vllm`` yields plans that always pass.

``peft``: ``OUT/base`` (every compressed layer an ``nn.Linear`` holding deq(Q), zeros without Q) +
``OUT/adapter``. ``dense``: one plain HF model whose layers hold deq(Q) + L·R.

The adapter: one LoRA per layer with a low-rank part, ``lora_A = R`` (r, in), ``lora_B = L`` (out, r),
``lora_alpha = r`` for every layer (``rank_pattern`` and ``alpha_pattern`` alike) so that the scaling
alpha/r is 1 whether a runtime reads the patterns or only the global r and alpha, and
``base(x) + B(A x)`` is exactly lqkit's ``x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ``::

    base = AutoModelForCausalLM.from_pretrained("out/base")
    model = PeftModel.from_pretrained(base, "out/adapter")   # or .merge_and_unload() for a dense model
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from . import checkpoint, outdir
from .core import packing, serving
from .core.quant import DTYPES
from .core.rotation import unrotate_weight
from .errors import CheckpointError, LqkitError, SpecError
from .models import load_tokenizer
from .nn.fuse import input_sets
from .nn.linear import CompressedLinear
from .nn.surgery import compressed_modules, set_submodule
from .plan import plan_from_json

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules
SERVE_FILE = "SERVE.md"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank
SHOWN = 3  # matrices named in a refusal before "(+N more)"


@dataclass(frozen=True)
class ExportResult:
    out: str
    format: str
    dtype: str  # of the uncompressed tensors
    matrices: int  # compressed layers of the checkpoint
    lora_modules: int
    ranks: dict[str, int]  # rank -> layers, as strings for JSON
    schemes: dict[str, int] = field(default_factory=dict)  # compressed-tensors: scheme label -> layers
    adapter: str | None = None
    serve: str | None = None  # SERVE.md


@dataclass(frozen=True)
class PeftExport:
    out: str
    base: str
    adapter: str
    modules: int  # layers with a LoRA
    ranks: dict[str, int]  # rank -> count, as strings for JSON
    dtype: str


@dataclass(frozen=True)
class Source:
    """What a format writer reads: the checkpoint, loaded for reading (no inference state)."""

    path: Path
    meta: dict
    model: nn.Module
    tokenizer: object
    dtype: torch.dtype  # of the uncompressed tensors written
    out: Path  # where the export ends up (paths written inside files point there)
    allow_mixed_fused: bool = False


@dataclass(frozen=True)
class Format:
    """A registry entry: ``check(meta)`` refuses before anything is loaded; ``write(src, tmp)`` fills
    the temporary folder and returns :class:`ExportResult` fields."""

    name: str
    write: Callable[[Source, Path], dict]
    check: Callable[[dict], None] = lambda meta: None
    help: str = ""


FORMATS: dict[str, Format] = {}


def register(f: Format) -> Format:
    FORMATS[f.name] = f
    return f


# ----------------------------------------------------------------------------------------------
# the verb


def export(path: str | Path, out: str | Path, fmt: str = "compressed-tensors", *, dtype: torch.dtype | None = None,
           overwrite: bool = False, allow_mixed_fused: bool = False) -> ExportResult:
    """Write the lqkit checkpoint ``path`` to ``out`` in format ``fmt`` (a key of :data:`FORMATS`);
    atomically (temporary folder, then rename). ``dtype``: of the uncompressed tensors (default: the
    checkpoint's stored dtype). Everything is checked before the model is loaded, where it can be."""
    if fmt not in FORMATS:
        raise SpecError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = checkpoint.check_out_dir(out, overwrite)
    path = Path(path).expanduser()
    _check_not_source(out, path)
    meta = checkpoint.read_meta(path)
    checkpoint.refuse_tables(meta, path, "lqkit export")
    FORMATS[fmt].check(meta)
    model = checkpoint.load(path, dtype=torch.float32, prepare=False)  # read, not run: no dense copies
    src = Source(path, meta, model, load_tokenizer(str(path)), dtype or DTYPES.get(meta.get("dtype"), torch.float32),
                 out, allow_mixed_fused)
    tmp = outdir.make_temp_dir(out)
    try:
        info = FORMATS[fmt].write(src, tmp)
        outdir.swap_in(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        outdir.release(out)
    fix = lambda p: str(out / Path(p).relative_to(tmp)) if p else None  # noqa: E731
    res = ExportResult(str(out), fmt, str(src.dtype).removeprefix("torch."), len(meta["plan"]),
                       **{**info, "adapter": fix(info.get("adapter")), "serve": fix(info.get("serve"))})
    log.info("exported %s as %s to %s", path, fmt, out)
    return res


def export_peft(path: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> PeftExport:
    """``export(path, out, "peft")``: ``out/base`` (dequantized dense model) + ``out/adapter`` (PEFT LoRA)."""
    r = export(path, out, "peft", dtype=dtype, overwrite=overwrite)
    return PeftExport(r.out, str(Path(r.out) / "base"), r.adapter, r.lora_modules, r.ranks, r.dtype)


def _check_not_source(out: Path, source: Path) -> None:
    o, s = out.resolve(), source.resolve()
    if o == s or o in s.parents:
        raise CheckpointError(f"--out {str(out)!r} would replace the checkpoint being exported ({str(source)!r}) "
                              "or a folder holding it; choose another --out, e.g. "
                              f"--out {str(source).rstrip('/')}-export")


# ----------------------------------------------------------------------------------------------
# shared pieces


def lora_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT-named LoRA tensors (lora_A = R, lora_B = L; in ``dtype``, default the plan's factor
    dtype, which is what was stored) and the rank of each adapted module. A rotated layer's R is
    rotated back (R·Rot, which reads x itself), so its adapter is exact but no longer the stored R."""
    tensors, ranks = {}, {}
    for name, m in compressed_modules(model).items():
        if m.L is None:
            continue
        dt = dtype or DTYPES[m.spec.factor_dtype]
        a = m.R.detach() if m.spec.rotation is None else unrotate_weight(m.R.detach().float(), m.spec.rotation)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dt).contiguous()  # (r, in): R·Rot when rotated
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.L.detach().to(dt).contiguous()  # (out, r)
        ranks[name] = m.spec.rank
    return tensors, ranks


def adapter_config(ranks: dict[str, int], base: str) -> dict:
    """A PEFT LoRA config targeting exactly ``ranks``' modules with scaling 1 (alpha = r everywhere)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "revision": None,
    }


def _write_adapter(folder: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int], base: str, tok) -> None:
    folder.mkdir()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(ranks, base), indent=1))
    tok.save_pretrained(folder)


def _rank_counts(ranks: dict[str, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(ranks.values()).items())}


def dequantize_in_place(model: nn.Module, dtype: torch.dtype = torch.float32, merge: bool = False) -> None:
    """Replace each CompressedLinear by an ``nn.Linear`` holding deq(Q) (zeros without Q; with
    ``merge`` deq(Q) + L·R) and its bias; rotated back (·Rot) for a rotated layer, so that it reads x."""
    for name, m in compressed_modules(model).items():
        w = m.merged_weight(dtype) if merge else m.dequantized_weight(torch.float32)
        if not merge and w is not None and m.spec.rotation is not None:
            w = unrotate_weight(w, m.spec.rotation)
        device = (m.qcodes if m.spec.quant is not None else m.L).device
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            lin.weight.copy_(w if w is not None else torch.zeros_like(lin.weight))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        set_submodule(model, name, lin)


def _names(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# ----------------------------------------------------------------------------------------------
# peft and dense


def _write_peft(src: Source, tmp: Path) -> dict:
    tensors, ranks = lora_tensors(src.model, src.dtype)
    dequantize_in_place(src.model, torch.float32)
    src.model.to(src.dtype)
    src.model.save_pretrained(tmp / "base")
    src.tokenizer.save_pretrained(tmp / "base")
    _write_adapter(tmp / "adapter", tensors, ranks, str(src.out.resolve() / "base"), src.tokenizer)
    return {"lora_modules": len(ranks), "ranks": _rank_counts(ranks), "adapter": tmp / "adapter"}


def _check_peft(meta: dict) -> None:
    if not any(s.get("rank") for s in meta["plan"].values()):
        raise CheckpointError("the checkpoint has no low-rank part (rank 0 in every layer): there is no LoRA to "
                              "export; use --format compressed-tensors or --format dense")


def _write_dense(src: Source, tmp: Path) -> dict:
    ranks = {n: m.spec.rank for n, m in compressed_modules(src.model).items() if m.L is not None}
    dequantize_in_place(src.model, torch.float32, merge=True)
    src.model.to(src.dtype)
    src.model.save_pretrained(tmp)
    src.tokenizer.save_pretrained(tmp)
    return {"lora_modules": 0, "ranks": _rank_counts(ranks)}


register(Format("peft", _write_peft, _check_peft, "OUT/base (dense deq(Q)) + OUT/adapter (PEFT LoRA of L·R)"))
register(Format("dense", _write_dense, help="one plain Hugging Face model holding deq(Q) + L·R"))


# ----------------------------------------------------------------------------------------------
# compressed-tensors


class PackedLinear(nn.Module):
    """A compressed-tensors pack-quantized linear layer as stored (write-only holder for save_pretrained)."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        for k, t in tensors.items():
            self.register_buffer(k, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LqkitError("--format compressed-tensors needs the compressed-tensors package: "
                         "pip install 'lqkit[export]'") from None
    import compressed_tensors.compressors.pack_quantized.helpers as helpers

    return helpers


def _refuse(layers: dict[str, tuple]) -> None:
    """One line naming, by reason, the layers ({name: (spec, shape)}) the format cannot hold."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for n, (spec, shape) in layers.items():
        why = serving.refusal(spec, shape)
        if why is not None:
            by_reason.setdefault(why, []).append(n)
    if by_reason:
        parts = [f"{_names(names)}: {why} ({fix})" for (why, fix), names in by_reason.items()]
        raise SpecError("compressed-tensors cannot hold " + "; ".join(parts))


def _check_ct(meta: dict) -> None:
    """Refuse, before loading anything, what the format cannot express (shapes from the reports;
    checked again on the loaded layers)."""
    shapes = {n: tuple(r["shape"]) for n, r in (meta.get("reports") or {}).items()}
    _refuse({n: (spec, shapes.get(n, (1, 1 << 30))) for n, spec in plan_from_json(meta["plan"]).items()})
    _ct()


def _fused_check(src: Source, schemes: dict[str, serving.IntScheme]) -> list[tuple[str, ...]]:
    """Layers that read one input (found by one forward, not by name) must share a scheme: vLLM and
    SGLang fuse them into one layer. Returns the groups."""
    cfg = src.model.config
    ids = torch.arange(1, 9).remainder(getattr(cfg, "vocab_size", 8) or 8).unsqueeze(0)  # (1, 8)
    groups = input_sets(src.model, list(schemes), input_ids=ids)
    bad = [g for g in groups if len({schemes[n] for n in g}) > 1]
    if bad and not src.allow_mixed_fused:
        g = bad[0]
        more = f" (and {len(bad) - 1} more such groups)" if len(bad) > 1 else ""
        raise SpecError(f"{', '.join(g)} read one input, which vLLM and SGLang fuse into one layer of one scheme, "
                        f"but have schemes {', '.join(schemes[n].label() for n in g)}{more}; compress with --target vllm "
                        "(ties them) or pass --allow-mixed-fused for a folder only transformers loads")
    return groups


def _ct_tensors(helpers, name: str, m: CompressedLinear, s: serving.IntScheme) -> dict[str, torch.Tensor]:
    """The stored tensors of one layer, packed by compressed-tensors' own ``pack_to_int32``."""
    rows, cols = m.out_features, m.in_features
    codes = packing.unpack(m.qcodes, m.spec.quant.bits, rows * cols).view(rows, cols)  # uint8 (out, in)
    try:
        p = serving.int_parts(codes, m.aux(), m.spec.quant)
    except SpecError as e:
        raise SpecError(f"{name}: {e}") from None
    out = {"weight_packed": helpers.pack_to_int32(p.q, s.bits),  # int32 (out, ceil(in·b/32))
           "weight_scale": p.scale.detach().clone().contiguous(),  # (out, groups), lqkit's stored dtype
           "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if p.zero is not None:
        out["weight_zero_point"] = helpers.pack_to_int32(p.zero, s.bits, packed_dim=0)  # int32 (ceil(out·b/32), groups)
    return out


def quantization_config(schemes: dict[str, serving.IntScheme], ignore: list[str]):
    """The compressed-tensors QuantizationConfig (the package's own model): one group per scheme."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by: dict[serving.IntScheme, list[str]] = {}
    for n, s in schemes.items():
        by.setdefault(s, []).append(n)
    groups = {}
    for i, (s, names) in enumerate(by.items()):
        args = QuantizationArgs(num_bits=s.bits, type="int", symmetric=s.symmetric,
                                strategy="group" if s.group_size else "channel", group_size=s.group_size,
                                dynamic=False, actorder=None)
        groups[f"group_{i}"] = QuantizationScheme(targets=[f"re:^(.*\\.)?{re.escape(n)}$" for n in names], weights=args)
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                              ignore=ignore)


def _write_ct(src: Source, tmp: Path) -> dict:
    from compressed_tensors.compressors import ModelCompressor

    helpers = _ct()
    model = src.model
    mods = compressed_modules(model)
    _refuse({n: (m.spec, m.shape) for n, m in mods.items()})
    schemes = {n: serving.scheme(m.spec.quant, m.in_features) for n, m in mods.items()}
    _fused_check(src, schemes)
    packed = {n: _ct_tensors(helpers, n, m, schemes[n]) for n, m in mods.items()}
    tensors, ranks = lora_tensors(model)
    scale_dtypes = sorted({m.spec.quant.scale_dtype for m in mods.values()})
    biases = {n: m.bias for n, m in mods.items()}
    model.to(src.dtype)  # uncompressed tensors in the stored dtype (packed parts were taken above)
    for n in mods:
        b = biases[n].to(src.dtype) if biases[n] is not None else None
        set_submodule(model, n, PackedLinear(packed[n], b))
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.save_pretrained(tmp)
    src.tokenizer.save_pretrained(tmp)
    ModelCompressor(quantization_config=quantization_config(schemes, ignore)).update_config(str(tmp))
    info = {"lora_modules": len(ranks), "ranks": _rank_counts(ranks),
            "schemes": dict(Counter(s.label() for s in schemes.values()))}
    if ranks:
        _write_adapter(tmp / "adapter", tensors, ranks, str(src.out.resolve()), src.tokenizer)
        info["adapter"] = tmp / "adapter"
    (tmp / SERVE_FILE).write_text(serve_md(src, info, ranks, scale_dtypes))
    info["serve"] = tmp / SERVE_FILE
    return info


register(Format("compressed-tensors", _write_ct, _check_ct,
                "HF folder with a compressed-tensors pack-quantized config (vLLM, SGLang) + adapter/ + SERVE.md"))


def load_compressed_tensors(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A compressed-tensors folder as a dense transformers model: each layer's scheme is found by
    compressed-tensors' own matching (``is_match`` on the config groups' targets and ``ignore``) and
    its tensors are decompressed by compressed-tensors' own compressor for the folder's format.

    What the tests and ``bench/export.py`` read exported folders with. transformers' own
    ``from_pretrained`` does the same for folders of one scheme (``CompressedTensorsConfig(
    dequantize=True)``) or of symmetric schemes only; with transformers 5.24 and compressed-tensors
    0.20 it fails on mixed asymmetric folders (the dequantizing load decodes every dense layer with
    the first config group's scheme, and the compressed load builds zero points unpacked)."""
    from accelerate import init_empty_weights
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder).expanduser()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    qc = config.quantization_config
    qc = QuantizationConfig.model_validate(qc if isinstance(qc, dict) else qc.to_dict())
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    for name, module in model.named_modules():
        schemes = [g for g in qc.config_groups.values() if is_match(name, module, g.targets, qc.ignore or ())]
        if len(schemes) > 1:
            raise CheckpointError(f"{folder}: {name} matches {len(schemes)} config groups")
        if schemes:
            parts = {k.removeprefix(f"{name}."): state.pop(k) for k in list(state) if k.startswith(f"{name}.weight_")}
            state[f"{name}.weight"] = compressor.decompress(parts, schemes[0])["weight"]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or left:
        raise CheckpointError(f"{folder}: tensors the model lacks {unexpected[:3]} or never read {left[:3]}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# SERVE.md


def max_lora_rank(ranks: dict[str, int]) -> int:
    """The smallest value vLLM accepts for --max-lora-rank that holds every rank."""
    top = max(ranks.values(), default=1)
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= top), top)


def serve_md(src: Source, info: dict, ranks: dict[str, int], scale_dtypes: list[str]) -> str:
    """How to serve the folder: vLLM, SGLang, transformers (+ peft)."""
    import compressed_tensors

    d, name = str(src.out.resolve()), "lqkit"
    lora = bool(ranks)
    rank = max_lora_rank(ranks)
    vllm = f"vllm serve {d}" + (f" \\\n    --enable-lora --max-lora-rank {rank} --max-loras 1 \\\n"
                                f"    --lora-modules {name}={d}/adapter" if lora else "")
    sgl = f"python -m sglang.launch_server --model-path {d}" + (
        f" \\\n    --enable-lora --max-lora-rank {rank} \\\n    --lora-paths {name}={d}/adapter" if lora else "")
    source = (src.meta.get("extra") or {}).get("source_model", str(src.path))
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(info["schemes"].items()))
    ask = (f"Requests that name the model `{name}` get Q + L·R (the full lqkit model); requests naming the base path "
           "get Q alone." if lora else "The checkpoint has no low-rank part: the folder alone is the whole model.")
    peft = (f"\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(model, \"{d}/adapter\")  # Q + L·R"
            if lora else "")
    small = sorted({s for s in info["schemes"] if not s.startswith(("int4-", "int8-"))})
    kernels = (f"\nSchemes other than 4 and 8 bits ({', '.join(small)}) need a vLLM whose compressed-tensors "
               "WNA16 kernels serve them (the Marlin/Machete kernels of most releases read 4 and 8 bits only); "
               "`lqkit compress --target vllm-marlin` plans for those.\n" if small else "")
    return f"""# Serving this folder

lqkit export of `{source}` (checkpoint `{src.path}`): {info_line(info)}.
Quantized base: compressed-tensors `pack-quantized` (written with compressed-tensors {compressed_tensors.__version__});
uncompressed tensors in {str(src.dtype).removeprefix('torch.')}.{' L·R: PEFT LoRA adapter in `adapter/`.' if lora else ''}

| scheme | layers |
|---|---|
{rows}

## vLLM

```bash
{vllm}
```

{ask}
{kernels}
## SGLang

```bash
{sgl}
```

## transformers (dequantized, CPU or GPU)

```python
from lqkit.export import load_compressed_tensors  # compressed-tensors' own decompressor, per config group
model = load_compressed_tensors("{d}"){peft}
```

`AutoModelForCausalLM.from_pretrained("{d}", quantization_config=CompressedTensorsConfig(dequantize=True))`
reads folders of one scheme the same way; transformers 5.24 with compressed-tensors 0.20 mis-reads
folders that mix schemes (it decodes every layer with the first config group's scheme).

Scales are stored as lqkit keeps them ({', '.join(scale_dtypes)}); a runtime running in bfloat16 rounds
them to bfloat16 (`--dtype float16` keeps float16 scales exact where the model tolerates float16).
"""


def info_line(info: dict) -> str:
    lora = f", LoRA on {info['lora_modules']} layers (ranks {info['ranks']})" if info["lora_modules"] else ""
    return f"{sum(info['schemes'].values())} quantized layers in {len(info['schemes'])} schemes{lora}"

