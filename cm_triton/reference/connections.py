"""Gauge fixes: remove the vertical part of a direction pair (spec §4.6-§4.7).

Generic form. A pair is a per-query factor ``P (Hq, dh, d)`` and a shared factor
``S (Hkv, dh, d)`` with composed maps ``M_h = P_h^T S_{g(h)}``, ``g(h) = h // G``.
QK is ``P = Q, S = K``; OV is ``P = O^T`` (column blocks of ``o_w`` transposed), ``S = V``.
In this form both pairs share one vertical family, ``(X^T P_h, -X S_g)`` per group ``g``
(the spec's OV formulas are these with ``X -> -X``), so one function serves both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cm_triton.reference.primitives import gram

__all__ = ["connect"]


def _group_sum(x: Tensor, groups: int) -> Tensor:
    """``(Hq, ...) -> (Hkv, ...)``: sum over the G query heads of each KV group."""
    return x.view(groups, x.shape[0] // groups, *x.shape[1:]).sum(1)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Per-head Frobenius inner product: ``(H, dh, d), (H, dh, d) -> (H,)``."""
    return (x * y).sum((-2, -1))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den == 0`` (all-zero weights: the vertical space is {0})."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1, den))


def _apply_vertical(p, s, dp, ds, x: Tensor) -> tuple[Tensor, Tensor]:
    """``dP_h <- dP_h - X_g^T P_h``, ``dS_g <- dS_g + X_g S_g`` for ``X (Hkv, dh, dh)``."""
    hkv = s.shape[0]
    g = p.shape[0] // hkv
    xt = x.mT.unsqueeze(1)  # (Hkv, 1, dh, dh), broadcast over the group
    dp_new = dp - (xt @ p.view(hkv, g, *p.shape[1:])).view_as(p)
    return dp_new, ds + x @ s


def _sylvester(a_p: Tensor, a_s: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``A_P X + X A_S = R`` for SPD ``A_P, A_S``: ``(B, n, n) x3 -> (B, n, n)``."""
    alpha, u = torch.linalg.eigh(a_p)
    kappa, v = torch.linalg.eigh(a_s)
    return u @ ((u.mT @ rhs @ v) / (alpha.unsqueeze(-1) + kappa.unsqueeze(-2))) @ v.mT


def connect(
    p: Tensor, s: Tensor, dp: Tensor, ds: Tensor, kind: str, damping: float
) -> tuple[Tensor, Tensor]:
    """Project the direction pair ``(dP, dS)`` onto the horizontal space (spec §4.6).

    Shapes: ``p, dp (Hq, dh, d); s, ds (Hkv, dh, d) -> (dp', ds')`` of the same shapes.
    ``kind`` is one of ``"none", "frobenius", "frobenius_scalar", "scale_aware",
    "scale_aware_scalar"``. Partner Grams are damped by ``damping``; a shared factor's partner
    sums over its group.
    """
    if kind == "none":
        return dp, ds
    hkv, dh = s.shape[0], s.shape[1]
    g = p.shape[0] // hkv
    if kind in ("frobenius", "scale_aware"):
        a_p = gram(p, g, damping)  # (Hkv, dh, dh)
        a_s = gram(s, 1, damping)
        r_p = _group_sum(p @ dp.mT, hkv)  # sum_h P_h dP_h^T
        r_s = ds @ s.mT  # dS S^T
        if kind == "frobenius":
            x = _sylvester(a_p, a_s, r_p - r_s)
        else:
            x = 0.5 * (torch.linalg.solve(a_p, r_p) - torch.linalg.solve(a_s, r_s.mT).mT)
        return _apply_vertical(p, s, dp, ds, x)
    # Scalar connections: X = x I per group.
    pp = _group_sum(_dot(p, p), hkv)
    ss = _dot(s, s)
    pdp = _group_sum(_dot(p, dp), hkv)
    sds = _dot(s, ds)
    if kind == "frobenius_scalar":
        x = _safe_div(pdp - sds, pp + ss + 2 * dh * damping)
    elif kind == "scale_aware_scalar":
        c2_p = pp / dh + damping  # c^2 of the per-query factor (group trace / dh)
        c2_s = ss / dh + damping
        x = _safe_div(c2_s * pdp - c2_p * sds, c2_s * pp + c2_p * ss)
    else:
        raise ValueError(f"unknown connection {kind!r}")
    eye = torch.eye(dh, dtype=p.dtype, device=p.device)
    return _apply_vertical(p, s, dp, ds, x[:, None, None] * eye)
