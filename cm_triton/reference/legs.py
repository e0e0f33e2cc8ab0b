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

from cm_triton.reference.primitives import gram_polynomial, msign

__all__ = ["GRAM_MIN_ASPECT", "use_gram", "block_diag", "apply_blocks", "whitened_map",
           "whitened_sign"]  # fmt: skip

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
    out.diagonal(dim1=-4, dim2=-2).copy_(blocks.permute(*range(len(lead)), 2, 3, 1))
    return out.reshape(*lead, k * dh, k * dh)


def apply_blocks(blocks: Tensor, x: Tensor) -> Tensor:
    """``diag(blocks) @ x``: ``(B, k, dh, dh), (B, k*dh, n) -> (B, k*dh, n)``."""
    k, dh = blocks.shape[-3], blocks.shape[-1]
    return (blocks @ x.unflatten(-2, (k, dh))).flatten(-3, -2)


def _trace(x: Tensor) -> Tensor:
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


def _block_traces(x: Tensor, k: int) -> Tensor:
    """Traces of the k diagonal blocks: ``(B, k*dh, k*dh) -> (B, k)``."""
    return x.diagonal(dim1=-2, dim2=-1).unflatten(-1, (k, -1)).sum(-1)


def whitened_map(
    d: Tensor,
    pre: Tensor | None,
    post: Tensor | None,
    coefficients: Sequence[tuple[float, float, float]],
    restart: int = 0,
    k: int = 1,
) -> tuple[Tensor, Tensor]:
    """The leg's map ``T`` with ``post msign(pre D) = T D``, by the Gram iteration (spec §2.1).

    Shapes: ``d (B, m, n)`` with ``m = k*dh <= n``; ``pre, post (B, k, dh, dh)`` or None (the
    identity) -> ``T (B, m, m)`` and ``u_sq (B, k)``, the squared Frobenius norm of each dh-row
    block of ``msign(pre D)`` (read off the final Gram, for per_mat_renorm).
    """
    s = d @ d.mT
    eye = torch.eye(d.shape[-2], dtype=d.dtype, device=d.device)
    pre_m = eye if pre is None else block_diag(pre)
    r = s if pre is None else pre_m @ s @ pre_m.mT
    # nu = ||pre D||_F 1.01 + 1e-7 = sqrt(tr(pre S pre^T)) 1.01 + 1e-7: msign's normalisation.
    nu = (_trace(r).clamp_min(0).sqrt() * 1.01 + 1e-7)[:, None, None]
    t = pre_m / nu
    r = r / (nu * nu)
    if 0 < restart < len(coefficients):
        q, _ = gram_polynomial(r, coefficients[:restart])
        t = q @ t
        x = t @ d  # the restart's extra pass: X_r = Q_r pre D / nu, formed explicitly
        r = x @ x.mT
        coefficients = coefficients[restart:]
    q, r_final = gram_polynomial(r, coefficients)
    t = q @ t
    if post is not None:
        t = block_diag(post) @ t
    return t, _block_traces(r_final, k)


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
    m, n = d.shape[-2:]
    k = blocks
    gram_form = use_gram(m, n, method)
    if gram_form and m <= n:
        t, u_sq = whitened_map(d, pre, post, coefficients, restart, k)
        return t @ d, u_sq
    w = d if pre is None else apply_blocks(pre, d)
    u = msign(w, coefficients, dtype, "gram" if gram_form else "ns", restart)
    u_sq = u.square().unflatten(-2, (k, -1)).sum((-2, -1))
    return (u if post is None else apply_blocks(post, u)), u_sq
