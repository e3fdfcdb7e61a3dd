"""Pictures of a plan: bits per parameter and rank of every compressed matrix, by layer (columns)
and projection type (rows). Needs matplotlib (``pip install 'lqkit[plot]'``)."""

from __future__ import annotations

import io
import logging
import re
from typing import Mapping

import numpy as np

from .core.decompose import MatrixSpec, storage_bits
from .errors import LqkitError

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "<blocks>.<index>.<path inside the block>"


def plan_grid(plan: Mapping[str, MatrixSpec], shapes: Mapping[str, tuple[int, int]]):
    """(layer labels, projection labels, bits/param grid, rank grid, quantizer-label grid); cells
    without a matrix are NaN / empty. Names without a block index form their own column."""
    cells = {}
    for name, spec in plan.items():
        m = _LAYER.match(name)
        layer, proj = (int(m.group(2)), m.group(3)) if m else (-1, name)
        cells[(layer, proj)] = (name, spec)
    layers = sorted({k[0] for k in cells})
    projs = list(dict.fromkeys(k[1] for k in sorted(cells, key=lambda k: (k[1].count("."), k[1]))))
    bits = np.full((len(projs), len(layers)), np.nan)
    rank = np.full_like(bits, np.nan)
    label = np.full(bits.shape, "", dtype=object)
    for (layer, proj), (name, spec) in cells.items():
        i, j = projs.index(proj), layers.index(layer)
        o, n = shapes[name]
        bits[i, j] = storage_bits(spec, (o, n)) / (o * n)
        rank[i, j] = spec.rank
        q = spec.quant
        label[i, j] = f"{q.method}{q.bits}" if q is not None else "lr"
    return [str(x) if x >= 0 else "-" for x in layers], projs, bits, rank, label


def plan_png(plan: Mapping[str, MatrixSpec], shapes: Mapping[str, tuple[int, int]], title: str = "") -> bytes:
    """The plan drawn as a PNG (two heat maps: bits per parameter with the quantizer of each cell,
    and the rank of L·R)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LqkitError("drawing a plan needs matplotlib: pip install 'lqkit[plot]'") from None
    layers, projs, bits, rank, label = plan_grid(plan, shapes)
    w = max(8.0, 0.55 * len(layers) + 3)
    fig, axes = plt.subplots(2, 1, figsize=(w, 1.0 + 0.55 * len(projs) * 2 + 1.5), constrained_layout=True)
    for ax, grid, name, cmap in ((axes[0], bits, "bits per parameter", "viridis"),
                                 (axes[1], rank, "rank of L·R", "magma")):
        im = ax.imshow(grid, aspect="auto", cmap=cmap)
        ax.set_xticks(range(len(layers)), layers, fontsize=8)
        ax.set_yticks(range(len(projs)), projs, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(name, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.9)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isnan(grid[i, j]):
                    continue
                text = label[i, j] if grid is bits else f"{int(grid[i, j])}"
                light = sum(im.cmap(im.norm(grid[i, j]))[:3]) > 1.8  # dark text on light cells
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color="black" if light else "white")
    if title:
        fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
