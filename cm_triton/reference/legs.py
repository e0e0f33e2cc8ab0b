"""Block helpers of a leg (spec §2.1): which signs take the Gram form, and block-diagonal maps.

A leg's rows are head blocks of dh rows (one head; joint's group of G + 1; every head of the
hybrid O sign); its whitening maps are block-diagonal, one dh x dh root per block. The leg's
sign itself is ``reference.phases.whitened_sign`` (the pipeline's phases on one leg).
"""

from __future__ import annotations

from torch import Tensor

__all__ = [
    "GRAM_MIN_ASPECT",
    "use_gram",
    "block_diag",
    "apply_blocks",
    "block_traces",
    "gram_route",
]

# Gram form costs ~8 m^2 n for its passes (two Grams, the restart's apply, the final apply)
# plus 8 m^3 per step (R^2, PQ, PR, (PR)P); iterating on X costs 4 m^2 n + 2 m^3 per step.
# Over 8 steps Gram form is cheaper when 24 m^2 n > 48 m^3, i.e. n > 2 m: the per-head legs
# (n / m = d / dh = 8..64) qualify, the square-ish hybrid O sign does not (spec §2.1).
GRAM_MIN_ASPECT = 2


def use_gram(m: int, n: int, method: str) -> bool:
    """Whether an ``m x n`` sign is evaluated in Gram form under ``ns_method=method``."""
    return method == "gram" and max(m, n) >= GRAM_MIN_ASPECT * min(m, n)


def gram_route(rows: int, width: int, method: str) -> bool:
    """Whether a leg of ``rows x width`` takes its sign as a map on D (``T D``, spec §2.1):
    Gram form on the rows' side, so the leg must be wide."""
    return rows <= width and use_gram(rows, width, method)


def block_diag(blocks: Tensor) -> Tensor:
    """``(..., k, dh, dh) -> (..., k*dh, k*dh)``: the block-diagonal matrix of the blocks."""
    *lead, k, dh, _ = blocks.shape
    if k == 1:
        return blocks.reshape(*lead, dh, dh)
    out = blocks.new_zeros(*lead, k, dh, k, dh)
    n = len(lead)
    out.diagonal(dim1=-4, dim2=-2).copy_(blocks.permute(*range(n), n + 1, n + 2, n))
    return out.reshape(*lead, k * dh, k * dh)


def apply_blocks(blocks: Tensor, x: Tensor) -> Tensor:
    """``diag(blocks) @ x``: ``(B, k, dh, dh), (B, k*dh, n) -> (B, k*dh, n)``."""
    k, dh = blocks.shape[-3], blocks.shape[-1]
    return (blocks @ x.unflatten(-2, (k, dh))).flatten(-3, -2)


def block_traces(x: Tensor, k: int) -> Tensor:
    """Traces of the k diagonal blocks: ``(B, k*dh, k*dh) -> (B, k)``."""
    return x.diagonal(dim1=-2, dim2=-1).unflatten(-1, (k, -1)).sum(-1)
