"""Quantized embedding tables and output heads (per-row codes and scales, :mod:`lqkit.core.embed`).

- :class:`QuantizedEmbedding` replaces an ``nn.Embedding``: a lookup unpacks only the rows it reads,
  times the module's embedding scale (e.g. Gemma's √hidden, kept from the module it replaces).
- :class:`QuantizedHead` replaces an untied output head (``nn.Linear`` without bias): ``x·deq(W)ᵀ``.
- :class:`TiedHead` replaces a head tied to the embedding: it holds no tensor of its own and computes
  with the embedding's table, so a tied model stays tied and the table is stored once.

The heads dequantize their table to the compute dtype once and keep it (like the dense deq(Q) of
CompressedLinear on the CPU: the memory an uncompressed head takes); ``.to()``/``.train()`` drop it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core import embed as emb
from ..core.embed import QRows, RowSpec
from ..errors import SpecError


class _RowTable(nn.Module):
    """Buffers ``codes``, ``scales`` (and ``offsets``) of a (rows, dim) table in their stored dtypes."""

    def __init__(self, spec: RowSpec, shape: tuple[int, int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        spec.check_shape(shape)
        self.spec, self.shape, self.dtype = spec, tuple(shape), dtype
        for name, (shp, dt) in emb.layout(spec, shape).items():
            self.register_buffer(name, torch.empty(shp, dtype=dt, device=device))
        if spec.symmetric:
            self.offsets = None
        self._dense: torch.Tensor | None = None

    def qrows(self) -> QRows:
        return QRows(self.spec, self.codes, self.scales, self.offsets)

    def load_qrows(self, q: QRows) -> None:
        with torch.no_grad():
            for name in emb.layout(self.spec, self.shape):
                getattr(self, name).copy_(getattr(q, name))

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole table in ``dtype``; kept for later calls in eval mode without grad."""
        if self._dense is not None and self._dense.dtype == dtype:
            return self._dense
        w = emb.dequantize(self.qrows(), dtype=dtype)
        if not self.training and not torch.is_grad_enabled():
            self._dense = w
        return w

    def _apply(self, fn, recurse: bool = True):
        self._dense = None
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self._dense = None
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, {self.spec.label()}"


class QuantizedEmbedding(_RowTable):
    """``nn.Embedding`` from per-row quantized codes: ``deq(W)[ids]·embed_scale``."""

    def __init__(self, spec: RowSpec, shape: tuple[int, int], embed_scale: float = 1.0, **kw):
        super().__init__(spec, shape, **kw)
        self.embed_scale = float(embed_scale)
        self.num_embeddings, self.embedding_dim = self.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = emb.dequantize(self.qrows(), ids, dtype=self.dtype)  # (*ids.shape, dim)
        return out * self.embed_scale if self.embed_scale != 1.0 else out


class QuantizedHead(_RowTable):
    """An output head (``nn.Linear`` without bias) from per-row quantized codes: ``x·deq(W)ᵀ``."""

    def __init__(self, spec: RowSpec, shape: tuple[int, int], **kw):
        super().__init__(spec, shape, **kw)
        self.out_features, self.in_features = self.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(x.dtype))


class TiedHead(nn.Module):
    """A head tied to a :class:`QuantizedEmbedding`: ``x·deq(W)ᵀ`` with the embedding's table (held as
    a plain reference, not a submodule: nothing of it is stored or listed twice)."""

    def __init__(self, table: QuantizedEmbedding):
        super().__init__()
        self.__dict__["table"] = table
        self.out_features, self.in_features = table.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.table.dense(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to the quantized embedding ({self.table.extra_repr()})"


def embed_scale(module: nn.Module) -> float:
    """The factor an embedding module multiplies its rows by (Gemma's ``embed_scale``; else 1)."""
    s = getattr(module, "embed_scale", 1.0)
    return float(s.float().item() if isinstance(s, torch.Tensor) else s)


def quantized_tables(model: nn.Module) -> dict[str, _RowTable]:
    """The quantized tables of ``model`` by module name (heads tied to one are not listed)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _RowTable)}


def tied_heads(model: nn.Module) -> dict[str, str]:
    """{head: the quantized table it computes with} of ``model``'s :class:`TiedHead` modules."""
    names = {id(m): n for n, m in model.named_modules()}
    return {n: names[id(m.table)] for n, m in model.named_modules() if isinstance(m, TiedHead)}


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _table_module(old: nn.Module, name: str, spec: RowSpec, dtype, device) -> _RowTable:
    if isinstance(old, nn.Embedding):
        return QuantizedEmbedding(spec, tuple(old.weight.shape), embed_scale(old), dtype=dtype, device=device)
    if isinstance(old, nn.Linear) and old.bias is None:
        return QuantizedHead(spec, (old.out_features, old.in_features), dtype=dtype, device=device)
    raise SpecError(f"the table plan names {name!r}, a {type(old).__name__}; only nn.Embedding and an output head "
                    "(nn.Linear without bias) can be stored as quantized rows")


def build_tables(model: nn.Module, tables: Mapping[str, RowSpec], tied: Mapping[str, str], *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "meta",
                 quantize: bool = False) -> None:
    """Replace each table named in ``tables`` by its quantized module — with ``quantize`` from the
    module's current weight, else empty (for loading) — and each head in ``tied`` (head -> table) by a
    :class:`TiedHead` of that table."""
    for name, spec in tables.items():
        old = model.get_submodule(name)
        if quantize:
            w = old.weight.detach()
            new = _table_module(old, name, spec, dtype, w.device)
            new.load_qrows(emb.quantize(w, spec))
        else:
            new = _table_module(old, name, spec, dtype, device)
        _set(model, name, new)
    for head, table in tied.items():
        target = model.get_submodule(table)
        if not isinstance(target, QuantizedEmbedding):
            raise SpecError(f"{head!r} is tied to {table!r}, which is not a quantized embedding")
        _set(model, head, TiedHead(target))
