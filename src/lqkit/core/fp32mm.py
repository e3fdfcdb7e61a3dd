"""Matrix products to fp32 accuracy on tensor cores (pure tensor math).

On a GPU, plain fp32 products run on the CUDA cores, at a fraction of what the tensor cores do in
TF32 (10 mantissa bits). Split each fp32 factor into a TF32 part and the rest, x = x_hi + x_lo
(x_hi: x with its 13 lowest mantissa bits cleared, exactly representable in TF32; x_lo = x − x_hi,
exact, |x_lo| < 2⁻¹⁰·|x|), and a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi: three TF32 products whose
dropped term a_lo·b_lo and rounding of the lo parts are below 2⁻²⁰ of each product, close to what
fp32 itself gives on long sums ("3xTF32", as in CUTLASS). The cost table's metric products (D·E·C
and its Gram matrices, the bulk of its arithmetic) run so on GPUs with TF32 (compute capability ≥
8); everywhere else a plain product.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

COLS_BLOCK = 1 << 26  # elements of the right factor split at once (bounds the split copies)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hi, x_lo) of an fp32 tensor: x_hi exactly representable in TF32, x_hi + x_lo == x."""
    hi = (x.contiguous().view(torch.int32) & -8192).view(torch.float32)
    return hi, x - hi


def _tf32_ok(t: torch.Tensor) -> bool:
    return (t.device.type == "cuda" and t.dtype == torch.float32
            and torch.cuda.get_device_capability(t.device)[0] >= 8)


@contextmanager
def _tf32():
    """TF32 products inside, the user's setting restored after (torch's newer per-backend flag where
    there is one: torch refuses a mix of its older and newer flags)."""
    m = torch.backends.cuda.matmul
    try:
        old, new_api = m.fp32_precision, True
    except (AttributeError, RuntimeError):
        old, new_api = m.allow_tf32, False
    if new_api:
        m.fp32_precision = "tf32"
    else:
        m.allow_tf32 = True
    try:
        yield
    finally:
        if new_api:
            m.fp32_precision = old
        else:
            m.allow_tf32 = old


def _mm3(ah: torch.Tensor, al: torch.Tensor, bh: torch.Tensor, bl: torch.Tensor) -> torch.Tensor:
    out = ah @ bl
    out.addmm_(al, bh)
    return out.addmm_(ah, bh)


def mm(a: torch.Tensor, b: torch.Tensor, force_split: bool = False) -> torch.Tensor:
    """a @ b (fp32, 2-D) to fp32 accuracy; three TF32 products on a GPU that has them.
    ``force_split``: the split products on any device (tests: on a CPU they run in fp32)."""
    if not (force_split or _tf32_ok(a)):
        return a @ b
    ah, al = split(a)
    per = max(1, COLS_BLOCK // max(1, b.shape[0]))
    with _tf32():
        if b.shape[1] <= per:
            return _mm3(ah, al, *split(b))
        out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
        for j in range(0, b.shape[1], per):
            out[:, j:j + per] = _mm3(ah, al, *split(b[:, j:j + per]))
        return out


def gram(b: torch.Tensor, force_split: bool = False) -> torch.Tensor:
    """The smaller Gram matrix of an fp32 b (rows, cols): b·bᵀ if rows ≤ cols, else bᵀ·b; to fp32
    accuracy, on a GPU with TF32 as three products (two of them one product and its transpose)."""
    t = b if b.shape[0] <= b.shape[1] else b.T
    if not (force_split or _tf32_ok(b)):
        return t @ t.T
    hi, lo = split(t)
    with _tf32():
        x = hi @ lo.T
        out = x + x.T
        return out.addmm_(hi, hi.T)
