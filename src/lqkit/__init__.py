"""lqkit: shrink causal LMs with sensitivity-aware low-rank + quantized decomposition."""

__version__ = "0.1.0"
