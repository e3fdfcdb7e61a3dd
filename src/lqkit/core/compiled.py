"""Elementwise chains fused by ``torch.compile`` on the CPU (pure tensor math).

A few hot functions of the cost table (the clip search of every rtn / GPTQ group, the GPTQ column
step) are chains of elementwise passes over large tensors; eagerly each pass reads and writes the
whole tensor. On a CPU, inductor fuses such a chain into one vectorised C++ loop (the clip search:
~10× faster measured on one core). :func:`cpu_compiled` wraps a function so that calls whose tensors
all live on the CPU run its compiled form, and everything else (GPU tensors, ``LQKIT_COMPILE=0``, a
machine where compiling fails, e.g. without a C++ compiler) runs it eagerly, with the same results
up to the order of floating-point sums. The compiled code is cached on disk by torch (one compile
per function and argument kind, seconds, on a machine's first use)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable)
_FAILED: set[str] = set()


def enabled() -> bool:
    return os.environ.get("LQKIT_COMPILE", "1") != "0" and not _FAILED


def cpu_compiled(fn: F) -> F:
    """``fn`` (tensor arguments first) compiled for CPU tensors, eager otherwise and as fallback."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if (not enabled() or torch.compiler.is_compiling()
                or any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)):
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a toolchain problem must not stop the work: run eagerly
            _FAILED.add(fn.__qualname__)
            log.warning("torch.compile of %s failed (%s: %s); running it eagerly from now on (LQKIT_COMPILE=0 "
                        "skips compiling)", fn.__qualname__, type(e).__name__, str(e).splitlines()[0][:200])
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
