"""The whitened leg ``post · msign(pre · D)`` of CM, in Newton-Schulz or Gram form (spec §2.1).

``pre`` and ``post`` are block-diagonal (one dh x dh root per head block of D's rows), so a
q/k/v row leg, a transposed o column leg, a joint stack and the hybrid O sign are all one
function. In Gram form the whole leg is one ``m x m`` map applied once: ``Delta = T D`` with
``T = post Q pre / nu``, where ``Q`` is the Newton-Schulz polynomial evaluated on the
whitened Gram ``pre (D D^T) pre^T / nu^2``: no whitened operand is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cm_triton.reference.primitives import msign

__all__ = ["GRAM_MIN_ASPECT", "use_gram", "block_diag", "apply_blocks", "whitened_sign"]

# Gram form costs ~8 m^2 n for its passes (two Grams, the restart's apply, the final apply)
# plus 8 m^3 per step (R^2, PQ, PR, (PR)P); iterating on X costs 4 m^2 n + 2 m^3 per step.
# Over 8 steps Gram form is cheaper when 24 m^2 n > 48 m^3, i.e. n > 2 m: the per-head legs
# (n / m = d / dh = 8..64) qualify, the square-ish hybrid O sign does not (spec §2.1).
GRAM_MIN_ASPECT = 2


def use_gram(m: int, n: int, method: str) -> bool:
    """Whether an ``m x n`` sign is evaluated in Gram form under ``ns_method=method``."""
    return method == "gram" and max(m, n) >= GRAM_MIN_ASPECT * min(m, n)


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


def _block_traces(x: Tensor, k: int) -> Tensor:
    """Traces of the k diagonal blocks: ``(B, k*dh, k*dh) -> (B, k)``."""
    return x.diagonal(dim1=-2, dim2=-1).unflatten(-1, (k, -1)).sum(-1)


def whitened_sign(
    d: Tensor,
    pre: Tensor | None,
    post: Tensor | None,
    coefficients: Sequence[tuple[float, float, float]],
    method: str = "ns",
    restart: int = 0,
    dtype: torch.dtype | None = None,
    blocks: int = 1,
) -> tuple[Tensor, Tensor]:
    """``post msign(pre D)`` per batch entry, block-diagonal ``pre``/``post`` (spec §4.1-§4.5).

    Shapes: ``d (B, k*dh, n)`` with ``k = blocks``; ``pre, post (B, k, dh, dh)`` or None ->
    ``delta (B, k*dh, n)`` and ``u_sq (B, k)``: squared Frobenius norms of the dh-row blocks
    of ``msign(pre D)``.
    ``method``: ``"gram"`` evaluates in Gram form where that is cheaper (``use_gram``),
    otherwise Newton-Schulz iterations in ``dtype``.
    """
    from cm_triton.reference import phases  # phases builds on this module

    m, n = d.shape[-2:]
    k = blocks
    gram_form = use_gram(m, n, method)
    if gram_form and m <= n:  # the pipeline's own phases, on one leg of B entries
        d4 = d.unsqueeze(1)
        pre_m = None if pre is None else block_diag(pre).unsqueeze(1)
        t, r = phases.first_maps(d4 @ d4.mT, pre_m, coefficients[:restart])
        if restart:
            r = phases.restart_gram(t, d4, d4, 0.0, False)
        t, _ = phases.last_maps(r, t, None, coefficients[restart:])
        u = t @ d4
        delta = u if post is None else block_diag(post).unsqueeze(1) @ u
        return delta[:, 0], _block_traces(u[:, 0] @ u[:, 0].mT, k)
    w = d if pre is None else apply_blocks(pre, d)
    u = msign(w, coefficients, dtype, "gram" if gram_form else "ns", restart)
    u_sq = u.square().unflatten(-2, (k, -1)).sum((-2, -1))
    return (u if post is None else apply_blocks(post, u)), u_sq
