"""``lqkit::linear``: a prepared compressed layer's forward as one PyTorch custom operator.

``torch.compile`` cannot trace into Triton launches or Python objects holding prepared weights, so a
prepared layer (or a stack of layers that share an input, :mod:`.fuse`) is registered here under an
integer handle, and the compiled graph calls ``torch.ops.lqkit.linear(x, handle, n)``: opaque to the
compiler, with a fake implementation (shape and dtype only) for tracing. The real implementation
calls the registered function: on CUDA the prepared kernel launch, elsewhere whatever was
registered (the torch reference in tests). Inside a CUDA graph the call allocates only its output.

The prepared weights are not operator inputs: the compiled graph holds the handle, and the function
behind it is looked up when the operator runs (during tracing, warm-up and graph recording; replays
of a captured graph do not run Python at all). Registrations are weak: a layer that drops its
prepared state (``.to()``, ``.train()``, ``load_state_dict``, preparing again) frees it, and a graph
compiled before that fails with a message instead of reading freed memory.

``lqkit::rotate`` is a rotated layer's input rotation (:mod:`lqkit.core.rotation`) on the torch path
when compiled: one opaque op (its signs and Hadamard factors are cached tensors, not state the
compiler traces), with a fake implementation and a backward (the inverse rotation). Eagerly,
:func:`rotate` calls the transform itself.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch

from ..core import rotation
from ..core.rotation import Rotation

_FUNCS: "weakref.WeakValueDictionary[int, Callable]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register(fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """A new handle for ``fn`` (x (..., K) -> y (..., n)); held weakly: keep ``fn`` alive yourself."""
    h = next(_HANDLES)
    _FUNCS[h] = fn
    return h


def registered(handle: int) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = _FUNCS.get(handle)
    if fn is None:
        raise RuntimeError(f"lqkit: prepared layer {handle} no longer exists (the model was moved, trained, "
                           "reloaded or prepared again after it was compiled); compile it again")
    return fn


@torch.library.custom_op("lqkit::linear", mutates_args=())
def linear(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    """y (..., n) = the prepared layer ``handle`` applied to x (..., K)."""
    y = registered(handle)(x)
    return y if y.data_ptr() != x.data_ptr() else y.clone()  # an operator's output never aliases its input


@linear.register_fake
def _(x: torch.Tensor, handle: int, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("lqkit::rotate", mutates_args=())
def _rotate(x: torch.Tensor, seed: int, block: int, inverse: bool) -> torch.Tensor:
    """R·x (Rᵀ·x with ``inverse``) along the last dim, R = Rotation(seed, block)."""
    return rotation.rotate_input(x, Rotation(seed, block), inverse)


@_rotate.register_fake
def _(x: torch.Tensor, seed: int, block: int, inverse: bool) -> torch.Tensor:
    return torch.empty_like(x)


def _rotate_backward(ctx, grad: torch.Tensor):
    return _rotate(grad, ctx.seed, ctx.block, not ctx.inverse), None, None, None


def _rotate_setup(ctx, inputs, output) -> None:
    _, ctx.seed, ctx.block, ctx.inverse = inputs


_rotate.register_autograd(_rotate_backward, setup_context=_rotate_setup)


def rotate(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """R·x along the last dim: the ``lqkit::rotate`` op while compiling, else the transform itself."""
    if torch.compiler.is_compiling():
        return _rotate(x, rot.seed, rot.block, False)
    return rotation.rotate_input(x, rot)
