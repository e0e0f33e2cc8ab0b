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
all-reduces them between phases (``cm_triton.distributed`` composes the same pieces).
Shapes: big tensors ``(B, H, dh, w)`` (B pairs of a batch, H heads), small ``(B, H, dh, dh)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cm_triton.options import CMOptions
from cm_triton.reference.legs import apply_blocks, block_diag, block_traces, gram_route, use_gram
from cm_triton.reference.primitives import gram_polynomial, inv_sqrt, msign

__all__ = ["PhaseOps", "REFERENCE_PHASES", "fusable", "gram_pair_step", "leg_update",
           "hybrid_update", "partner_roots_from_grams", "whitened_sign", "direction_scale",
           "entries", "scaled_maps"]  # fmt: skip

Reduce = Callable[[Tensor], Tensor]
Coefficients = Sequence[tuple[float, float, float]]


def trace(x: Tensor) -> Tensor:
    """``(..., m, m) -> (...)``, as a batched product with a ones vector: ``bmm`` evaluates
    each slice the same way whatever the batch around it, where a strided ``sum`` picks its
    reduction order from the whole shape, and a broadcast ``matmul`` folds the batch into one
    matrix-vector product whose path depends on its height (torch 2.15): so a pair's heads on
    one rank, or one layer of a batch, match the single-process step bit for bit."""
    m = x.shape[-1]
    d = x.diagonal(dim1=-2, dim2=-1).reshape(-1, 1, m)
    ones = torch.ones(1, m, 1, dtype=x.dtype, device=x.device).expand(d.shape[0], m, 1)
    return torch.bmm(d, ones).reshape(x.shape[:-2])


def _direction(g: Tensor, m_new: Tensor, beta: float, nesterov: bool) -> Tensor:
    return g + beta * m_new if nesterov else m_new


GRAMS = ("ww", "dd", "wd", "wm")


def entries(scale: Tensor | None) -> Tensor | float:
    """A per-batch-entry ``(B,)`` scale as ``(B, 1, 1, 1)`` (None: 1.0)."""
    return 1.0 if scale is None else scale.view(-1, 1, 1, 1)


def scaled_maps(maps: Tensor, scale: Tensor | None) -> Tensor:
    """``(B, H, r, r)`` maps (or grouped) times a per-entry scale (None: themselves)."""
    return maps if scale is None else maps * scale.view(-1, 1, 1, 1)


def direction_scale(*amax: Tensor) -> Tensor:
    """The power of two ``s`` per batch entry that brings the largest magnitude of a pair's
    gradients and momentum into [1/2, 1): ``(B,)`` each -> ``(B,)`` (1 where all are zero or
    one is not finite).

    CM's and Muon's directions do not depend on the gradient's scale, but their fp32 Grams do:
    a gradient of 1e19 overflows ``D D^T``, one of 1e-20 underflows it. So the stream takes
    the Grams of ``s D`` (and ``s m``), and every map applied to ``D`` itself carries ``s``:
    ``T D = (s T_s) D`` with ``T_s`` the map of ``s D``. A power of two is exact in binary
    floating point, so only msign's guard ``1e-7`` sees the scale: it now guards a direction
    of norm ~1 (an all-zero one), whatever the gradient's magnitude (spec §2, step 2).
    """
    a = torch.stack(amax).amax(0)
    _, e = torch.frexp(a)  # a = f 2^e, f in [1/2, 1)
    s = torch.ldexp(torch.ones_like(a), -e.clamp(-126, 126))
    return torch.where(torch.isfinite(a) & (a > 0), s, torch.ones_like(a))


