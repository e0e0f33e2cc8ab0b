"""Which heads of an attention pair each rank holds, and the plans that keep their legs local.

Spec §2.3: a per-head leg reads its own head and its partner's; tensor parallelism
(``ColwiseParallel`` q/k/v: rows split; ``RowwiseParallel`` o: columns split) keeps heads
whole, FSDP2's row shards keep q/k/v heads whole where the shard boundaries fall on heads and
cut o's rows (the model width), and a replicate dimension (HSDP) repeats everything. From
every rank's block of each parameter (``placement.blocks_of``) this module finds:

- ``group_heads``: the KV groups ``[a, b)`` a rank holds whole in every parameter of a
  layout that stores heads group after group (``GROUP_MAJOR``: q/k, v/o, four separate
  projections, fused ``[q_1 .. q_G; k; v]``): its step is local, **no collective** but the
  hybrid O sign's.
- ``ov_heads``: for OV, each rank's *universe* (the heads whose columns of o it holds, whole
  heads, in KV-head units ``[A, B)``), the V heads it holds (whole, inside the universe), and
  the mesh dimension along which o's rows (the width) are split (at most one: FSDP's). The
  per-head Grams of o are then sums over that dimension's ranks (one all_reduce of dh x dh
  blocks); V's from their owners; the legs are local.
- ``sign_blocks``: where each rank's part of the hybrid O sign's operand sits in the whole
  matrix (its heads' rows, its width's columns), for the gathered or sharded sign.

Plain functions of the blocks: every rank computes every rank's answer, so all agree
without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cm_triton.options import CMOptions
from cm_triton.placement import Block
from cm_triton.reference.phases import hybrid_update, leg_update, partner_roots_from_grams
from cm_triton.reference.primitives import compute_dtype

__all__ = [
    "GROUP_MAJOR",
    "LOCAL_PLAN",
    "O_PARAM",
    "OVHeads",
    "group_heads",
    "ov_heads",
    "ov_sharded",
    "varying_dims",
]


def varying_dims(blocks: list[Block], coords: list[tuple[int, ...]], what: str) -> list[int]:
    """Mesh dimensions along which ``what`` (``"rows"`` or ``"cols"``) of the blocks change."""
    ndim = len(coords[0])
    out = []
    for d in range(ndim):
        seen: dict[tuple, set] = {}
        for blk, c in zip(blocks, coords):
            rest = c[:d] + c[d + 1 :]
            seen.setdefault(rest, set()).add(
                (blk.r0, blk.r1) if what == "rows" else (blk.c0, blk.c1)
            )
        if any(len(v) > 1 for v in seen.values()):
            out.append(d)
    return out


def _whole_heads(lo: int, hi: int, size: int) -> tuple[int, int] | None:
    """``[lo, hi)`` in units of ``size`` when both ends fall on a unit, else None."""
    if lo % size or hi % size or hi <= lo:
        return None
    return lo // size, hi // size


# Layouts whose parameters hold their heads KV group after KV group along one axis: per
# parameter (axis, rows per KV group in units of dh, from the group size g). A rank holding
# KV groups [a, b) whole of every parameter holds a smaller pair of the same layout.
GROUP_MAJOR = {
    "qk": ((0, lambda g: g), (0, lambda g: 1)),
    "ov": ((0, lambda g: 1), (1, lambda g: g)),
    "separate": ((0, lambda g: g), (0, lambda g: 1), (0, lambda g: 1), (1, lambda g: g)),
    "qkv_grouped": ((0, lambda g: g + 2), (1, lambda g: g)),
    "qkv_interleaved": ((0, lambda g: 3), (1, lambda g: 1)),
}
O_PARAM = {"ov": 1, "separate": 3, "qkv_grouped": 1, "qkv_interleaved": 1}  # whose columns are o
LOCAL_PLAN = {"qk": "qk_local", "ov": "ov_local"}  # the plan's name (else "heads_local")


def group_heads(name: str, blocks: list[list[Block]], shapes: tuple, dh: int,
                g: int) -> list[tuple[int, int]] | None:  # fmt: skip
    """Per rank, the KV groups ``(a, b)`` it holds whole in every parameter of a
    ``GROUP_MAJOR`` layout (``blocks[i][r]``: parameter i's block on rank r; the other axis
    whole), or None where some rank does not (spec §2.3)."""
    out = []
    for r in range(len(blocks[0])):
        found = None
        for (axis, unit), bl, shape in zip(GROUP_MAJOR[name], blocks, shapes):
            b = bl[r]
            lo, hi = (b.r0, b.r1) if axis == 0 else (b.c0, b.c1)
            other = (b.c0, b.c1) if axis == 0 else (b.r0, b.r1)
            if other != (0, shape[1 - axis]):
                return None
            got = _whole_heads(lo, hi, unit(g) * dh)
            if got is None or found not in (None, got):
                return None
            found = got
        out.append(found)
    return out


@dataclass(frozen=True)
class OVHeads:
    """One rank's view of an OV pair (see the module doc): ``universe (A, B)`` and ``v (a, b)``
    in KV-head units; ``width_dim`` the mesh dimension splitting o's rows (None: whole)."""

    universe: tuple[int, int]
    v: tuple[int, int]
    width_dim: int | None


