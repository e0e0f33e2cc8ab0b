"""The Gram-form CM step in phases (spec §2.1): the structure the kernels and the distributed
path share.

A pair's half-split step with Gram evaluation touches its big matrices only in streaming
passes; everything else is dh x dh algebra:

A. ``stream``: momentum ``m <- beta m + G`` and, per head, the Grams ``W W^T`` (partner) and
   ``D D^T`` of the direction;
B1. ``first_maps``: partner inverse roots, the whitened Gram ``R_0 = pre S pre^T / nu^2`` and
   the first ``ns_restart`` Newton-Schulz steps on it -> ``T_r`` (``X_r = T_r D``);
A2. ``restart_gram``: ``R = (T_r D)(T_r D)^T``, with ``T_r D`` formed explicitly (that is what
   recovers the singular values the first Gram lost) but never stored;
B2. ``last_maps``: the remaining steps -> ``T = post Q T_r`` and ``||U||^2``;
C. ``apply_update``: ``W <- (1 - eta wd) W - eta b T D``, written once.

``PhaseOps`` holds the backend's implementation of each phase; ``REFERENCE_PHASES`` is pure
torch. Grams are sums over the width axis, so a caller whose width is sharded across ranks
all-reduces them between phases (``reduce_p`` / ``reduce_s`` of ``gram_pair_step``).
Shapes: big tensors ``(B, H, dh, w)`` (B pairs of a batch, H heads), small ``(B, H, dh, dh)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_triton.options import CMOptions
from cm_triton.reference.legs import apply_blocks, use_gram
from cm_triton.reference.primitives import gram_polynomial, inv_sqrt, msign

__all__ = ["PhaseOps", "REFERENCE_PHASES", "fusable", "gram_pair_step"]

Reduce = Callable[[Tensor], Tensor]
Coefficients = Sequence[tuple[float, float, float]]


def _direction(g: Tensor, m_new: Tensor, beta: float, nesterov: bool) -> Tensor:
    return g + beta * m_new if nesterov else m_new


def stream(
    w: Tensor, g: Tensor, m: Tensor, beta: float, nesterov: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase A: ``(w, g, m) (B, H, dh, n) -> (m_new, W W^T, D D^T)``; ``D`` the direction."""
    m_new = beta * m + g
    d = _direction(g, m_new, beta, nesterov)
    return m_new, w @ w.mT, d @ d.mT


def first_maps(s: Tensor, pre: Tensor | None, coefficients: Coefficients) -> tuple[Tensor, Tensor]:
    """Phase B1: ``s = D D^T``, ``pre`` (or None: identity), both ``(..., dh, dh)`` ->
    ``(T_r, R_r)``: ``T_r D`` is the iterate after ``coefficients`` steps (msign's
    normalisation folded in) and ``R_r`` its Gram as the polynomial predicts it."""
    r = s if pre is None else pre @ s @ pre.mT
    # nu = ||pre D||_F 1.01 + 1e-7 = sqrt(tr(pre S pre^T)) 1.01 + 1e-7: msign's normalisation
    nu = (r.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt() * 1.01 + 1e-7)[..., None, None]
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    t = (eye if pre is None else pre) / nu
    r = r / (nu * nu)
    q, r = gram_polynomial(r, coefficients)
    return q @ t, r


def restart_gram(t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool) -> Tensor:
    """Phase A2: ``X = T D`` formed from the direction, ``-> X X^T (B, H, dh, dh)``."""
    x = t @ _direction(g, m_new, beta, nesterov)
    return x @ x.mT


def last_maps(
    r: Tensor, t: Tensor, post: Tensor | None, coefficients: Coefficients
) -> tuple[Tensor, Tensor]:
    """Phase B2: remaining steps on ``R`` -> ``(T = post Q T_r, ||msign||^2 per head)``."""
    q, r_final = gram_polynomial(r, coefficients)
    t = q @ t
    if post is not None:
        t = post @ t
    return t, r_final.diagonal(dim1=-2, dim2=-1).sum(-1)


def apply_update(
    w: Tensor, t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool,
    decay: float, step: Tensor | float,
) -> Tensor:  # fmt: skip
    """Phase C: ``W <- decay W - step T D`` (``step`` a float or ``(B, 1, 1, 1)``)."""
    return decay * w - step * (t @ _direction(g, m_new, beta, nesterov))


@dataclass(frozen=True)
class PhaseOps:
    """One backend's implementation of each phase (see the module docstring)."""

    stream: Callable[..., tuple[Tensor, Tensor, Tensor]]
    first_maps: Callable[..., tuple[Tensor, Tensor]]
    restart_gram: Callable[..., Tensor]
    last_maps: Callable[..., tuple[Tensor, Tensor]]
    apply_update: Callable[..., Tensor]
    inv_sqrt: Callable[..., Tensor]


REFERENCE_PHASES = PhaseOps(stream, first_maps, restart_gram, last_maps, apply_update, inv_sqrt)


def fusable(opts: CMOptions, dh: int, width_p: int, width_s: int) -> bool:
    """Whether a pair's step runs in phases: half_split, no connection or momentum
    reprojection, Gram evaluation where its aspect rule takes it (every per-head leg)."""
    return (
        opts.method == "half_split"
        and opts.connection == "none"
        and not opts.momentum_reproject
        and use_gram(dh, width_p, opts.ns_method)
        and use_gram(dh, width_s, opts.ns_method)
        and width_p >= dh
        and width_s >= dh
    )


def _eye_damped(a: Tensor, damping: float) -> Tensor:
    out = a.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(damping)
    return out


