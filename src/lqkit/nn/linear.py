"""The compressed linear layer: y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ (+ b), with x first rotated (x ← Rot·x)
when its spec has a rotation (then Q, L and R are those of W·Rotᵀ)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..core import quant as qmod
from ..core.decompose import Decomposition, MatrixSpec
from ..core.rotation import unrotate_weight
from ..errors import SpecError
from . import ops

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "triton")  # auto: fused Triton kernels on CUDA when available
_LOGGED: set[tuple] = set()  # (shape, format, backend) already announced at INFO

AUX_PREFIX = "q_"


class CompressedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding W ≈ Q + L·R.

    Buffers: ``qcodes`` (bit-packed uint8 codes) and ``q_<name>`` for each auxiliary tensor of the
    quantizer (scales, offsets, ...), in their stored dtypes. Parameters: ``L`` (out, rank) and
    ``R`` (rank, in) in the compute dtype, and ``bias`` if the original layer had one. With a rotation
    (``spec.rotation``), Q, L and R are those of W·Rotᵀ and every path rotates x first: nothing more is
    stored (the rotation is its seed and block, in the plan).
    """

    def __init__(self, spec: MatrixSpec, shape: tuple[int, int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        spec.check_shape(shape)
        self.spec = spec
        self.out_features, self.in_features = shape
        self.aux_names: tuple[str, ...] = ()
        if spec.quant is not None:
            slot = qmod.packed_layout(spec.quant, shape)
            self.register_buffer("qcodes", torch.empty(slot.shape, dtype=slot.dtype, device=device))
            layout = qmod.aux_layout(spec.quant, shape)
            for name, s in layout.items():
                self.register_buffer(AUX_PREFIX + name, torch.empty(s.shape, dtype=s.dtype, device=device))
            self.aux_names = tuple(layout)
        if spec.rank:
            self.L = nn.Parameter(torch.empty(shape[0], spec.rank, dtype=dtype, device=device))  # (out, r)
            self.R = nn.Parameter(torch.empty(spec.rank, shape[1], dtype=dtype, device=device))  # (r, in)
        else:
            self.L = self.R = None
        self.bias = nn.Parameter(torch.empty(shape[0], dtype=dtype, device=device)) if bias else None
        self._dense_q: torch.Tensor | None = None  # deq(Q) kept dense: materialized(), or prepared on the CPU

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_decomposition(cls, d: Decomposition, bias: torch.Tensor | None = None,
                           dtype: torch.dtype = torch.float32) -> "CompressedLinear":
        device = (d.q.packed if d.q is not None else d.L).device
        m = cls(d.spec, d.shape, bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            if d.q is not None:
                m.qcodes.copy_(d.q.packed)
                for name in m.aux_names:
                    getattr(m, AUX_PREFIX + name).copy_(d.q.aux[name])
            if d.L is not None:
                m.L.copy_(d.L)
                m.R.copy_(d.R)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def aux(self) -> dict[str, torch.Tensor]:
        """The stored auxiliary tensors of Q, by name (what the checkpoint holds; their readers rebuild
        offsets from stored integer zero points themselves: lqkit.core.quant.quant_params)."""
        return {name: getattr(self, AUX_PREFIX + name) for name in self.aux_names}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """deq(Q) as an (out, in) matrix, built on the fly (None when there is no Q); of the rotated
        matrix when the layer has a rotation (it multiplies the rotated input)."""
        if self.spec.quant is None:
            return None
        return qmod.dequantize_packed(self.qcodes, self.aux(), self.spec.quant, self.shape).to(dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) matrix the layer applies to x: Q + L·R, rotated back ((Q + L·R)·Rot) for a
        rotated layer (for export and tests; the forward never builds it)."""
        w = self.dequantized_weight(torch.float32)
        if w is None:
            w = torch.zeros(self.shape, device=self.L.device)
        if self.L is not None:
            w = w + self.L.float() @ self.R.float()
        if self.spec.rotation is not None:
            w = unrotate_weight(w, self.spec.rotation)
        return w.to(dtype)

    # prepared for inference (lqkit.nn.prepare_for_inference; kept in the instance __dict__, never saved):
    _runner = None  # the kernels' prepared call (KernelRunner), or its stack's when the layer is in one
    _group = None  # the SharedInputGroup whose stacked call computes this layer's output, if any
    _index = 0  # this layer's place in that group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._runner
        if run is not None and x.device == run.device and not (torch.is_grad_enabled() and self._grad_needed(x)):
            if self._group is not None:
                return self._group.output(self._index, x)
            if torch.compiler.is_compiling():  # the graph holds one opaque op per layer (lqkit.nn.ops)
                return ops.linear(x, run.handle, self.out_features)
            return run(x)
        return self._forward(x)

    def _grad_needed(self, x: torch.Tensor) -> bool:
        """Whether a call on x needs a backward: x, L, R, bias or a quantization parameter put in as a
        trainable tensor (lqkit.distill's scales) requires grad; the kernels have none."""
        return x.requires_grad or any(p.requires_grad for p in (self.L, self.R, self.bias) if p is not None) or any(
            getattr(self, AUX_PREFIX + n).requires_grad for n in self.aux_names)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unprepared path: the kernels through :meth:`resolve_backend` (checked every call), or torch."""
        if self.resolve_backend(x) == "triton":
            group = self.__dict__.get("_shared_input")  # nn.fuse: siblings computed in one launch
            return group.forward(self, x) if group is not None else self._kernel_forward(x)
        if self.spec.rotation is not None:
            x = ops.rotate(x, self.spec.rotation)  # (..., in)
        y = None
        if self.spec.quant is not None:
            w = self._dense_q if self._dense_q is not None else self.dequantized_weight(x.dtype)
            y = F.linear(x, w.to(x.dtype))  # (..., out)
        if self.L is not None:
            side = F.linear(F.linear(x, self.R.to(x.dtype)), self.L.to(x.dtype))  # (..., r) -> (..., out)
            y = side if y is None else y + side
        return y if self.bias is None else y + self.bias.to(x.dtype)

    # -- optional fused-kernel dispatch (lqkit.kernels); the torch path above stays the reference --

    backend: str = "auto"  # "auto" | "torch" | "triton"; set per module to force a path

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The path a call on ``x`` takes: "triton" (fused kernels) or "torch"."""
        if self.backend not in BACKENDS:
            raise SpecError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        chosen = "torch"
        if torch.compiler.is_compiling():  # an unprepared layer compiles as its torch path
            return "torch" if self.backend != "triton" else self._no_compiled_kernels()
        if self.backend != "torch" and self.spec.quant is not None:
            from .. import kernels

            # formats the kernels do not read (a quantizer without a kernel format) take the torch path
            usable = x.is_cuda and kernels.available() and qmod.kernel_spec(self.spec.quant) is not None
            grad = torch.is_grad_enabled() and self._grad_needed(x)
            if self.backend == "triton" and not usable:
                raise RuntimeError("backend 'triton' needs a CUDA input and triton installed")
            if self.backend == "triton" and grad:
                raise RuntimeError("the triton kernels have no backward; use torch.no_grad() or backend 'torch'")
            chosen = "triton" if usable and not grad else "torch"
        if self.__dict__.get("_logged_backend") != chosen:
            self.__dict__["_logged_backend"] = chosen
            # INFO once per (shape, format, backend) in the process, DEBUG for every further layer
            key = (self.shape, self.spec.label(), chosen)
            level = logging.DEBUG if key in _LOGGED else logging.INFO
            _LOGGED.add(key)
            how = chosen
            if chosen == "triton":
                from .. import kernels

                how += f" ({kernels.auto_layout(qmod.kernel_spec(self.spec.quant))} layout)"
            log.log(level, "CompressedLinear(%dx%d, %s): backend %s", *self.shape, self.spec.label(), how)
        return chosen

    def _no_compiled_kernels(self) -> str:
        raise RuntimeError("torch.compile reaches the triton kernels only through a prepared model: call "
                           "lqkit.nn.prepare_for_inference(model) before compiling")

    def drop_prepared(self) -> None:
        """Forget what :func:`lqkit.nn.prepare_for_inference` kept (kernel calls, the stack of the layers
        sharing this layer's input, a dense deq(Q)); the unprepared paths take over."""
        for key in ("_runner", "_group", "_index"):
            self.__dict__.pop(key, None)
        self._dense_q = None
        group = self.__dict__.get("_shared_input")
        if group is not None:
            group.drop_prepared()

    # prepared state is a snapshot for inference: moving or converting the layer, training it or loading
    # new tensors into it drops it (prepare again afterwards)
    def _apply(self, fn, recurse: bool = True):
        self.drop_prepared()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if mode:
            self.drop_prepared()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_prepared()
        return super()._load_from_state_dict(*args, **kwargs)

    def kernel_weight(self):
        """Q in the kernels' layout, prepared once and rebuilt only when the stored buffers change
        (moved to another device, reloaded)."""
        key = tensors_key((self.qcodes, *self.aux().values()))
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.prepare_kernel_weight())
            self.__dict__["_kernel_cache"] = cached
        return cached[1]

    def prepare_kernel_weight(self):
        """Q converted into the kernels' layout now, on the buffers' device (not cached)."""
        from .. import kernels

        return kernels.prepare(self.qcodes, self.aux(), qmod.kernel_spec(self.spec.quant), self.shape,
                               self.qcodes.device)

    def prepare_runner(self) -> "KernelRunner":
        """Prepare this layer's kernel call (its layout, built now; calls bound on first use) and take
        it from now on: no per-call checks or lookups (a snapshot, see lqkit.nn.prepare_for_inference)."""
        run = KernelRunner(self.prepare_kernel_weight(), self.L, self.R, self.bias, self.spec.rotation)
        self.__dict__["_runner"] = run
        return run

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from .. import kernels

        rot = None
        if self.spec.rotation is not None:  # as a prepared layer: one launch of its own before the GEMV's
            rot = kernels.cached_rotation(self.spec.rotation, self.in_features, x.device)
        return kernels.linear(x, self.kernel_weight(), self.L, self.R, self.bias, rotation=rot)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.label()}"


class KernelRunner:
    """A matrix (one layer's, or the stack of layers sharing an input) prepared for the kernels: its
    weight in their layout, L, R and bias, its input rotation if any, and per (tokens, dtype) one call
    bound on first use (``kernels.bind``: configuration, plan and compiled kernel fixed). Registered for
    the compiled graph's op under ``handle`` (lqkit.nn.ops). A call: one dictionary lookup, y allocated
    in its final shape, one launch; a rotated layer's rotation of x (its signs and factors kept on the
    device) is one launch more, planned with the GEMV's at one token."""

    def __init__(self, kw, L: torch.Tensor | None, R: torch.Tensor | None, bias: torch.Tensor | None,
                 rotation=None):
        self.kw = kw
        self.L, self.R, self.bias = (t.detach() if t is not None else None for t in (L, R, bias))
        self.n, self.k = kw.shape
        self.device = kw.device
        if rotation is not None:  # one launch where the kernels run (kernels.rotation)
            from .. import kernels

            self.rotate = kernels.rotation(rotation, self.k, self.device)
        else:
            self.rotate = None
        self.calls: dict[tuple[torch.Size, torch.dtype], tuple] = {}  # (x's shape, dtype) -> (bound call, y's shape,
        # the rotation launched before it, None where the launch rotates or there is none)
        self.handle = ops.register(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        call = self.calls.get((x.shape, x.dtype))
        if call is not None:
            bound, shape, rotate = call
            if rotate is not None:
                x = rotate(x)  # a new contiguous tensor
            elif not x.is_contiguous() or x.data_ptr() % 16:  # the bound launch reads rows back to back, aligned
                x = x.clone(memory_format=torch.contiguous_format)
            return bound(x, shape)
        return self._first(x)

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        """The first call for x's shape and dtype: bound, with the rotation's launch planned with the
        kernel's where it takes it (one token: ``kernels.plans_rotation``), else the rotation run
        before the bound call."""
        from .. import kernels

        key = (x.shape, x.dtype)
        m = x.numel() // self.k if self.k else 0
        planned = self.rotate is not None and kernels.plans_rotation(self.kw, m, x.dtype, self.rotate,
                                                                     has_lr=self.L is not None and self.L.shape[1] > 0)
        rotate = self.rotate if self.rotate is not None and not planned else None
        if rotate is not None:
            x = rotate(x)
        if not x.is_contiguous() or x.data_ptr() % 16:
            x = x.clone(memory_format=torch.contiguous_format)
        shape = (*x.shape[:-1], self.n)
        bound, y = self._bind(x.view(-1, self.k), self.rotate if planned else None)
        self.calls[key] = (bound, shape, rotate)
        return y.view(shape)

    def _bind(self, x2: torch.Tensor, rotation=None):
        """The first call for this token count: bound by kernels.bind. On a GPU that runs on a side stream
        unless a CUDA graph is being captured, so that the plan's lasting scratch is never allocated from a
        memory pool routed to the current stream (CUDA-graph trees warm up their graphs in such a pool,
        and may hand its blocks out again)."""
        from .. import kernels

        if x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return kernels.bind(x2, self.kw, self.L, self.R, self.bias, rotation=rotation)
        cur = torch.cuda.current_stream(x2.device)
        side = _side_stream(x2.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            f, y = kernels.bind(x2, self.kw, self.L, self.R, self.bias, rotation=rotation)
        cur.wait_stream(side)
        x2.record_stream(side)
        y.record_stream(cur)
        return f, y


_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def tensors_key(ts) -> tuple:
    """Identifies the current contents of these tensors (device, storage, in-place version): a cache
    keyed on it is rebuilt when one is moved, reloaded or changed in place."""
    return tuple((t.device, t.data_ptr(), t._version) for t in ts)


@contextmanager
def materialized(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Within the block, each CompressedLinear of ``model`` keeps deq(Q) as a dense matrix instead of
    dequantizing on every call: same outputs, faster repeated forwards (e.g. evaluation), at the
    memory cost of the dense weights. Removed again on exit."""
    mods = [m for m in model.modules() if isinstance(m, CompressedLinear) and m.spec.quant is not None]
    before = [m._dense_q for m in mods]  # a dense deq(Q) kept by prepare_for_inference stays
    try:
        for m in mods:
            m._dense_q = m.dequantized_weight(dtype)
        yield
    finally:
        for m, w in zip(mods, before):
            m._dense_q = w
