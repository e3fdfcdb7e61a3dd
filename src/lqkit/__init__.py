"""lqkit: shrink causal LMs with sensitivity-aware low-rank + quantized decomposition."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load an lqkit checkpoint folder as a working ``transformers`` model, ready for ``generate()``
    (keyword arguments as :func:`lqkit.checkpoint.load`: ``dtype``, ``device``, ...)."""
    from .checkpoint import load as _load

    return _load(path, **kwargs)