def ov_heads(v: list[Block], o: list[Block], shapes: tuple, dh: int, g: int,
             coords: list[tuple[int, ...]]) -> list[OVHeads] | None:  # fmt: skip
    """Per rank, its ``OVHeads`` for ``ov_sharded``, or None where the blocks do not allow it:
    o's columns whole heads of whole KV groups, v's rows whole heads inside that universe with
    whole columns, o's rows split along exactly one mesh dimension, along which the universe
    is the same, o's rows tile the width and v's rows tile the universe. (o's rows whole:
    ``group_heads``' local plan.)"""
    (_, w_v), (d, _) = shapes
    width = varying_dims(o, coords, "rows")
    if len(width) != 1:
        return None
    (wd,) = width
    out = []
    for bv, bo in zip(v, o):
        uni = _whole_heads(bo.c0, bo.c1, g * dh)
        hv = _whole_heads(bv.r0, bv.r1, dh) if bv.r1 > bv.r0 else (None if bv.r0 % dh else
                                                                   (bv.r0 // dh,) * 2)  # fmt: skip
        if uni is None or hv is None or (bv.c0, bv.c1) != (0, w_v):
            return None
        if not uni[0] <= hv[0] <= hv[1] <= uni[1]:
            return None
        out.append(OVHeads(uni, hv, wd))
    for r, c in enumerate(coords):  # along the width dimension: one universe, tiled
        line = [s for s, cs in enumerate(coords)
                if all(cs[i] == c[i] for i in range(len(c)) if i != wd)]  # fmt: skip
        if len({out[s].universe for s in line}) != 1:
            return None
        if not _tiles(sorted((o[s].r0, o[s].r1) for s in line), 0, d):
            return None
        if not _tiles(sorted(out[s].v for s in line), *out[r].universe):
            return None
    return out


def _tiles(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether sorted ``ranges`` cover ``[lo, hi)`` exactly once (empty ones anywhere)."""
    at = lo
    for a, b in ranges:
        if b == a:
            continue
        if a != at:
            return False
        at = b
    return at == hi


def ov_sharded(comm, dh: int, g: int, heads: list[OVHeads], o_blocks: list[Block], width,
               weights, grads, moms, opts: CMOptions, prims,
               scale: Tensor | None = None):  # fmt: skip
    """OV whose o rows (the width) are split over the ``width`` group (FSDP2's dimension)
    and whose heads are whole on each rank (``ov_heads``): per universe of ``hq = g hkv``
    query heads, this rank holds a width slice of every O head and whole V heads. **One
    all_reduce** over ``width`` carries the O Grams (partial sums over the width) and the V
    Grams (each from its owner); the V legs are then local. The O leg: per head, one more
    all_reduce for the Gram restart; hybrid, the sign over the whole o_w
    (``Comm._whole_sign``). ``scale (L,)``: the pair's direction power of two, agreed over
    the ranks. Returns the new local weight and momentum stacks ``[v, o]``."""
    mine = heads[comm.rank]
    hkv = mine.universe[1] - mine.universe[0]
    hq = g * hkv
    first, hkv_loc = mine.v[0] - mine.universe[0], mine.v[1] - mine.v[0]
    cdt = compute_dtype(weights[0].dtype)

    def v_heads(x):  # (L, hkv_loc*dh, dv) -> (L, hkv_loc, dh, dv)
        return x.unflatten(1, (hkv_loc, dh)).to(cdt)

    def o_heads(x):  # (L, d_loc, hq*dh) -> P-form (L, hq, dh, d_loc)
        return x.unflatten(2, (hq, dh)).permute(0, 2, 3, 1).to(cdt)

    v, gv, mv = (v_heads(x) for x in (weights[0], grads[0], moms[0]))
    o, go, mo = (o_heads(x) for x in (weights[1], grads[1], moms[1]))
    ops = prims.phases
    mv_new, a_v, s_v = ops.stream(v, gv, mv, opts.beta, opts.nesterov, scale)
    mo_new, a_o, s_o = ops.stream(o, go, mo, opts.beta, opts.nesterov, scale)
    a_v_all = a_v.new_zeros(a_v.shape[0], hkv, dh, dh)
    a_v_all[:, first : first + hkv_loc] = a_v
    parts = [a_o, a_v_all] + ([] if opts.hybrid else [s_o])
    packed = comm.all_reduce(torch.cat([x.flatten(1) for x in parts], 1), width)
    sizes = [x[0].numel() for x in parts]
    pieces = [c.view_as(x) for c, x in zip(packed.split(sizes, 1), parts)]
    a_o, a_v_all = pieces[0], pieces[1]
    root_o, root_v = partner_roots_from_grams(a_o, a_v_all, opts, ops)
    own_v = None if root_v is None else root_v[:, first : first + hkv_loc]
    b_o, b_v = opts.budgets(g)
    v_new = leg_update(v, gv, mv_new, s_v, own_v, opts, b_v, ops, scale=scale)
    if opts.hybrid:
        whole = comm._whole_sign(heads, o_blocks, opts, prims, width=True)

        def sign(x: Tensor) -> Tensor:
            return whole(x, opts.ns_coefficients, opts.ns_dtype, "ns", 0)

        o_new = hybrid_update(o, go, mo_new, root_o, opts, sign, scale=scale)
    else:
        o_new = leg_update(o, go, mo_new, pieces[2], root_o, opts, b_o, ops,
                           reduce=lambda t: comm.all_reduce(t, width), scale=scale)  # fmt: skip

    def v_back(x):
        return x.flatten(1, 2)

    def o_back(x):  # P-form (L, hq, dh, d_loc) -> (L, d_loc, hq*dh)
        return x.permute(0, 3, 1, 2).flatten(2)

    return [v_back(v_new), o_back(o_new)], [v_back(mv_new), o_back(mo_new)]
