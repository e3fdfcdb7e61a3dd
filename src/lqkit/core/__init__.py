"""Pure tensor math: quantizers, packing, low-rank factorisations, decompositions.

Nothing here touches modules, files or the console.
"""

from .decompose import DECOMPOSERS, Decomposition, MatrixSpec, decompose, storage_bits
from .lowrank import LowRank, truncated_svd
from .quant import QUANTIZERS, QTensor, QuantSpec, dequantize, quantize
from .stats import MatrixStats

__all__ = [
    "DECOMPOSERS", "Decomposition", "MatrixSpec", "decompose", "storage_bits",
    "LowRank", "truncated_svd", "QUANTIZERS", "QTensor", "QuantSpec", "dequantize", "quantize",
    "MatrixStats",
]
