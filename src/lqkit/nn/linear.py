"""The compressed linear layer: y = x·deq(Q)ᵀ + (x·Rᵀ)·Lᵀ (+ b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core import quant as qmod
from ..core.decompose import Decomposition, MatrixSpec

AUX_PREFIX = "q_"


class CompressedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding W ≈ Q + L·R.

    Buffers: ``qcodes`` (bit-packed uint8 codes) and ``q_<name>`` for each auxiliary tensor of the
    quantizer (scales, offsets, ...), in their stored dtypes. Parameters: ``L`` (out, rank) and
    ``R`` (rank, in) in the compute dtype, and ``bias`` if the original layer had one.
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
        return {name: getattr(self, AUX_PREFIX + name) for name in self.aux_names}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """deq(Q) as an (out, in) matrix, built on the fly (None when there is no Q)."""
        if self.spec.quant is None:
            return None
        return qmod.dequantize_packed(self.qcodes, self.aux(), self.spec.quant, self.shape).to(dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q + L·R as one dense matrix (for export and tests; the forward never builds it)."""
        w = self.dequantized_weight(torch.float32)
        if w is None:
            w = torch.zeros(self.shape, device=self.L.device)
        if self.L is not None:
            w = w + self.L.float() @ self.R.float()
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.spec.quant is not None:
            y = F.linear(x, self.dequantized_weight(x.dtype))  # (..., out)
        if self.L is not None:
            side = F.linear(F.linear(x, self.R.to(x.dtype)), self.L.to(x.dtype))  # (..., r) -> (..., out)
            y = side if y is None else y + side
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.label()}"
