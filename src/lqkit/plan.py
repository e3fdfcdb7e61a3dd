"""The per-matrix plan: module name -> MatrixSpec. One object drives surgery, is saved in the
checkpoint and is reported."""

from __future__ import annotations

from typing import Iterable, Mapping

from torch import nn

from .core.decompose import MatrixSpec
from .errors import SpecError
from .nn.surgery import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, find_linears

Plan = dict[str, MatrixSpec]


def uniform_plan(model: nn.Module, spec: MatrixSpec, include: Iterable[str] = DEFAULT_INCLUDE,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE) -> Plan:
    """The same spec for every selected linear layer."""
    names = list(find_linears(model, include, exclude))
    if not names:
        raise SpecError("no linear layer matches the include/exclude patterns; loosen --include/--exclude")
    return {n: spec for n in names}


def plan_to_json(plan: Mapping[str, MatrixSpec]) -> dict:
    return {name: spec.to_dict() for name, spec in plan.items()}


def plan_from_json(d: Mapping) -> Plan:
    return {name: MatrixSpec.from_dict(spec) for name, spec in d.items()}
