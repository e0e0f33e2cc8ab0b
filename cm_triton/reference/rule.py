"""The Compositional Muon rule for one attention pair, every variant (spec §3-§4).

Generic form (see ``connections``): a per-query factor ``P (Hq, dh, d)`` and a shared factor
``S (Hkv, dh, d)``, ``G = Hq // Hkv``. QK is ``P = Q, S = K``; OV is ``P = O^T, S = V``:
transposing the column blocks of ``o_w`` turns "whiten from the right" into "whiten from the
left" and ``msign`` commutes with transposition, so one function computes both rules.
The hybrid OV rule (one sign over the whole ``o_w``) is ``shared_p_sign=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_triton.options import CMOptions
from cm_triton.reference import primitives as ref
from cm_triton.reference.connections import connect

__all__ = [
    "Primitives",
    "REFERENCE",
    "scalar_roots",
    "signs",
    "direction",
    "momentum_update",
    "pair_step",
]


@dataclass(frozen=True)
class Primitives:
    """The two accelerable primitives; the reference and the kernels each provide one."""

    msign: Callable[[Tensor, Sequence[tuple[float, float, float]], torch.dtype | None], Tensor]
    gram_inv_sqrt: Callable[..., tuple[Tensor, Tensor | None]]
    # Both roots of a pair at once (``ref.partner_roots``'s signature); None: two
    # ``gram_inv_sqrt`` calls, one per factor.
    partner_roots: Callable[..., tuple[Tensor, Tensor, Tensor | None, Tensor | None]] | None = None

    def roots(
        self,
        p: Tensor,
        s: Tensor,
        damping: float,
        method: str,
        dp: Tensor | None,
        ds: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(r_s, r_p, r_s dp, r_p ds)`` of one pair; shapes as in ``ref.partner_roots``."""
        if self.partner_roots is not None:
            return self.partner_roots(p, s, damping, method, dp, ds)
        r_s, wp = self.gram_inv_sqrt(s, damping, 1, method, dp)
        r_p, ws = self.gram_inv_sqrt(p, damping, p.shape[0] // s.shape[0], method, ds)
        return r_s, r_p, wp, ws


REFERENCE = Primitives(
    msign=ref.msign, gram_inv_sqrt=ref.gram_inv_sqrt, partner_roots=ref.partner_roots
)


def scalar_roots(w: Tensor, group_size: int, damping: float) -> Tensor:
    """Isotropic stand-in for ``C^{-1}`` (spec §4.4): ``s I`` with
    ``s = (sum_g ||W_h||_F^2 / dh + damping)^{-1/2}``.

    Shapes: ``w (H, dh, d) -> (H // group_size, dh, dh)``.
    """
    h, dh, _ = w.shape
    sq = w.square().sum((-2, -1)).view(h // group_size, group_size).sum(1)
    s = (sq / dh + damping).rsqrt()
    return s[:, None, None] * torch.eye(dh, dtype=w.dtype, device=w.device)


def signs(
    wp: Tensor, ws: Tensor, joint: bool, shared_p_sign: bool, msign: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Sign step of §4.1, §4.2 and §4.5 on (possibly whitened) legs.

    Shapes: ``wp (Hq, dh, d), ws (Hkv, dh, d) -> (up, us)`` of the same shapes.
    ``joint``: one sign over each group's stacked rows ``[P_h (h in g); S_g]`` (all rows when
    ``shared_p_sign``). Otherwise per head, with all P heads under one sign if ``shared_p_sign``.
    """
    hq, dh, d = wp.shape
    hkv = ws.shape[0]
    if not joint:
        if shared_p_sign:
            return msign(wp.reshape(1, hq * dh, d)).view(wp.shape), msign(ws)
        z = msign(torch.cat([wp, ws]))  # every slice has its own norm: one call, same math
        return z[:hq], z[hq:]
    if shared_p_sign:
        z = msign(torch.cat([wp.reshape(hq * dh, d), ws.reshape(hkv * dh, d)])[None])[0]
        return z[: hq * dh].view(wp.shape), z[hq * dh :].view(ws.shape)
    z = msign(torch.cat([wp.reshape(hkv, hq // hkv * dh, d), ws], dim=1))
    return z[:, : hq // hkv * dh].reshape(wp.shape), z[:, hq // hkv * dh :]


def _renorm(delta: Tensor, u: Tensor) -> Tensor:
    """Spec §4.8: rescale a whole leg matrix to the Frobenius norm of its sign output."""
    dn = torch.linalg.vector_norm(delta)
    return delta * torch.where(dn > 0, torch.linalg.vector_norm(u) / dn, 1.0)


def direction(
    p: Tensor,
    s: Tensor,
    dp: Tensor,
    ds: Tensor,
    opts: CMOptions,
    shared_p_sign: bool = False,
    prims: Primitives = REFERENCE,
) -> tuple[Tensor, Tensor]:
    """Update directions ``(Delta_P, Delta_S)`` of one pair, before ``-eta b`` (spec §4.1-§4.8).

    Shapes: ``p, dp (Hq, dh, d); s, ds (Hkv, dh, d) -> (Hq, dh, d), (Hkv, dh, d)``.
    ``p, s`` are the current weights, ``dp, ds`` the momentum directions.
    """
    g = p.shape[0] // s.shape[0]
    pre = opts.whitening in ("both", "pre")
    post = opts.whitening in ("both", "post")
    r_s = r_p = None  # r_s whitens P legs (partner S); r_p whitens S legs (partner: P group)
    wp, ws = dp, ds
    if opts.whitening != "none":
        if opts.isotropic:
            r_s, r_p = scalar_roots(s, 1, opts.damping), scalar_roots(p, g, opts.damping)
            if pre:
                wp, ws = ref.apply_root(r_s, dp), ref.apply_root(r_p, ds)
        else:
            r_s, r_p, wp_, ws_ = prims.roots(
                p, s, opts.damping, opts.inv_root, dp if pre else None, ds if pre else None
            )
            if pre:
                wp, ws = wp_, ws_

    def sign(x: Tensor) -> Tensor:
        return prims.msign(x, opts.ns_coefficients, opts.ns_dtype)

    up, us = signs(wp, ws, opts.method == "joint", shared_p_sign, sign)
    delta_p = ref.apply_root(r_s, up) if post else up
    delta_s = ref.apply_root(r_p, us) if post else us
    if opts.per_mat_renorm:
        delta_p, delta_s = _renorm(delta_p, up), _renorm(delta_s, us)
    return connect(p, s, delta_p, delta_s, opts.connection, opts.damping)


def momentum_update(m: Tensor, grad: Tensor, beta: float) -> Tensor:
    """``m <- beta m + G`` out of place (spec §3). Shapes: any, equal."""
    return beta * m + grad


def pair_step(
    p: Tensor,
    s: Tensor,
    gp: Tensor,
    gs: Tensor,
    mp: Tensor,
    ms: Tensor,
    opts: CMOptions,
    shared_p_sign: bool = False,
    prims: Primitives = REFERENCE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One CM step of a pair, out of place, in spec §4.9's order.

    Shapes: ``p, gp, mp (Hq, dh, d); s, gs, ms (Hkv, dh, d)``, all in the compute dtype.
    Returns ``(p', s', mp', ms')``: new weights and new momentum buffers.
    """
    mp = momentum_update(mp, gp, opts.beta)
    ms = momentum_update(ms, gs, opts.beta)
    if opts.momentum_reproject:
        kind = "frobenius" if opts.connection == "none" else opts.connection
        mp, ms = connect(p, s, mp, ms, kind, opts.damping)
    dp, ds = (gp + opts.beta * mp, gs + opts.beta * ms) if opts.nesterov else (mp, ms)
    delta_p, delta_s = direction(p, s, dp, ds, opts, shared_p_sign, prims)
    decay = 1.0 - opts.eta * opts.weight_decay
    step = opts.eta * opts.budget
    return decay * p - step * delta_p, decay * s - step * delta_s, mp, ms
