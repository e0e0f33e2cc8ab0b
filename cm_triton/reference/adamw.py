"""AdamW (Loshchilov & Hutter), decoupled and bias-corrected, for the parameters CM and Muon do
not take (embeddings, heads, norms, biases). Lists of tensors, ``torch._foreach_*`` ops.

The step counts are 0-d float32 tensors on the parameters' device and the bias corrections
are computed from them there (as ``torch.optim.AdamW(capturable=True)`` does), so a step
reads nothing back to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adamw_update"]


def adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place on ``params``, the moments and ``steps`` (equal-length lists
    on one device; each moment of its parameter's shape, each step a 0-d tensor):

    ``t += 1;  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g²;
    p = (1 - lr wd) p - lr m / ((1 - b1^t) (sqrt(v) / sqrt(1 - b2^t) + eps))``.
    """
    if not params:
        return
    b1, b2 = betas
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
    bc1 = torch._foreach_pow(b1, steps)  # b1^t, then 1 - b1^t
    torch._foreach_neg_(bc1)
    torch._foreach_add_(bc1, 1)
    bc2 = torch._foreach_pow(b2, steps)
    torch._foreach_neg_(bc2)
    torch._foreach_add_(bc2, 1)
    torch._foreach_sqrt_(bc2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, bc1)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)
