"""Gauge fixes: remove the vertical part of a direction pair (spec §4.6-§4.7).

Generic form. A pair is a per-query factor ``P (Hq, dh, d)`` and a shared factor
``S (Hkv, dh, d)`` with composed maps ``M_h = P_h^T S_{g(h)}``, ``g(h) = h // G``.
QK is ``P = Q, S = K``; OV is ``P = O^T`` (column blocks of ``o_w`` transposed), ``S = V``.
In this form both pairs share one vertical family, ``(X^T P_h, -X S_g)`` per group ``g``
(the spec's OV formulas are these with ``X -> -X``), so one function serves both.

Every connection is dh x dh algebra on Grams (spec §2.2): ``vertical_map`` finds ``X`` from
the weights' Grams ``W W^T`` and their cross-Grams ``W Delta^T`` with the direction, and the
correction is a map on the weights, ``dP_h <- dP_h - X^T P_h``, ``dS_g <- dS_g + X S_g``
(``weight_maps``). ``connect`` is the same on big tensors, for callers that hold them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["connect", "vertical_map", "weight_maps"]


def _trace(x: Tensor) -> Tensor:
    return x.diagonal(dim1=-2, dim2=-1).sum(-1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den == 0`` (all-zero weights: the vertical space is {0})."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1, den))


def _sylvester(a_p: Tensor, a_s: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``A_P X + X A_S = R`` for SPD ``A_P, A_S``: ``(..., n, n) x3 -> (..., n, n)``."""
    alpha, u = torch.linalg.eigh(a_p)
    kappa, v = torch.linalg.eigh(a_s)
    return u @ ((u.mT @ rhs @ v) / (alpha.unsqueeze(-1) + kappa.unsqueeze(-2))) @ v.mT


def vertical_map(
    kind: str, ww_p: Tensor, ww_s: Tensor, wd_p: Tensor, wd_s: Tensor, damping: float
) -> Tensor:
    """The vertical generator ``X`` of a connection (spec §4.6), from Grams only.

    Shapes: ``ww_p = P_h P_h^T``, ``wd_p = P_h dP_h^T`` ``(..., Hq, dh, dh)``; ``ww_s``,
    ``wd_s = S_g dS_g^T`` ``(..., Hkv, dh, dh)`` -> ``X (..., Hkv, dh, dh)``. ``kind`` is one
    of ``"frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar"``. Partner Grams
    are damped by ``damping``; the per-query side sums over its group.
    """
    hkv, dh = ww_s.shape[-3], ww_s.shape[-1]
    g = ww_p.shape[-3] // hkv

    def gsum(x: Tensor) -> Tensor:  # (..., Hq, *t) -> (..., Hkv, *t)
        n = x.dim() - (ww_p.dim() - 3)  # trailing dims after the head axis, plus it
        return x.unflatten(-n, (hkv, g)).sum(-n)

    if kind in ("frobenius", "scale_aware"):
        eye = torch.eye(dh, dtype=ww_s.dtype, device=ww_s.device)
        a_p = gsum(ww_p) + damping * eye
        a_s = ww_s + damping * eye
        r_p = gsum(wd_p)  # sum_h P_h dP_h^T
        r_s = wd_s.mT  # dS S^T
        if kind == "frobenius":
            return _sylvester(a_p, a_s, r_p - r_s)
        return 0.5 * (torch.linalg.solve(a_p, r_p) - torch.linalg.solve(a_s, r_s.mT).mT)
    pp, ss = gsum(_trace(ww_p)), _trace(ww_s)
    pdp, sds = gsum(_trace(wd_p)), _trace(wd_s)
    if kind == "frobenius_scalar":
        x = _safe_div(pdp - sds, pp + ss + 2 * dh * damping)
    elif kind == "scale_aware_scalar":
        c2_p = pp / dh + damping  # c^2 of the per-query factor (group trace / dh)
        c2_s = ss / dh + damping
        x = _safe_div(c2_s * pdp - c2_p * sds, c2_s * pp + c2_p * ss)
    else:
        raise ValueError(f"unknown connection {kind!r}")
    return x[..., None, None] * torch.eye(dh, dtype=ww_s.dtype, device=ww_s.device)


def weight_maps(x: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """The correction as maps on the weights: ``dP_h += E_P,h P_h``, ``dS_g += E_S,g S_g``.

    Shapes: ``x (..., Hkv, dh, dh)`` -> ``E_P = -X_g(h)^T (..., Hq, dh, dh)``, ``E_S = X``.
    """
    return -x.mT.repeat_interleave(g, dim=-3), x


def connect(
    p: Tensor, s: Tensor, dp: Tensor, ds: Tensor, kind: str, damping: float
) -> tuple[Tensor, Tensor]:
    """Project the direction pair ``(dP, dS)`` onto the horizontal space (spec §4.6).

    Shapes: ``p, dp (Hq, dh, d); s, ds (Hkv, dh, d) -> (dp', ds')`` of the same shapes.
    ``kind`` is ``"none"`` or one of ``vertical_map``'s.
    """
    if kind == "none":
        return dp, ds
    x = vertical_map(kind, p @ p.mT, s @ s.mT, p @ dp.mT, s @ ds.mT, damping)
    e_p, e_s = weight_maps(x, p.shape[-3] // s.shape[-3])
    return dp + e_p @ p, ds + e_s @ s