def _roots(a_p: Tensor, a_s: Tensor, g: int, opts: CMOptions, ops: PhaseOps) -> tuple:
    """Partner roots from the (full) per-head Grams: ``r_s`` whitens P legs (partner S),
    ``r_p`` S legs (partner: the P group). ``(B, Hkv, dh, dh)`` each."""
    b, hkv, dh = a_s.shape[:3]
    a_pg = a_p.view(b, hkv, g, dh, dh).sum(2)
    if opts.isotropic:  # spec §4.4: s = (tr(A) / dh + lambda)^(-1/2), times I
        eye = torch.eye(dh, dtype=a_s.dtype, device=a_s.device)
        sc = [
            (a.diagonal(dim1=-2, dim2=-1).sum(-1) / dh + opts.damping).rsqrt() for a in (a_s, a_pg)
        ]
        return sc[0][..., None, None] * eye, sc[1][..., None, None] * eye
    both = ops.inv_sqrt(_eye_damped(torch.cat([a_s, a_pg], 1), opts.damping), opts.inv_root,
                        floor=opts.damping)  # fmt: skip
    return both[:, :hkv], both[:, hkv:]


def gram_pair_step(
    p: Tensor, s: Tensor, gp: Tensor, gs: Tensor, mp: Tensor, ms: Tensor, opts: CMOptions,
    hybrid: bool = False, ops: PhaseOps = REFERENCE_PHASES, msign_fn=msign,
    reduce_p: Reduce | None = None, reduce_s: Reduce | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``reference.rule.pair_step`` for a ``fusable`` pair, phase by phase.

    Shapes as ``pair_step``: ``p, gp, mp (B, Hq, dh, w_p); s, gs, ms (B, Hkv, dh, w_s)``.
    ``reduce_p`` / ``reduce_s``: applied to every Gram of that factor (a sum over its width,
    e.g. an all-reduce when the width is sharded); identity when None.
    """
    b, hq, dh, _ = p.shape
    hkv = s.shape[1]
    g = hq // hkv
    red_p = reduce_p or (lambda x: x)
    red_s = reduce_s or (lambda x: x)
    beta, nest = opts.beta, opts.nesterov
    mp_new, a_p, s_p = ops.stream(p, gp, mp, beta, nest)
    ms_new, a_s, s_s = ops.stream(s, gs, ms, beta, nest)
    a_p, s_p = red_p(a_p), red_p(s_p)
    a_s, s_s = red_s(a_s), red_s(s_s)
    pre = opts.whitening in ("both", "pre")
    post = opts.whitening in ("both", "post")
    if opts.whitening == "none":
        root_p = root_s = None
    else:
        r_s, r_p = _roots(a_p, a_s, g, opts, ops)
        root_p, root_s = r_s.repeat_interleave(g, dim=1), r_p
    first, rest = opts.ns_coefficients[: opts.ns_restart], opts.ns_coefficients[opts.ns_restart :]

    def leg_map(w, gr, m_new, s_gram, root, red):
        t, r = ops.first_maps(s_gram, root if pre else None, first)
        if first:
            r = red(ops.restart_gram(t, gr, m_new, beta, nest))
        return ops.last_maps(r, t, root if post else None, rest)

    decay = 1.0 - opts.eta * opts.weight_decay
    step = opts.eta * opts.budget
    t_s, u_s = leg_map(s, gs, ms_new, s_s, root_s, red_s)
    if hybrid:  # one Newton-Schulz sign over every P head (the whole o_w): spec §4.2
        x = _direction(gp, mp_new, beta, nest).reshape(b, hq * dh, -1)
        wx = apply_blocks(root_p, x) if pre else x
        u = msign_fn(wx, opts.ns_coefficients, opts.ns_dtype, "ns", 0)
        u_p = u.square().unflatten(-2, (hq, -1)).sum((-2, -1))
        delta_p = (apply_blocks(root_p, u) if post else u).view(p.shape)
        if opts.per_mat_renorm:
            delta_p = delta_p * _renorm_factor(delta_p.square().sum((-3, -2, -1)), u_p)
        p_new = decay * p - step * delta_p
    else:
        t_p, u_p = leg_map(p, gp, mp_new, s_p, root_p, red_p)
        step_p = step
        if opts.per_mat_renorm:  # ||Delta_h||^2 = tr(T S T^T): no pass over Delta needed
            step_p = step * _renorm_factor(_tst(t_p, s_p), u_p)
        p_new = ops.apply_update(p, t_p, gp, mp_new, beta, nest, decay, step_p)
    step_s = step
    if opts.per_mat_renorm:
        step_s = step * _renorm_factor(_tst(t_s, s_s), u_s)
    s_new = ops.apply_update(s, t_s, gs, ms_new, beta, nest, decay, step_s)
    return p_new, s_new, mp_new, ms_new


def _tst(t: Tensor, s: Tensor) -> Tensor:
    """``||T D||_F^2 = tr(T S T^T)`` per batch entry, summed over heads: ``-> (B,)``."""
    return ((t @ s) * t).sum((-3, -2, -1))


def _renorm_factor(delta_sq: Tensor, u_sq: Tensor) -> Tensor:
    """Spec §4.8 per leg matrix: ``||U|| / ||Delta||`` (1 where Delta is 0) -> ``(B, 1, 1, 1)``."""
    dn = delta_sq.clamp_min(0).sqrt()
    un = u_sq.sum(-1).clamp_min(0).sqrt()
    return torch.where(dn > 0, un / torch.where(dn > 0, dn, 1.0), 1.0)[:, None, None, None]