def stream_grams(
    w: Tensor, g: Tensor, m: Tensor, beta: float, nesterov: bool,
    want: tuple[str, ...] = ("ww", "dd"), scale: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """Phase A: ``(w, g, m) (B, H, R, n) -> (m_new, Grams)``, one read of each.

    ``want`` names the ``(B, H, R, R)`` Grams among ``GRAMS``: ``ww = W W^T``,
    ``dd = D D^T``, ``wd = W D^T``, ``wm = W m_new^T`` (``D`` the direction of spec §3),
    with ``D`` and ``m_new`` times ``scale`` (``(B,)``, ``direction_scale``; None: 1) in them.
    """
    m_new = beta * m + g
    d = _direction(g, m_new, beta, nesterov)
    s = entries(scale)
    forms = {"w": w, "d": d if scale is None else d * s, "m": m_new}
    if "wm" in want and scale is not None:
        forms["m"] = m_new * s
    return m_new, {k: forms[k[0]] @ forms[k[1]].mT for k in want}


def stream(
    w: Tensor, g: Tensor, m: Tensor, beta: float, nesterov: bool, scale: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase A of the default flags: ``-> (m_new, W W^T, D D^T)`` (``D`` times ``scale``)."""
    m_new, grams = stream_grams(w, g, m, beta, nesterov, scale=scale)
    return m_new, grams["ww"], grams["dd"]


def cross_grams(w: Tensor, u: Tensor) -> dict[str, Tensor]:
    """An explicit sign's Grams: ``w, u (B, H, R, n) -> {"uu": U U^T, "wu": W U^T}``."""
    return {"uu": u @ u.mT, "wu": w @ u.mT}


def _flat(x: Tensor) -> Tensor:
    """``(..., m, m) -> (N, m, m)`` contiguous: batched products then take one path (``bmm``)
    for every slice whatever the batch, so a subset of heads (one rank's) computes bit for bit
    what the whole batch does."""
    return x.reshape(-1, *x.shape[-2:]).contiguous()


def group_size(maps: Tensor | None, heads: int) -> int:
    """How many of ``heads`` heads share each map of ``maps (B, Hkv, r, r)``: ``heads // Hkv``
    for a KV group's shared maps (one KV head: every head shares it), 1 for per-head ones (or
    None)."""
    if maps is None or maps.dim() < 3 or maps.shape[-3] == heads:
        return 1
    return heads // maps.shape[-3]


def per_head(maps: Tensor | None, heads: int) -> Tensor | None:
    """Grouped maps ``(B, Hkv, r, r)`` -> per head ``(B, heads, r, r)``: head ``h`` takes map
    ``h // group_size`` (a KV group's heads share their partner's root; the kernels read it
    by index, this copies). Per-head maps (or None) are returned as they are."""
    g = group_size(maps, heads)
    return maps if g == 1 else maps.repeat_interleave(g, dim=-3)


def first_maps(s: Tensor, pre: Tensor | None, coefficients: Coefficients) -> tuple[Tensor, Tensor]:
    """Phase B1: ``s = D D^T``, ``pre`` (or None: identity), both ``(..., dh, dh)`` ->
    ``(T_r, R_r)``: ``T_r D`` is the iterate after ``coefficients`` steps (msign's
    normalisation folded in) and ``R_r`` its Gram as the polynomial predicts it. ``pre`` may
    be grouped (``per_head``)."""
    shape = s.shape
    s3 = _flat(s)
    pre3 = None if pre is None else _flat(per_head(pre, shape[-3]))
    r = s3 if pre3 is None else torch.bmm(torch.bmm(pre3, s3), pre3.mT)
    # nu = ||pre D||_F 1.01 + 1e-7 = sqrt(tr(pre S pre^T)) 1.01 + 1e-7: msign's normalisation
    nu = (trace(r).clamp_min(0).sqrt() * 1.01 + 1e-7)[:, None, None]
    eye = torch.eye(shape[-1], dtype=s.dtype, device=s.device)
    t = (eye if pre3 is None else pre3) / nu
    r = r / (nu * nu)
    q, r = gram_polynomial(r, coefficients)
    return torch.bmm(q, t.expand_as(q).contiguous()).view(shape), r.view(shape)


def restart_gram(
    t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool,
    w: Tensor | None = None, t_w: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Phase A2: ``X = T D (+ T_W W)`` formed from the direction, ``-> X X^T (B, H, R, R)``."""
    x = t @ _direction(g, m_new, beta, nesterov)
    if t_w is not None:
        x = x + t_w @ w
    return x @ x.mT


def last_maps(
    r: Tensor, t: Tensor, post: Tensor | None, coefficients: Coefficients
) -> tuple[Tensor, Tensor]:
    """Phase B2: remaining steps on ``R`` -> ``(T = post Q T_r, U U^T)``, the second the Gram
    of the sign before ``post`` (``(B, H, R, R)``): its trace is ``||U||^2`` and
    ``tr(post U U^T post^T) = ||Delta||^2``, both read off the restart's accurate Gram.
    ``post`` may be grouped (``per_head``)."""
    shape = t.shape
    q, r_final = gram_polynomial(_flat(r), coefficients)
    t = torch.bmm(q, _flat(t))
    if post is not None:
        t = torch.bmm(_flat(per_head(post, shape[-3])), t)
    return t.view(shape), r_final.view(shape)


def apply_update(
    w: Tensor, t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool,
    decay: float, step: Tensor | float, t_w: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Phase C: ``W <- decay W - step (T D + T_W W)`` (``step`` a float or ``(B, 1, 1, 1)``).

    Shapes: ``w, g, m_new (B, H, R, n)``; ``t, t_w (B, H, R, R)``. The same pass forms an
    explicit sign's operand (``decay 0, step -1``) and the reprojected momentum; ``t`` None
    (and no ``t_w``): ``decay W - step D``, an update formed elsewhere (the hybrid O sign).
    ``t`` may be grouped (``per_head``).
    """
    d = _direction(g, m_new, beta, nesterov)
    if t is None:
        return decay * w - step * d
    t = per_head(t, w.shape[-3])
    if t_w is not None:
        return decay * w - step * (t @ d + t_w @ w)
    if isinstance(step, Tensor):
        return decay * w - step * (t @ d)
    # One fused product-and-update: beta W + alpha T D, batched over every head.
    r, n = w.shape[-2:]
    out = torch.baddbmm(w.reshape(-1, r, n), _flat(t), d.reshape(-1, r, n), beta=decay,
                        alpha=-step)  # fmt: skip
    return out.view(w.shape)


@dataclass(frozen=True)
class PhaseOps:
    """One backend's implementation of each phase (see the module docstring)."""

    stream: Callable[..., tuple[Tensor, Tensor, Tensor]]
    stream_grams: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    cross_grams: Callable[..., dict[str, Tensor]]
    first_maps: Callable[..., tuple[Tensor, Tensor]]
    restart_gram: Callable[..., Tensor]
    last_maps: Callable[..., tuple[Tensor, Tensor]]
    apply_update: Callable[..., Tensor]
    inv_sqrt: Callable[..., Tensor]
    # Whether bytes, not op counts, set the phases' cost (the kernels): then a KV group's
    # shared root is passed grouped (``per_head``: the kernels read it by index) and the two
    # roots of a pair are two calls, not one on a concatenation: no small copies. The
    # reference takes fewer, bigger ops (on a CPU an op's overhead is its cost).
    bytes_bound: bool = False


REFERENCE_PHASES = PhaseOps(stream, stream_grams, cross_grams, first_maps, restart_gram,
                            last_maps, apply_update, inv_sqrt)  # fmt: skip


def fusable(opts: CMOptions, dh: int, width_p: int, width_s: int) -> bool:
    """Whether a pair's step runs in phases: half_split, no connection or momentum
    reprojection, Gram evaluation where its aspect rule takes it (every per-head leg)."""
    return (
        opts.method == "half_split"
        and opts.connection == "none"
        and not opts.momentum_reproject
        and gram_route(dh, width_p, opts.ns_method)
        and gram_route(dh, width_s, opts.ns_method)
    )


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
    eye = opts.damping * torch.eye(dh, dtype=a_s.dtype, device=a_s.device)
    if ops.bytes_bound:  # two calls, nothing copied
        return tuple(ops.inv_sqrt(a + eye, opts.inv_root, floor=opts.damping) for a in (a_s, a_pg))
    both = ops.inv_sqrt(torch.cat([a_s, a_pg], 0) + eye, opts.inv_root, floor=opts.damping)
    return both[:b], both[b:]  # one batched call; halves of the batch axis, contiguous


def partner_roots_from_grams(
    a_p: Tensor, a_s: Tensor, opts: CMOptions, ops: PhaseOps, grouped: bool = False
):  # fmt: skip
    """``(root_p (B, Hq, dh, dh), root_s (B, Hkv, dh, dh))`` from full per-head Grams: each P
    head's whitening root (its KV group's partner S) and each S head's (its group of P).
    ``grouped``: ``root_p`` as its KV groups' ``(B, Hkv, dh, dh)`` (``per_head``)."""
    if opts.whitening == "none":
        return None, None
    g = a_p.shape[1] // a_s.shape[1]
    r_s, r_p = _roots(a_p, a_s, g, opts, ops)
    return (r_s if grouped else r_s.repeat_interleave(g, dim=1)), r_p


def leg_update(
    w: Tensor, gr: Tensor, m_new: Tensor, s_gram: Tensor, root: Tensor | None,
    opts: CMOptions, budget: float, ops: PhaseOps = REFERENCE_PHASES,
    reduce: Reduce | None = None, scale: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Phases B1, A2, B2 and C of per-head legs: ``W <- decay W - eta b post msign(pre D)``
    with ``b = budget`` (``CMOptions.budgets``).

    Shapes: ``w, gr, m_new (B, H, dh, n)``; ``s_gram = D D^T`` and ``root (B, H, dh, dh)``.
    ``reduce``: applied to the restart's Gram (a sum over the width). ``scale`` (``(B,)`` or
    None): ``s_gram`` is the Gram of ``scale D``; the maps onto ``D`` carry it.
    """
    pre = root if opts.whitening in ("both", "pre") else None
    post = root if opts.whitening in ("both", "post") else None
    first, rest = opts.ns_coefficients[: opts.ns_restart], opts.ns_coefficients[opts.ns_restart :]
    t, r = ops.first_maps(s_gram, pre, first)
    if first:
        r = ops.restart_gram(scaled_maps(t, scale), gr, m_new, opts.beta, opts.nesterov)
        r = r if reduce is None else reduce(r)
    t, uu = ops.last_maps(r, t, post, rest)
    t = scaled_maps(t, scale)  # the map of D itself
    step = opts.eta * budget
    if opts.per_mat_renorm:  # no pass over Delta needed: both norms from U U^T
        step = step * renorm_factor(post_norm_sq(uu, post).clamp_min(0).sqrt(), trace(uu))
    decay = 1.0 - opts.eta * opts.weight_decay
    return ops.apply_update(w, t, gr, m_new, opts.beta, opts.nesterov, decay, step)


def hybrid_update(
    w: Tensor, gr: Tensor, m_new: Tensor, root: Tensor | None, opts: CMOptions,
    sign: Callable[[Tensor], Tensor], ops: PhaseOps = REFERENCE_PHASES,
    scale: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The hybrid O leg (spec §4.2): one Newton-Schulz ``sign`` over all heads of each batch
    entry, whitened per head. Shapes: ``w, gr, m_new (B, Hq, dh, n)``, ``root (B, Hq, dh, dh)``
    (or grouped, ``per_head``); ``sign: (B, Hq*dh, n) -> (B, Hq*dh, n)``. The whitening
    products are apply passes (``root D``, ``root U``: decay 0, step -1). The sign's operand
    is formed from ``scale D`` (``direction_scale``; None: 1)."""
    b, hq, dh, _ = w.shape
    pre = opts.whitening in ("both", "pre") and root is not None
    post = opts.whitening in ("both", "post") and root is not None
    s = entries(scale)
    if pre:
        x = ops.apply_update(m_new, scaled_maps(root, scale), gr, m_new, opts.beta, opts.nesterov,
                             0.0, -1.0)  # fmt: skip
    else:
        x = _direction(gr, m_new, opts.beta, opts.nesterov)
        x = x if scale is None else x * s
    u = sign(x.reshape(b, hq * dh, -1))
    u4 = u.view(w.shape)
    delta = ops.apply_update(u4, root, u4, u4, 0.0, False, 0.0, -1.0) if post else u4
    step = opts.eta * opts.budget
    if opts.per_mat_renorm:
        u_sq = u.square().unflatten(-2, (hq, -1)).sum((-2, -1))
        step = step * renorm_factor(delta.square().sum((-3, -2, -1)).clamp_min(0).sqrt(), u_sq)
    decay = 1.0 - opts.eta * opts.weight_decay
    return ops.apply_update(w, None, delta, delta, 0.0, False, decay, step)


def gram_pair_step(
    p: Tensor, s: Tensor, gp: Tensor, gs: Tensor, mp: Tensor, ms: Tensor, opts: CMOptions,
    hybrid: bool = False, ops: PhaseOps = REFERENCE_PHASES, msign_fn=msign,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``reference.rule.pair_step`` for a ``fusable`` pair, phase by phase.

    Shapes as ``pair_step``: ``p, gp, mp (B, Hq, dh, w_p); s, gs, ms (B, Hkv, dh, w_s)``.
    """
    mp_new, a_p, s_p = ops.stream(p, gp, mp, opts.beta, opts.nesterov, scale)
    ms_new, a_s, s_s = ops.stream(s, gs, ms, opts.beta, opts.nesterov, scale)
    root_p, root_s = partner_roots_from_grams(a_p, a_s, opts, ops, ops.bytes_bound)
    b_p, b_s = opts.budgets(p.shape[1] // s.shape[1])
    s_new = leg_update(s, gs, ms_new, s_s, root_s, opts, b_s, ops, scale=scale)
    if hybrid:  # one Newton-Schulz sign over every P head (the whole o_w)

        def sign(x: Tensor) -> Tensor:
            return msign_fn(x, opts.ns_coefficients, opts.ns_dtype, "ns", 0)

        p_new = hybrid_update(p, gp, mp_new, root_p, opts, sign, ops, scale)
    else:
        p_new = leg_update(p, gp, mp_new, s_p, root_p, opts, b_p, ops, scale=scale)
    return p_new, s_new, mp_new, ms_new


def post_norm_sq(uu: Tensor, post: Tensor | None) -> Tensor:
    """``||post U||_F^2`` summed over heads from ``U U^T``: ``(B, H, R, R) -> (B,)`` (``post``
    per head or grouped, ``per_head``).

    Read off the sign's own Gram (the restart's, accurate), not ``tr(T S T^T)`` with the first
    Gram ``S``: that loses what sits below ``sqrt(u) ||D||``, which ``T`` then amplifies by
    ``1 / sigma^2`` (measured 4% off at condition 1e4, ``bench/results/accuracy_flags.md``).
    """
    post = per_head(post, uu.shape[-3])
    x = uu if post is None else post @ uu @ post.mT
    return trace(x).sum(-1)


def renorm_factor(dn: Tensor, u_sq: Tensor) -> Tensor:
    """Spec §4.8 per leg matrix: ``||U|| / ||Delta||`` (1 where Delta is 0) -> ``(B, 1, 1, 1)``.

    ``dn (B,)``: ``||Delta||_F`` of each leg matrix; ``u_sq (B, H)``: ``||U_h||_F^2`` per head.
    """
    un = u_sq.sum(-1).clamp_min(0).sqrt()
    return torch.where(dn > 0, un / torch.where(dn > 0, dn, 1.0), 1.0)[:, None, None, None]


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
    if gram_form and m <= n:  # the pipeline's own phases, on one leg of B entries
        d4 = d.unsqueeze(1)
        pre_m = None if pre is None else block_diag(pre).unsqueeze(1)
        t, r = first_maps(d4 @ d4.mT, pre_m, coefficients[:restart])
        if restart:
            r = restart_gram(t, d4, d4, 0.0, False)
        t, uu = last_maps(r, t, None, coefficients[restart:])
        u = t @ d4
        delta = u if post is None else block_diag(post).unsqueeze(1) @ u
        return delta[:, 0], block_traces(uu[:, 0], k)
    w = d if pre is None else apply_blocks(pre, d)
    u = msign(w, coefficients, dtype, "gram" if gram_form else "ns", restart)
    u_sq = u.square().unflatten(-2, (k, -1)).sum((-2, -1))
    return (u if post is None else apply_blocks(post, u)), u_sq
