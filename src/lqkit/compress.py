"""The compression pipeline: apply a plan to a model, matrix by matrix, with reports."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .core import embed
from .core.decompose import MatrixSpec, decompose, storage_bits
from .core.stats import MatrixStats
from .errors import SpecError
from .nn.embedding import quantized_tables
from .nn.linear import CompressedLinear
from .nn.surgery import check_plan, compressed_modules, set_submodule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatrixReport:
    name: str
    shape: tuple[int, int]
    spec: str  # MatrixSpec.label()
    bits: int  # exact stored bits of Q, L, R
    error: float  # relative Frobenius reconstruction error
    iterations: int
    seconds: float
    weighted_error: float | None = None  # relative error under the spec's weighting (if any)

    @property
    def bits_per_param(self) -> float:
        return self.bits / (self.shape[0] * self.shape[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits_per_param"] = self.bits_per_param
        return d


@dataclass(frozen=True)
class SizeSummary:
    compressed_params: int  # weights of the compressed linear layers
    compressed_bits: int  # their exact stored bits (codes, scales, zeros, factors)
    other_params: int  # all other parameters (embeddings, norms, biases, uncompressed layers) but the tables
    other_bits: int  # at the dtype they are kept in
    table_params: int = 0  # entries of the tables stored as quantized rows (embedding, head)
    table_bits: int = 0  # their exact stored bits (codes, scales, offsets)

    @property
    def effective_bits(self) -> float | None:
        """Bits per parameter of the compressed linear layers alone."""
        return self.compressed_bits / self.compressed_params if self.compressed_params else None

    @property
    def model_params(self) -> int:
        return self.compressed_params + self.other_params + self.table_params

    @property
    def model_bits(self) -> int:
        """Every stored bit of the model's tensors."""
        return self.compressed_bits + self.other_bits + self.table_bits

    @property
    def model_bits_per_param(self) -> float | None:
        return self.model_bits / self.model_params if self.model_params else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(effective_bits=self.effective_bits, model_params=self.model_params, model_bits=self.model_bits,
                 model_bits_per_param=self.model_bits_per_param, model_bytes=self.model_bits // 8)
        return d


def needed_stats(plan: Mapping[str, MatrixSpec]) -> set[str]:
    """Which calibration statistics ("h", "fisher") the plan's specs use."""
    need = set()
    for spec in plan.values():
        need |= {"fisher": {"fisher"}, "hessian": {"h"}, "kfac": {"h", "fisher"}}.get(spec.weighting, set())
        q = spec.quant
        if q is not None:
            need |= {"gptq": {"h"}, "nuq": {"fisher"}}.get(q.method, set())
            if q.outliers or q.outlier_features:
                need.add("h")
    return need


def full_fisher(spec: MatrixSpec) -> bool:
    """Whether ``spec`` reads the whole Fisher diagonal (nuq's codebooks, outliers chosen by |w|·√F,
    the "fisher" objective), not only its row and column sums."""
    q = spec.quant
    return spec.weighting == "fisher" or (q is not None and (q.method == "nuq" or bool(q.outliers)))


def check_stats(plan: Mapping[str, MatrixSpec | set[str]], stats) -> None:
    """Fail before any work when ``stats`` lack what a planned matrix needs (its spec's needs, or
    the given set of "h" / "fisher")."""
    for name, spec in plan.items():
        need = spec if isinstance(spec, set) else needed_stats({name: spec})
        ms = stats.get(name) if stats is not None else None
        missing = [k for k in sorted(need) if getattr(ms, k, None) is None]
        if missing:
            what = " and ".join({"h": "input second moments (H)", "fisher": "a Fisher diagonal"}[k] for k in missing)
            label = spec.label() if isinstance(spec, MatrixSpec) else "the budget allocation"
            raise SpecError(f"{name} ({label}) needs {what}, which the calibration statistics lack; "
                            "drop --stats (lqkit computes what it needs) or recompute the file with `lqkit calibrate "
                            "--out stats.safetensors --overwrite` (without --no-fisher)")


def compress_model(model: nn.Module, plan: Mapping[str, MatrixSpec], *, device: str | None = None,
                   progress: bool = True, stats=None, sequential: torch.Tensor | None = None
                   ) -> dict[str, MatrixReport]:
    """Replace each planned linear layer of ``model`` (in place) by its CompressedLinear.

    ``device``: where decompositions run (e.g. "cuda"); the result is moved back to the layer's device.
    ``stats``: calibration statistics with ``get(name) -> MatrixStats | None`` (e.g.
    :class:`lqkit.calibrate.CalibrationStats`), for data-aware quantizers and weightings.
    ``sequential``: calibration token ids (samples, seqlen). The model is then compressed one decoder
    block at a time and each block's input second moments H are recomputed from what the already
    compressed blocks produce (GPTQ's sequential mode: later layers correct for the errors of earlier
    ones); the Fisher diagonal stays that of ``stats``. Layers outside the blocks use ``stats``.
    """
    from .calibrate import hessians

    check_plan(model, plan)  # fail on a bad plan before any work
    check_stats(plan, stats)
    reports: dict[str, MatrixReport] = {}
    bar = tqdm(total=len(plan), desc="compress", unit="matrix", disable=not progress)

    def one(name: str, ms: MatrixStats | None) -> None:
        reports[name] = _compress_one(model, name, plan[name], ms, device)
        bar.update()

    if sequential is not None:
        def on_block(k: int, acc) -> None:
            for name in acc.linears:
                base = stats.get(name) if stats is not None else None
                one(name, MatrixStats(h=acc.mean(name), fisher=base.fisher if base is not None else None))

        hessians(model, sequential, list(plan), progress=False, on_block=on_block)
    for name in plan:
        if name not in reports:
            one(name, stats.get(name) if stats is not None else None)
    bar.close()
    return {n: reports[n] for n in plan}


def _compress_one(model: nn.Module, name: str, spec: MatrixSpec, ms: MatrixStats | None, device) -> MatrixReport:
    lin = model.get_submodule(name)
    home, dtype = lin.weight.device, lin.weight.dtype
    t0 = time.time()
    d = decompose(lin.weight.detach().to(device or home), spec, ms)
    if not math.isfinite(d.error):
        raise SpecError(f"compressing {name} with {spec.label()} gave a non-finite reconstruction; "
                        "its weights or calibration statistics contain NaN/inf")
    bias = lin.bias.detach().to(device or home) if lin.bias is not None else None
    new = CompressedLinear.from_decomposition(d, bias, dtype=dtype).to(home)
    set_submodule(model, name, new)
    report = MatrixReport(name, d.shape, d.spec.label(), d.nbits, d.error, len(d.history), time.time() - t0,
                          d.weighted_error)
    log.debug("%s %s error=%.4f bits/param=%.3f", name, spec.label(), d.error, report.bits_per_param)
    return report


def size_summary(model: nn.Module) -> SizeSummary:
    """Exact storage of the compressed layers and of everything else (tied tensors counted once)."""
    comp = compressed_modules(model)
    cparams = sum(m.in_features * m.out_features for m in comp.values())
    cbits = sum(storage_bits(m.spec, m.shape) for m in comp.values())
    inside = {id(t) for m in comp.values() for t in (m.L, m.R) if t is not None}
    tables = quantized_tables(model)
    tparams = sum(t.shape[0] * t.shape[1] for t in tables.values())
    tbits = sum(embed.storage_bits(t.spec, t.shape) for t in tables.values())
    seen, oparams, obits = set(), 0, 0
    for t in model.parameters():
        key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
        if id(t) in inside or key in seen:
            continue
        seen.add(key)
        oparams += t.numel()
        obits += t.numel() * t.element_size() * 8
    return SizeSummary(cparams, cbits, oparams, obits, tparams, tbits)
