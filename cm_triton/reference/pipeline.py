"""One CM step of a batch of pairs, every variant, in the three phases of spec §2.2.

1. **stream** (``PhaseOps.stream_grams``): per leg head, ``m <- beta m + G`` and the Grams
   ``W W^T``, ``D D^T`` (and ``W D^T``, ``W m^T`` where a connection or the reprojection
   needs them);
2. **algebra**, all dh x dh (or ``(G+1) dh`` square for joint): partner roots, the
   reprojection's generator (the Grams of the projected direction follow from the blocks),
   each leg's sign as a map ``T`` on its direction (§2.1, with the restart's extra pass), the
   per-matrix renorm, and the connection's generator from ``W Delta^T = (W D^T) T^T``;
3. **apply** (``PhaseOps.apply_update``): ``W <- decay W - (A_D D + A_W W)`` per leg head,
   and ``m <- m + E W`` under reprojection.

The exceptions spec §2.2 names are explicit passes inside the same pipeline: a sign that is
not evaluated in Gram form (``ns_method="ns"``, a leg narrower than ``GRAM_MIN_ASPECT`` times
its rows, or the hybrid O sign over a whole matrix) is *formed* by the apply pass
(``X = pre D``), iterated as an ordinary Newton-Schulz sign, and applied as ``post U``; its
Grams for renorm and connections come from ``PhaseOps.cross_grams``.

Legs (``Legs``): ``half_split`` steps the P heads and the S heads as two legs; ``joint`` as
one leg per KV group, the group's G query heads' rows above the shared head's, so joint's
cross-head blocks are ordinary Gram entries of that leg.

A pair whose flags the default fused path covers (``phases.fusable``) runs
``phases.gram_pair_step``: the same phases, with the step applied as a float (the arithmetic
the distributed plans share bit for bit).
Shapes: ``p, gp, mp (B, Hq, dh, n_p)``, ``s, gs, ms (B, Hkv, dh, n_s)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_triton.options import CMOptions
from cm_triton.reference.connections import vertical_map, weight_maps
from cm_triton.reference.legs import block_diag, gram_route
from cm_triton.reference.phases import (
    REFERENCE_PHASES,
    PhaseOps,
    fusable,
    gram_pair_step,
    partner_roots_from_grams,
    scaled_maps,
)
from cm_triton.reference.primitives import msign

__all__ = ["Legs", "pair_step", "route"]


@dataclass(frozen=True)
class Legs:
    """How a pair's heads form the legs its signs run over (spec §4.1, §4.5).

    ``half_split``: two legs, the P heads ``(B, Hq, dh, n_p)`` and the S heads
    ``(B, Hkv, dh, n_s)``. ``joint``: one leg ``(B, Hkv, (G+1) dh, n)``, each KV group's G
    query heads' rows above its shared head's (joint needs ``n_p == n_s``). Per-head dh x dh
    maps move between the views with ``blocks`` (diagonal head blocks of each leg's
    ``R x R`` matrices) and ``join`` (block-diagonal ``R x R`` maps from per-head blocks).
    """

    joint: bool
    hq: int
    hkv: int
    dh: int

    @property
    def g(self) -> int:
        return self.hq // self.hkv

    def stack(self, p: Tensor, s: Tensor) -> list[Tensor]:
        """``(B, Hq, dh, n), (B, Hkv, dh, n) -> legs`` (joint: one copy into group rows)."""
        if not self.joint:
            return [p, s]
        b, n = p.shape[0], p.shape[-1]
        return [torch.cat([p.reshape(b, self.hkv, self.g * self.dh, n), s], 2)]

    def unstack(self, legs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Inverse of ``stack``: ``legs -> (P (B, Hq, dh, n), S (B, Hkv, dh, n))``."""
        if not self.joint:
            return legs[0], legs[1]
        x = legs[0]
        gd = self.g * self.dh
        return x[:, :, :gd].reshape(x.shape[0], self.hq, self.dh, x.shape[-1]), x[:, :, gd:]

    def blocks(self, mats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-leg ``(B, H, R, R)`` -> per-head diagonal blocks ``(B, Hq|Hkv, dh, dh)``."""
        if not self.joint:
            return mats[0], mats[1]
        m, k, dh = mats[0], self.g + 1, self.dh
        d = m.view(m.shape[0], self.hkv, k, dh, k, dh).diagonal(dim1=2, dim2=4)
        d = d.permute(0, 1, 4, 2, 3)  # (B, Hkv, k, dh, dh)
        return d[:, :, : self.g].reshape(m.shape[0], self.hq, dh, dh), d[:, :, self.g]

    def join(self, per_p: Tensor, per_s: Tensor) -> list[Tensor]:
        """Per-head ``(B, Hq, dh, dh), (B, Hkv, dh, dh)`` -> block-diagonal per-leg maps."""
        if not self.joint:
            return [per_p, per_s]
        b = per_p.shape[0]
        heads = torch.cat([per_p.view(b, self.hkv, self.g, self.dh, self.dh),
                           per_s.unsqueeze(2)], 2)  # fmt: skip
        return [block_diag(heads)]

    def rows(self, x_p: Tensor, x_s: Tensor) -> list[Tensor]:
        """Per-factor scalars ``(B,)`` each -> row scales per leg, ``(B, 1, R, 1)``."""
        if not self.joint:
            return [x_p[:, None, None, None], x_s[:, None, None, None]]
        b = x_p.shape[0]
        r = torch.cat([x_p[:, None].expand(b, self.g * self.dh), x_s[:, None].expand(b, self.dh)],
                      1)  # fmt: skip
        return [r[:, None, :, None]]

    def factor_sums(self, rows: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-leg row values ``(B, H, R)`` -> their sums over each factor's rows, ``(B,)``."""
        if not self.joint:
            return rows[0].sum((1, 2)), rows[1].sum((1, 2))
        gd = self.g * self.dh
        return rows[0][..., :gd].sum((1, 2)), rows[0][..., gd:].sum((1, 2))


def route(rows: int, width: int, ns_method: str, whole: bool) -> str:
    """``"gram"`` (the sign as a map on D, spec §2.1) or ``"explicit"`` (formed, iterated)."""
    return "gram" if not whole and gram_route(rows, width, ns_method) else "explicit"


@dataclass
class _Sign:
    """A leg's sign: ``Delta = T D''`` (gram) or ``Delta = post U`` (explicit).

    ``t (B, H, R, R)`` the whole map (gram); ``u (B, H, R, n)`` the formed sign (explicit);
    ``uu = U U^T`` the sign's Gram before ``post`` (gram: the last maps' own, read off the
    restart's accurate Gram; explicit: from ``cross_grams``); ``post`` the outer map.
    """

    t: Tensor | None = None
    u: Tensor | None = None
    uu: Tensor | None = None
    post: Tensor | None = None


def _eye(like: Tensor) -> Tensor:
    """The identity map of a leg: ``like (B, H, R, n) -> (B, H, R, R)`` (a broadcast view)."""
    b, h, r, _ = like.shape
    return torch.eye(r, dtype=like.dtype, device=like.device).expand(b, h, r, r)


def _diag(x: Tensor) -> Tensor:
    return x.diagonal(dim1=-2, dim2=-1)


def _reprojected(grams: dict, e: Tensor, c: float) -> dict:
    """Grams of ``D'' = D + c E W`` from the blocks of ``{W, D}`` (spec §2.2)."""
    ww, wd, dd = grams["ww"], grams["wd"], grams["dd"]
    ewd = e @ wd
    out = dict(grams)
    out["dd"] = dd + c * (ewd + ewd.mT) + (c * c) * (e @ ww @ e.mT)
    out["wd"] = wd + c * (ww @ e.mT)
    return out


def _gram_sign(grams: dict, pre, post, w, gr, m_new, e, c, scale, opts: CMOptions,
               ops: PhaseOps) -> _Sign:  # fmt: skip
    """Phases B1, A2, B2 of one leg: the sign as ``T`` with ``Delta = T D''`` (``D''`` the
    scaled direction ``s D + c E W``: ``grams`` and ``e`` are of it, see ``general_pair_step``)."""
    first, rest = opts.ns_coefficients[: opts.ns_restart], opts.ns_coefficients[opts.ns_restart :]
    t, r = ops.first_maps(grams["dd"], pre, first)
    if first:  # the restart's pass: X = T_r D'' formed (never stored), its Gram
        t_w = None if e is None else c * (t @ e)
        r = ops.restart_gram(scaled_maps(t, scale), gr, m_new, opts.beta, opts.nesterov, w=w,
                             t_w=t_w)  # fmt: skip
    t0, uu = ops.last_maps(r, t, None, rest)
    return _Sign(t=t0 if post is None else post @ t0, uu=uu, post=post)


def _explicit_sign(
    pre,
    post,
    w,
    gr,
    m_new,
    e,
    c,
    scale,
    whole: bool,
    opts: CMOptions,
    ops: PhaseOps,
    msign_fn,
    whole_fn=None,
) -> _Sign:
    """The sign formed by a pass (``X = pre D''``) and iterated: per leg head, or over every
    row of the leg at once (``whole``: the hybrid O sign, spec §4.2/§4.5)."""
    b, h, r, n = w.shape
    lift = _eye(w) if pre is None else pre
    t_w = None if e is None else c * (lift @ e)
    x = ops.apply_update(w, scaled_maps(lift, scale), gr, m_new, opts.beta, opts.nesterov, 0.0,
                         -1.0, t_w=t_w)  # fmt: skip
    flat = x.reshape(b, h * r, n) if whole else x.reshape(b * h, r, n)
    fn = whole_fn if whole and whole_fn is not None else msign_fn
    u = fn(flat, opts.ns_coefficients, opts.ns_dtype, "ns", 0)
    return _Sign(u=u.reshape(b, h, r, n).to(x.dtype), post=post)


def general_pair_step(
    p: Tensor, s: Tensor, gp: Tensor, gs: Tensor, mp: Tensor, ms: Tensor, opts: CMOptions,
    hybrid: bool = False, ops: PhaseOps = REFERENCE_PHASES, msign_fn: Callable = msign,
    scale: Tensor | None = None, whole_fn: Callable | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``pair_step`` for every flag combination, phase by phase (module docstring).

    The direction enters the algebra scaled: its Grams are those of ``s D`` (``scale``,
    ``phases.direction_scale``), the reprojection's ``E`` is that of ``s m`` (so
    ``D'' = s D + c E W``), and each map onto the stored ``D`` or ``m`` carries ``s``.
    """
    legs = Legs(opts.method == "joint", p.shape[1], s.shape[1], p.shape[2])
    g = legs.g
    w_l, g_l, m_l = legs.stack(p, s), legs.stack(gp, gs), legs.stack(mp, ms)
    connect = opts.connection != "none"
    reproject = opts.momentum_reproject
    want = ("ww", "dd") + (("wd",) if connect or reproject else ())
    want += ("wm",) if reproject and opts.nesterov else ()
    # 1. stream
    streamed = [ops.stream_grams(w, gr, m, opts.beta, opts.nesterov, want, scale)
                for w, gr, m in zip(w_l, g_l, m_l)]  # fmt: skip
    mn_l = [x[0] for x in streamed]
    grams = [x[1] for x in streamed]
    ww_p, ww_s = legs.blocks([x["ww"] for x in grams])
    # 2. algebra: reprojection of the momentum (spec §4.7): m'' = m + E W, D'' = D + c E W
    c = opts.beta if opts.nesterov else 1.0
    e_l: list[Tensor | None] = [None] * len(w_l)
    if reproject:
        kind = "frobenius" if opts.connection == "none" else opts.connection
        wm_p, wm_s = legs.blocks([x.get("wm", x["wd"]) for x in grams])
        e_l = legs.join(*weight_maps(vertical_map(kind, ww_p, ww_s, wm_p, wm_s, opts.damping), g))
        grams = [_reprojected(x, e, c) for x, e in zip(grams, e_l)]
    root_p, root_s = partner_roots_from_grams(ww_p, ww_s, opts, ops)
    roots = [None] * len(w_l) if root_p is None else legs.join(root_p, root_s)
    pre_l = roots if opts.whitening in ("both", "pre") else [None] * len(w_l)
    post_l = roots if opts.whitening in ("both", "post") else [None] * len(w_l)
    signs = []
    for i, (w, gr, mn, gm) in enumerate(zip(w_l, g_l, mn_l, grams)):
        whole = hybrid and (legs.joint or i == 0)
        args = (pre_l[i], post_l[i], w, gr, mn, e_l[i], c, scale)
        if route(w.shape[-2], w.shape[-1], opts.ns_method, whole) == "gram":
            signs.append(_gram_sign(gm, *args, opts, ops))
        else:
            signs.append(_explicit_sign(*args, whole, opts, ops, msign_fn, whole_fn))
    explicit_grams = [None if sg.u is None or not (connect or opts.per_mat_renorm)
                      else ops.cross_grams(w, sg.u) for w, sg in zip(w_l, signs)]  # fmt: skip
    # per_mat_renorm (spec §4.8): Delta_leg <- Delta_leg ||U_leg|| / ||Delta_leg||, per factor
    one = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
    ren_p = ren_s = one
    if opts.per_mat_renorm:
        u_rows, d_rows = [], []
        for sg, xg in zip(signs, explicit_grams):
            # Both norms from the sign's Gram (phases.post_norm_sq says why not tr(T S T^T))
            uu = sg.uu if sg.u is None else xg["uu"]
            u_rows.append(_diag(uu))
            d_rows.append(_diag(uu if sg.post is None else sg.post @ uu @ sg.post.mT))
        (u_p, u_s), (d_p, d_s) = legs.factor_sums(u_rows), legs.factor_sums(d_rows)
        ren_p, ren_s = _ratio(u_p, d_p), _ratio(u_s, d_s)
    ren_l = legs.rows(ren_p, ren_s)
    # Delta = ren T D'' (gram) or ren post U (explicit): the map on the leg's direction source
    maps = []
    for sg, rn in zip(signs, ren_l):
        if sg.u is None:
            maps.append(rn * sg.t)
        else:
            maps.append(rn * (_eye(sg.u) if sg.post is None else sg.post))
    # connection (spec §4.6): X from W W^T and W Delta^T; then Delta += F W
    f_l: list[Tensor | None] = [None] * len(w_l)
    if opts.connection != "none":
        wdelta = [gm["wd"] @ t.mT if sg.u is None else xg["wu"] @ t.mT
                  for sg, gm, xg, t in zip(signs, grams, explicit_grams, maps)]  # fmt: skip
        x = vertical_map(opts.connection, ww_p, ww_s, *legs.blocks(wdelta), opts.damping)
        f_l = legs.join(*weight_maps(x, g))
    # 3. apply: W <- decay W - step (A_D D + A_W W) per leg head; m <- m + E W
    b_p, b_s = opts.budgets(g)
    step_l = legs.rows(one * (opts.eta * b_p), one * (opts.eta * b_s))
    decay = 1.0 - opts.eta * opts.weight_decay
    w_new, m_new = [], []
    for w, gr, mn, sg, a_d, e, f, st in zip(w_l, g_l, mn_l, signs, maps, e_l, f_l, step_l):
        a_w = f
        if sg.u is None and e is not None:  # D'' = D + c E W: T D'' = T D + c T E W
            a_w = c * (a_d @ e) if a_w is None else a_w + c * (a_d @ e)
        t_w = None if a_w is None else st * a_w
        if sg.u is None:  # T D'' = (s T) D + c T E W
            out = ops.apply_update(w, scaled_maps(st * a_d, scale), gr, mn, opts.beta,
                                   opts.nesterov, decay, 1.0, t_w=t_w)  # fmt: skip
        else:
            out = ops.apply_update(w, st * a_d, sg.u, sg.u, 0.0, False, decay, 1.0, t_w=t_w)
        w_new.append(out)
        if e is not None:  # m'' = m + E W, with E that of s m: E / s (exact)
            e = e if scale is None else e / scale.view(-1, 1, 1, 1)
            mn = ops.apply_update(mn, e, w, w, 0.0, False, 1.0, -1.0)
        m_new.append(mn)
    p_new, s_new = legs.unstack(w_new)
    mp_new, ms_new = legs.unstack(m_new)
    return p_new, s_new, mp_new, ms_new


def _ratio(u_sq: Tensor, d_sq: Tensor) -> Tensor:
    """``||U|| / ||Delta||`` from squared norms ``(B,)``, 1 where Delta is 0 (spec §4.8)."""
    un, dn = u_sq.clamp_min(0).sqrt(), d_sq.clamp_min(0).sqrt()
    return torch.where(dn > 0, un / torch.where(dn > 0, dn, 1.0), 1.0)


def pair_step(
    p: Tensor, s: Tensor, gp: Tensor, gs: Tensor, mp: Tensor, ms: Tensor, opts: CMOptions,
    hybrid: bool = False, ops: PhaseOps = REFERENCE_PHASES, msign_fn: Callable = msign,
    scale: Tensor | None = None, whole_fn: Callable | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One CM step of B pairs, out of place, in spec §4.9's order, every variant.

    Returns ``(p', s', mp', ms')``: new weights and momentum buffers. Flags the default fused
    path covers run ``gram_pair_step``; every other combination ``general_pair_step``.
    ``scale`` (``(B,)``, ``phases.direction_scale`` of the pair's gradients and momentum, or
    None): the power of two the direction is scaled by before its Grams. ``whole_fn``: the
    sign over a whole leg matrix (the hybrid O sign; None: ``msign_fn``).
    """
    whole = msign_fn if whole_fn is None else whole_fn
    if fusable(opts, p.shape[-2], p.shape[-1], s.shape[-1]):
        return gram_pair_step(p, s, gp, gs, mp, ms, opts, hybrid, ops, whole, scale)
    return general_pair_step(p, s, gp, gs, mp, ms, opts, hybrid, ops, msign_fn, scale,
                             whole_fn)  # fmt: skip
