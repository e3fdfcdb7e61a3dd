"""Architecture-free model surgery: find linear layers by module name, swap in compressed ones."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch
from torch import nn

from ..core.decompose import MatrixSpec
from ..errors import SpecError
from .linear import CompressedLinear

DEFAULT_INCLUDE: tuple[str, ...] = (r".",)  # every nn.Linear ...
DEFAULT_EXCLUDE: tuple[str, ...] = (r"(^|\.)lm_head$",)  # ... but the output head


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise SpecError(f"bad {what} pattern {p!r}: {e}; patterns are Python regular expressions") from None
    return out


def find_linears(model: nn.Module, include: Iterable[str] = DEFAULT_INCLUDE,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict[str, nn.Linear]:
    """``nn.Linear`` modules whose name matches an include pattern (``re.search``) and no exclude
    pattern, in model order. A linear whose weight is tied to the input embedding is skipped."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_w = getattr(emb, "weight", None)
    found = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod.weight is emb_w:
            continue
        if any(p.search(name) for p in inc) and not any(p.search(name) for p in exc):
            found[name] = mod
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_plan(model: nn.Module, plan: Mapping[str, MatrixSpec]) -> dict[str, tuple[int, int]]:
    """Check that every planned module is an ``nn.Linear`` whose shape the spec fits; return shapes."""
    shapes = {}
    for name, spec in plan.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise SpecError(f"the plan names module {name!r}, which the model does not have") from None
        if not isinstance(mod, nn.Linear):
            raise SpecError(f"the plan names {name!r}, which is a {type(mod).__name__}, not nn.Linear")
        shape = (mod.out_features, mod.in_features)
        spec.check_shape(shape, name)
        shapes[name] = shape
    return shapes


def build_empty(model: nn.Module, plan: Mapping[str, MatrixSpec], dtype: torch.dtype,
                device: torch.device | str = "meta") -> None:
    """Replace each planned ``nn.Linear`` by an uninitialised CompressedLinear (for loading)."""
    for name, shape in check_plan(model, plan).items():
        old = model.get_submodule(name)
        new = CompressedLinear(plan[name], shape, bias=old.bias is not None, dtype=dtype, device=device)
        set_submodule(model, name, new)


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
