"""The per-matrix plan: module name -> MatrixSpec. One object drives surgery, is saved in the
checkpoint and is reported."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Mapping

from torch import nn

from .core.decompose import MatrixSpec
from .core.rotation import for_matrix
from .errors import SpecError
from .nn.surgery import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, find_linears

Plan = dict[str, MatrixSpec]


def uniform_plan(model: nn.Module, spec: MatrixSpec, include: Iterable[str] = DEFAULT_INCLUDE,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE) -> Plan:
    """The same spec for every selected linear layer."""
    names = list(find_linears(model, include, exclude))
    if not names:
        raise no_layer_matches(model)
    return {n: spec for n in names}


def rotated_plan(model: nn.Module, plan: Mapping[str, MatrixSpec], seed: int = 0) -> Plan:
    """``plan`` with every matrix's input rotated, each by its own rotation (:func:`core.rotation.for_matrix`:
    layers of one parent module with one input size share theirs)."""
    return {n: replace(s, rotation=for_matrix(n, model.get_submodule(n).in_features, seed)) for n, s in plan.items()}


def no_layer_matches(model: nn.Module) -> SpecError:
    """The error for include/exclude patterns that select nothing, naming a layer that exists."""
    names = list(find_linears(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE))
    example = f", e.g. --include '{names[0]}'" if names else ""
    return SpecError("no linear layer matches the include/exclude patterns; loosen --include/--exclude "
                     f"(without them: every linear layer but lm_head){example}")


def plan_to_json(plan: Mapping[str, MatrixSpec]) -> dict:
    return {name: spec.to_dict() for name, spec in plan.items()}


def plan_from_json(d: Mapping) -> Plan:
    return {name: MatrixSpec.from_dict(spec) for name, spec in d.items()}
