"""The Compositional Muon rule for a batch of attention pairs, every variant (spec §3-§4).

Generic form (see ``connections``): a per-query factor ``P (B, Hq, dh, d_p)`` and a shared
factor ``S (B, Hkv, dh, d_s)``, ``G = Hq // Hkv``; ``B`` pairs of equal shapes (layers) are
stepped together and never mix. QK is ``P = Q, S = K``; OV is ``P = O^T, S = V``: transposing
the column blocks of ``o_w`` turns "whiten from the right" into "whiten from the left" and
``msign`` commutes with transposition, so one function computes both rules. The hybrid OV
rule (one sign over the whole ``o_w``) is ``hybrid=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from cm_triton.options import CMOptions
from cm_triton.reference import legs
from cm_triton.reference import primitives as ref
from cm_triton.reference.connections import connect
from cm_triton.reference.phases import (
    REFERENCE_PHASES,
    PhaseOps,
    fusable,
    gram_pair_step,
    renorm_factor,
)

__all__ = [
    "Primitives",
    "REFERENCE",
    "scalar_roots",
    "direction",
    "momentum_update",
    "pair_step",
    "generic_pair_step",
]


@dataclass(frozen=True)
class Primitives:
    """The accelerable primitives; the reference and the kernels each provide them.

    ``roots(p, s, damping, method) -> (r_s, r_p)`` as ``reference.partner_roots``;
    ``whitened_sign`` as ``reference.legs.whitened_sign``; ``msign`` as ``reference.msign``;
    ``phases``: the Gram-form step's phases (``reference.phases.PhaseOps``).
    """

    roots: Callable[..., tuple[Tensor, Tensor]]
    whitened_sign: Callable[..., tuple[Tensor, Tensor]]
    msign: Callable[..., Tensor]
    phases: PhaseOps = REFERENCE_PHASES


REFERENCE = Primitives(roots=ref.partner_roots, whitened_sign=legs.whitened_sign, msign=ref.msign)


def scalar_roots(w: Tensor, group_size: int, damping: float) -> Tensor:
    """Isotropic stand-in for ``C^{-1}`` (spec §4.4): ``s I`` with
    ``s = (sum_g ||W_h||_F^2 / dh + damping)^{-1/2}``.

    Shapes: ``w (..., H, dh, d) -> (..., H // group_size, dh, dh)``.
    """
    *lead, h, dh, _ = w.shape
    sq = w.square().sum((-2, -1)).view(*lead, h // group_size, group_size).sum(-1)
    s = (sq / dh + damping).rsqrt()
    return s[..., None, None] * torch.eye(dh, dtype=w.dtype, device=w.device)


def _renorm(delta: Tensor, u_sq: Tensor) -> Tensor:
    """Spec §4.8: rescale each leg matrix (all heads of one weight, per batch entry) to the
    Frobenius norm of its sign output. ``delta (B, H, dh, d), u_sq (B, H) -> delta``."""
    return delta * renorm_factor(torch.linalg.vector_norm(delta, dim=(-3, -2, -1)), u_sq)


def _legs(
    dp: Tensor,
    ds: Tensor,
    root_p: Tensor | None,
    root_s: Tensor | None,
    pre: bool,
    post: bool,
    joint: bool,
    hybrid: bool,
    sign: Callable[..., tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sign step of §4.1, §4.2 and §4.5 with the whitening of §4.3 around it.

    Shapes: ``dp (B, Hq, dh, d_p), ds (B, Hkv, dh, d_s)``; ``root_p (B, Hq, dh, dh)`` whitens
    each P head (its KV group's root, repeated), ``root_s (B, Hkv, dh, dh)`` each S head ->
    ``(delta_p, delta_s, u_sq_p (B, Hq), u_sq_s (B, Hkv))``.
    ``joint``: one sign over each group's stacked rows ``[P_h (h in g); S_g]`` (all rows of the
    pair when ``hybrid``). Otherwise per head, with all P heads under one sign if ``hybrid``.
    """
    b, hq, dh, d_p = dp.shape
    hkv, d_s = ds.shape[1], ds.shape[-1]
    g = hq // hkv

    def call(d: Tensor, roots: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        return sign(d, roots if pre else None, roots if post else None, blocks=k)

    if joint:  # validated: d_p == d_s
        if hybrid:  # one sign over every row of the pair
            d_all = torch.cat([dp.reshape(b, hq * dh, d_p), ds.reshape(b, hkv * dh, d_s)], 1)
            roots = None if root_p is None else torch.cat([root_p, root_s], 1)
            delta, u_sq = call(d_all, roots, hq + hkv)
            return (delta[:, : hq * dh].view(dp.shape), delta[:, hq * dh :].view(ds.shape),
                    u_sq[:, :hq], u_sq[:, hq:])  # fmt: skip
        d_all = torch.cat([dp.reshape(b, hkv, g * dh, d_p), ds], 2).flatten(0, 1)
        roots = None
        if root_p is not None:
            roots = torch.cat([root_p.view(b, hkv, g, dh, dh), root_s.unsqueeze(2)], 2)
            roots = roots.flatten(0, 1)
        delta, u_sq = call(d_all, roots, g + 1)
        delta, u_sq = delta.view(b, hkv, (g + 1) * dh, d_p), u_sq.view(b, hkv, g + 1)
        return (delta[:, :, : g * dh].reshape(dp.shape), delta[:, :, g * dh :].reshape(ds.shape),
                u_sq[..., :g].reshape(b, hq), u_sq[..., g:].reshape(b, hkv))  # fmt: skip

    def per_head(d: Tensor, roots: Tensor | None) -> tuple[Tensor, Tensor]:
        rs = None if roots is None else roots.reshape(-1, 1, dh, dh)
        delta, u_sq = call(d.reshape(-1, dh, d.shape[-1]), rs, 1)
        return delta.view(d.shape), u_sq.view(d.shape[:2])

    if hybrid:  # all P heads under one sign (the whole o_w), S per head
        delta_p, u_p = call(dp.reshape(b, hq * dh, d_p), root_p, hq)
        delta_s, u_s = per_head(ds, root_s)
        return delta_p.view(dp.shape), delta_s, u_p, u_s
    if d_p == d_s:  # every head has its own slice and norm: one call, same math
        roots = None if root_p is None else torch.cat([root_p, root_s], 1)
        delta, u_sq = per_head(torch.cat([dp, ds], 1), roots)
        return delta[:, :hq], delta[:, hq:], u_sq[:, :hq], u_sq[:, hq:]
    delta_p, u_p = per_head(dp, root_p)
    delta_s, u_s = per_head(ds, root_s)
    return delta_p, delta_s, u_p, u_s


def direction(
    p: Tensor,
    s: Tensor,
    dp: Tensor,
    ds: Tensor,
    opts: CMOptions,
    hybrid: bool = False,
    prims: Primitives = REFERENCE,
) -> tuple[Tensor, Tensor]:
    """Update directions ``(Delta_P, Delta_S)`` of B pairs, before ``-eta b`` (spec §4.1-§4.8).

    Shapes: ``p, dp (B, Hq, dh, d_p); s, ds (B, Hkv, dh, d_s) -> (B, Hq, dh, d_p),
    (B, Hkv, dh, d_s)``. ``p, s`` are the current weights, ``dp, ds`` the momentum directions.
    ``opts`` must be resolved (``ns_method`` and ``inv_root`` concrete).
    """
    g = p.shape[1] // s.shape[1]
    root_p = root_s = None  # root_p whitens P legs (partner S); root_s whitens S legs
    if opts.whitening != "none":
        if opts.isotropic:
            r_s, r_p = scalar_roots(s, 1, opts.damping), scalar_roots(p, g, opts.damping)
        else:
            r_s, r_p = prims.roots(p, s, opts.damping, opts.inv_root)
        root_p, root_s = r_s.repeat_interleave(g, dim=1), r_p
    sign = partial(
        prims.whitened_sign,
        coefficients=opts.ns_coefficients,
        method=opts.ns_method,
        restart=opts.ns_restart,
        dtype=opts.ns_dtype,
    )
    pre = opts.whitening in ("both", "pre")
    post = opts.whitening in ("both", "post")
    delta_p, delta_s, u_p, u_s = _legs(
        dp, ds, root_p, root_s, pre, post, opts.method == "joint", hybrid, sign
    )
    if opts.per_mat_renorm:
        delta_p, delta_s = _renorm(delta_p, u_p), _renorm(delta_s, u_s)
    return _connect_batched(p, s, delta_p, delta_s, opts.connection, opts.damping)


def _connect_batched(p, s, dp, ds, kind: str, damping: float) -> tuple[Tensor, Tensor]:
    """``connect`` on B pairs: groups never straddle a pair, so fold B into the heads."""
    if kind == "none":
        return dp, ds
    fp, fs = connect(p.flatten(0, 1), s.flatten(0, 1), dp.flatten(0, 1), ds.flatten(0, 1),
                     kind, damping)  # fmt: skip
    return fp.view(dp.shape), fs.view(ds.shape)


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
    hybrid: bool = False,
    prims: Primitives = REFERENCE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One CM step of B pairs, out of place, in spec §4.9's order.

    Shapes: ``p, gp, mp (B, Hq, dh, d_p); s, gs, ms (B, Hkv, dh, d_s)``, all in the compute
    dtype. Returns ``(p', s', mp', ms')``: new weights and new momentum buffers. A pair the
    Gram form covers whole (``phases.fusable``) runs phase by phase; the rest generically.
    """
    if fusable(opts, p.shape[-2], p.shape[-1], s.shape[-1]):
        return gram_pair_step(p, s, gp, gs, mp, ms, opts, hybrid, prims.phases, prims.msign)
    return generic_pair_step(p, s, gp, gs, mp, ms, opts, hybrid, prims)


def generic_pair_step(
    p: Tensor,
    s: Tensor,
    gp: Tensor,
    gs: Tensor,
    mp: Tensor,
    ms: Tensor,
    opts: CMOptions,
    hybrid: bool = False,
    prims: Primitives = REFERENCE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``pair_step`` for every flag combination: momentum, (reprojection,) direction, update."""
    mp = momentum_update(mp, gp, opts.beta)
    ms = momentum_update(ms, gs, opts.beta)
    if opts.momentum_reproject:
        kind = "frobenius" if opts.connection == "none" else opts.connection
        mp, ms = _connect_batched(p, s, mp, ms, kind, opts.damping)
    dp, ds = (gp + opts.beta * mp, gs + opts.beta * ms) if opts.nesterov else (mp, ms)
    delta_p, delta_s = direction(p, s, dp, ds, opts, hybrid, prims)
    decay = 1.0 - opts.eta * opts.weight_decay
    b_p, b_s = opts.budgets(p.shape[1] // s.shape[1])
    return (decay * p - (opts.eta * b_p) * delta_p, decay * s - (opts.eta * b_s) * delta_s,
            mp, ms)  # fmt: skip
