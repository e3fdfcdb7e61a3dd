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
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch

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
