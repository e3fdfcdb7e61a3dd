"""Sibling compressed layers that read the same input (q/k/v, gate/up) run as one kernel launch.

At batch 1 a decoder's small projections cost mostly fixed per-launch work (the launch, the
low-rank prologue, the split-K reduction), not bytes. :func:`fuse_shared_inputs` finds, by running
the model once, which :class:`CompressedLinear` layers always receive the *same* input tensor, and
ties each such set (same format and input size) to a :class:`SharedInputGroup`: on the kernel path
the first member called computes every member's output in one launch over their stacked weights
(``kernels.stack``) and hands the others theirs when they are called with that same tensor. Any
architecture works (nothing is matched by name); the torch path, training and calls with another
input are unchanged. :func:`unfuse` undoes it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..core import quant as qmod
from . import ops
from .linear import CompressedLinear, KernelRunner, tensors_key

log = logging.getLogger(__name__)
_ATTR = "_shared_input"  # where a member keeps its group (module __dict__, not a submodule or buffer)


class SharedInputGroup:
    """Members computed together: one launch over their stacked weights per shared input."""

    def __init__(self, names: tuple[str, ...], members: list[CompressedLinear]):
        self.names = names
        self.members = members
        self.rotation = members[0].spec.rotation  # shared by every member (_fusable_key): x rotated once
        self.launches = 0  # stacked launches so far, eager calls only (for tests and inspection)
        # outputs for one input not yet handed to every member: (x, x's version, outputs, bit mask of
        # the members served); a plain tuple so that torch.compile traces the hand-out too
        self._pending: tuple | None = None
        self._all = (1 << len(members)) - 1
        self._stack: tuple | None = None  # unprepared: (key, weight, (L, R, bias))
        self._runner = None  # prepared: a KernelRunner over the stacked weight (prepare())
        self._sizes: list[int] = []  # widths of the stacked output's pieces (_set_pieces)
        self._pick: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"SharedInputGroup({' + '.join(self.names)})"

    def forward(self, member: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
        """``member``'s output for ``x`` on the unprepared kernel path (the caller chose it)."""
        i = next(j for j, m in enumerate(self.members) if m is member)
        if any(m.resolve_backend(x) != "triton" for m in self.members if m is not member):
            return member._kernel_forward(x)  # a sibling needs the torch path (e.g. a gradient)
        return self.output(i, x)

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s output for ``x``: handed out if the outputs for this very tensor (same
        object and, eagerly, same in-place version) are pending and ``i`` has not had its one yet,
        else all members' outputs computed now in one call and ``i``'s returned. Compiled, the identity
        test runs at trace time (the version is not traceable), so the graph holds one call per group."""
        compiling = torch.compiler.is_compiling()
        version = 0 if compiling else x._version
        p = self._pending
        if p is not None and p[0] is x and p[1] == version and not (p[3] >> i) & 1:
            served = p[3] | (1 << i)
            self._pending = None if served == self._all else (p[0], version, p[2], served)  # all served: hold nothing
            return p[2][i]
        outs = self._compute(x, compiling)
        self._pending = (x, version, outs, 1 << i)
        return outs[i]

    def _compute(self, x: torch.Tensor, compiling: bool) -> tuple[torch.Tensor, ...]:
        run = self._runner
        if compiling:
            y = ops.linear(x, run.handle, run.n)
        elif run is not None:
            y = run(x)
            self.launches += 1
        else:
            from .. import kernels

            weight, (L, R, bias) = self._stacked()
            rot = None if self.rotation is None else kernels.cached_rotation(self.rotation, x.shape[-1], x.device)
            y = kernels.linear(x, weight, L, R, bias, rotation=rot)
            self.launches += 1
        parts = y.split_with_sizes(self._sizes, -1)  # views: one call for all members
        return parts if self._pick is None else tuple(parts[j] for j in self._pick)

    def _set_pieces(self, offsets: tuple[int, ...], total: int) -> None:
        """How the stacked output splits: the pieces' widths (members and the padding between them)
        and which piece is each member's (None: every piece is a member's, in order)."""
        sizes, pick, at = [], [], 0
        for o, m in zip(offsets, self.members):
            if o > at:
                sizes.append(o - at)
            pick.append(len(sizes))
            sizes.append(m.out_features)
            at = o + m.out_features
        if total > at:
            sizes.append(total - at)
        self._sizes = sizes
        self._pick = None if len(sizes) == len(self.members) else tuple(pick)

    def prepare(self) -> KernelRunner:
        """Build the stack once and tie the members to it: from now on their kernel path checks none of
        their tensors per call (a snapshot: see :func:`lqkit.nn.prepare_for_inference`)."""
        weight, (L, R, bias), offsets = self._build()
        self._set_pieces(offsets, weight.shape[0])
        self._stack = None
        self._runner = KernelRunner(weight, L, R, bias, self.rotation)
        for i, m in enumerate(self.members):
            m.__dict__.update(_runner=self._runner, _group=self, _index=i)
        return self._runner

    def drop_prepared(self) -> None:
        """Back to the unprepared path, for every member (their prepared state is the stack's)."""
        self._runner = None
        self._pending = None
        for m in self.members:
            for key in ("_runner", "_group", "_index"):
                m.__dict__.pop(key, None)

    def _stacked(self):
        """The members' stacked kernel weight and factors, rebuilt only when a member's stored
        tensors change (moved, reloaded, fine-tuned)."""
        key = tensors_key(t for m in self.members for t in (m.qcodes, *m.aux().values(), m.L, m.R, m.bias)
                          if t is not None)
        if self._stack is None or self._stack[0] != key:
            self._stack = None  # free the old stack before building the new one
            weight, factors, offsets = self._build()
            self._set_pieces(offsets, weight.shape[0])
            self._stack = (key, weight, factors)
        return self._stack[1:]

    def _build(self):
        """(stacked weight, (L, R, bias), row offsets) from the members' current tensors."""
        from .. import kernels

        ws = [m.prepare_kernel_weight() for m in self.members]
        weight, offsets = kernels.stack(ws)
        del ws
        with torch.no_grad():
            factors = kernels.stack_factors(
                [m.L.detach() if m.L is not None else None for m in self.members],
                [m.R.detach() if m.R is not None else None for m in self.members],
                [m.bias.detach() if m.bias is not None else None for m in self.members],
                tuple(m.out_features for m in self.members), offsets, weight.shape[0])
        return weight, factors, offsets


def _fusable_key(m: CompressedLinear):
    """Members must agree on this to stack (None: this layer cannot be stacked)."""
    from ..kernels import layout

    k = qmod.kernel_spec(m.spec.quant) if m.spec.quant is not None else None
    if k is None or k.outliers or k.outlier_features or not layout.rows_stack(layout.auto_layout(k), k):
        return None  # exactly kept outliers: a sparse pass of their own, not stacked
    return (k, m.in_features, m.spec.rotation)  # rotated members: one rotation of the shared input


def input_sets(model: nn.Module, names: list[str], *args, **kwargs) -> list[tuple[str, ...]]:
    """Run ``model(*args, **kwargs)`` once (no gradient) and return the sets (model order, two or
    more) of the named modules that received the same input tensor in every call. Nothing is
    matched by name: this is how an architecture's q/k/v and gate/up are found."""
    mods = {name: model.get_submodule(name) for name in names}
    seen: list[tuple[str, torch.Tensor, int]] = []  # the inputs are held, so their ids stay unique
    def hook(name):  # layers called with keyword arguments only are never grouped
        return lambda mod, inp: seen.append((name, inp[0], inp[0]._version)) if inp else None

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in mods.items()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    by_input: dict[tuple[int, int], set[str]] = {}
    for name, x, v in seen:
        by_input.setdefault((id(x), v), set()).add(name)
    partners: dict[str, frozenset[str]] = {}
    for name, x, v in seen:  # who shared every one of this layer's inputs
        s = frozenset(by_input[(id(x), v)])
        partners[name] = s if name not in partners else partners[name] & s
    groups, done = [], set()
    for name in mods:
        s = partners.get(name)
        if s is None or name in done or len(s) < 2 or any(partners.get(o) != s for o in s):
            continue
        done |= s
        groups.append(tuple(n for n in mods if n in s))
    return groups


def find_shared_inputs(model: nn.Module, *args, **kwargs) -> list[tuple[str, ...]]:
    """Run ``model(*args, **kwargs)`` once (no gradient) and return the sets of CompressedLinear
    names that received the same input tensor in every call, split by format (only layers of one
    format and input size stack); sets of one are left out."""
    mods = {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    groups = []
    for s in input_sets(model, list(mods), *args, **kwargs):
        by_key: dict = {}
        for o in s:
            key = _fusable_key(mods[o])
            if key is not None:
                by_key.setdefault(key, []).append(o)
        groups += [tuple(g) for g in by_key.values() if len(g) > 1]
    return groups


def fuse_shared_inputs(model: nn.Module, *args, **kwargs) -> list[SharedInputGroup]:
    """Find the layers that share inputs (:func:`find_shared_inputs`, one forward of ``model`` on
    the example inputs) and tie each set to a :class:`SharedInputGroup`: on the kernel path their
    outputs then come from one launch. Outputs are views into one (…, ΣN) tensor. Returns the groups
    (:func:`unfuse` removes them)."""
    unfuse(model)
    mods = dict(model.named_modules())
    groups = []
    for names in find_shared_inputs(model, *args, **kwargs):
        g = SharedInputGroup(names, [mods[n] for n in names])
        for m in g.members:
            m.__dict__[_ATTR] = g
        groups.append(g)
    log.info("fused %d sets of layers that share an input%s", len(groups),
             f", e.g. {' + '.join(groups[0].names)}" if groups else "")
    return groups


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse_shared_inputs`; returns how many layers were in a group."""
    n = 0
    for m in model.modules():
        if isinstance(m, CompressedLinear) and _ATTR in m.__dict__:
            m.drop_prepared()
            del m.__dict__[_ATTR]
            n += 1
    return n
