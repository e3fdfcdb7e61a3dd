"""AdaDim: per matrix, choose whether quantization groups run along the input or the output
dimension by the (sensitivity-)weighted error of the quantized matrix (pure tensor math)."""

from __future__ import annotations

from dataclasses import replace

import torch

from . import quant as qmod
from .quant import QuantSpec
from .stats import MatrixStats, sq_error


def group_dim_errors(w: torch.Tensor, spec: QuantSpec, stats: MatrixStats | None = None,
                     weighting: str = "none") -> dict[str, float]:
    """Weighted squared error of quantizing ``w`` with groups along "in" and along "out"."""
    errs = {}
    for dim in ("in", "out"):
        s = replace(spec, group_dim=dim)
        errs[dim] = float(sq_error(w - qmod.dequantize(qmod.quantize(w, s, stats)), stats, weighting))
    return errs


def choose_group_dim(w: torch.Tensor, spec: QuantSpec, stats: MatrixStats | None = None,
                     weighting: str = "none") -> QuantSpec:
    """``spec`` with the group dim of smaller weighted error (ties: "in")."""
    errs = group_dim_errors(w, spec, stats, weighting)
    return replace(spec, group_dim="in" if errs["in"] <= errs["out"] else "out")
