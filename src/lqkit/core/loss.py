"""Next-token negative log-likelihood in place, without subnormal floats.

``exp`` of logits far below their row's maximum gives subnormal fp32 numbers, which x86 CPUs compute
an order of magnitude slower than normal ones: on a 262k-vocabulary head (gemma-3) the softmax of
512 tokens took 1.1 s instead of 0.1 s. Here every logit is first raised to at least (row max − 80):
its probability (below e⁻⁸⁰ ≈ 2·10⁻³⁵) changes by less than fp32 can show next to the row's sum,
so the loss equals ``F.cross_entropy``'s to fp32 rounding.
"""

from __future__ import annotations

import torch

FLOOR = 80.0  # logits are raised to at least (row max − FLOOR) before exp


def _shifted_exp_(z: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """In place: z ← exp(max(z − top, −FLOOR)); returns z."""
    return z.sub_(top.unsqueeze(-1)).clamp_min_(-FLOOR).exp_()


def nll_inplace(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row NLL of fp32 logits z (n, V) at ``target`` (n,), destroying z (no autograd)."""
    picked = z.gather(1, target[:, None])[:, 0]
    top = z.amax(dim=1)
    return _shifted_exp_(z, top).sum(dim=1).log_() + top - picked
