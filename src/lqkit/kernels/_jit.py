"""Device helpers shared by the kernels of :mod:`._triton` and :mod:`._frag` (imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _wait(cnt_ptr, need):
    """Spin until the counter reaches ``need`` (prologue programs come first in launch order, so the
    ones counted are running or done)."""
    done = tl.atomic_add(cnt_ptr, 0)
    while done < need:
        done = tl.atomic_add(cnt_ptr, 0)


@triton.jit
def _rx_partial(tid, x_ptr, r_ptr, tp_ptr, M, K, RANK, stride_xm, RP: tl.constexpr, KC_: tl.constexpr):
    """Partial t[m, :] = R[:, chunk]·x[m, chunk] for one (chunk, token) = divmod(tid, M), loaded in
    one round trip, stored as fp32 at tp[(chunk·M + m)·RP + r]."""
    m = tid % M
    c = tid // M
    r_off = tl.arange(0, RP)
    k = c * KC_ + tl.arange(0, KC_)
    xv = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    rv = tl.load(r_ptr + r_off[:, None] * K + k[None, :], mask=(r_off[:, None] < RANK) & (k[None, :] < K),
                 other=0.0).to(tl.float32)
    tl.store(tp_ptr + (c * M + m) * RP + r_off, tl.sum(rv * xv[None, :], axis=1))
