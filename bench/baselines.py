"""Muon in fp32, as ``torch.optim.Muon`` computes it but without its bf16 cast: the like-for-
like CPU yardstick (a CPU may run bf16 matmuls far slower than fp32, or faster).

Same algorithm as torch 2.13's ``torch/optim/_muon.py``: momentum ``B <- mu B + g``, nesterov
``g + mu B``, 5 Newton-Schulz steps of ``(3.4445, -4.7750, 2.0315)`` on the wide orientation
after dividing by the Frobenius norm, decoupled weight decay, lr scaled by
``sqrt(max(1, rows/cols))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MUON_ABC = (3.4445, -4.7750, 2.0315)


def newton_schulz_fp32(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    a, b, c = MUON_ABC
    x = g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


class MuonFP32:
    """``torch.optim.Muon``'s step in fp32 over a list of 2-D parameters."""

    def __init__(self, params: list[Tensor], lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        self.params, self.lr, self.mu, self.wd = list(params), lr, momentum, weight_decay
        self.bufs = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.bufs):
            g = p.grad
            buf.mul_(self.mu).add_(g)
            o = newton_schulz_fp32(g.add(buf, alpha=self.mu))
            p.mul_(1 - self.lr * self.wd)
            p.add_(o, alpha=-self.lr * math.sqrt(max(1, p.shape[0] / p.shape[1])))
