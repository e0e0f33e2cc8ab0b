"""The attention plans of ``Comm`` (the package doc lists them): which one a batch takes, from
every rank's blocks (``heads``), and how each runs."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from cm_triton.distributed.heads import (
    GROUP_MAJOR,
    LOCAL_PLAN,
    O_PARAM,
    OVHeads,
    group_heads,
    ov_heads,
    ov_sharded,
    varying_dims,
)
from cm_triton.engine import compute_attention
from cm_triton.groups import group_layout, head_counts
from cm_triton.layouts import get_layout
from cm_triton.options import CMOptions
from cm_triton.placement import Block, Group, placement_of, whole_block
from cm_triton.reference.phases import direction_scale, fusable
from cm_triton.reference.primitives import compute_dtype, ns_iterate

__all__ = ["AttentionPlans", "o_sign_cost"]


def o_sign_cost(n: int, d: int, world: int, flops_per_s: float = 2e14,
                bytes_per_s: float = 5e10) -> dict[str, float]:  # fmt: skip
    """Estimated seconds of the hybrid O sign of an ``n x d`` matrix (n <= d, the iterated
    orientation) whose ``d`` columns are split over ``world`` ranks, 8 Newton-Schulz steps,
    fp32 transfers. ``"gather"``: one all_gather of the whole direction, every rank computes
    the whole sign; ``"sharded"``: each step all-reduces ``X X^T`` (a ring all_reduce moves
    2(W-1)/W of it), the big products are split over ranks. Defaults: ~200 TFLOP/s of bf16
    matmul, ~50 GB/s per rank between nodes (assumptions, not measurements)."""
    part = (world - 1) / world
    gather = 8 * (4 * n * n * d + 2 * n**3) / flops_per_s + 4 * n * d * part / bytes_per_s
    sharded = (8 * (4 * n * n * d / world + 2 * n**3) / flops_per_s
               + 8 * 2 * 4 * n * n * part / bytes_per_s)  # fmt: skip
    return {"gather": gather, "sharded": sharded}


class AttentionPlans:
    """``Comm``'s attention plans (a mixin: ``self`` is the ``Comm``)."""

    def attention(self, b, weights, grads, moms, opts: CMOptions, prims, amax=None):
        """New local weight and momentum stacks of one attention batch (see the module doc).
        ``amax``: per position, each layer's largest gradient or momentum magnitude, the same
        on every rank (``engine._agree_scales``): every plan scales as one process would."""
        group0 = b.members[0]
        params = [ps[0] for ps in b.params]
        where = [placement_of(p) for p in params]
        layout = group_layout(group0)
        if self.replicated == "split" and all(w == "local" for w in where):
            self._use("replicated_split")
            return self._split_attention(layout, weights, grads, moms, group0, opts, prims, amax)
        if all(w != "sharded" for w in where):
            self._use("local")
            return compute_attention(layout, weights, grads, moms, group0, opts, prims, amax)
        plan = self._head_plan(group0, params, opts)
        if plan is not None:
            return plan(weights, grads, moms, group0, opts, prims, amax)
        self._use("gather")
        return self._gathered(layout, params, weights, grads, moms, group0, opts, prims, amax)

    def _gathered(self, layout, params, weights, grads, moms, group0, opts: CMOptions, prims,
                  amax=None, grp: Group | None = None,
                  region: list[Block] | None = None):  # fmt: skip
        """The one-process step of ``layout`` on the pair gathered over ``grp`` (the flat
        group: whole tensors; else ``region`` of each parameter), each rank keeping its block."""
        n = len(params)
        if opts.momentum_reproject or layout.muon:  # these read the whole momentum
            full = self.gather_blocks([*weights, *grads, *moms], params * 3, grp, region * 3
                                      if region else None)  # fmt: skip
            new_w, new_m = compute_attention(layout, full[:n], full[n : 2 * n], full[2 * n :],
                                             group0, opts, prims, amax)  # fmt: skip
            area = region or [None] * n
            return ([self.own(x, p, a) for x, p, a in zip(new_w, params, area)],
                    [self.own(x, p, a) for x, p, a in zip(new_m, params, area)])  # fmt: skip
        # The momentum update is elementwise: done here on the shards, and only the weights and
        # the direction are gathered. The rule then sees the direction as a gradient with zero
        # momentum and beta 0: m = 0 * 0 + D = D exactly, so its arithmetic is unchanged.
        new_m = [opts.beta * m + g for m, g in zip(moms, grads)]
        dirs = [g + opts.beta * m if opts.nesterov else m for g, m in zip(grads, new_m)]
        full = self.gather_blocks([*weights, *dirs], params * 2, grp,
                                  region * 2 if region else None)  # fmt: skip
        plain = dataclasses.replace(opts, beta=0.0, nesterov=False)
        zeros = [torch.zeros_like(x) for x in full[n:]]
        new_w, _ = compute_attention(layout, full[:n], full[n:], zeros, group0, plain, prims,
                                     amax)  # fmt: skip
        area = region or [None] * n
        return [self.own(x, p, a) for x, p, a in zip(new_w, params, area)], new_m

    def _head_plan(self, group0: dict, params: list[Tensor], opts: CMOptions):
        """The plan that keeps a pair's legs where its heads live (``heads``), or None
        (gathered). Every rank answers the same."""
        dh = group0["head_dim"]
        name, hq, hkv = head_counts(group0)
        if name not in GROUP_MAJOR or len(params) != len(GROUP_MAJOR[name]):
            return None
        blocks = [self.blocks(p) for p in params]
        shapes = tuple(tuple(p.shape) for p in params)
        coords = self.mesh.coords if self.mesh is not None else [(r,) for r in range(self.world)]
        # per_mat_renorm: its norms span every head, so only a gather of whole tensors serves
        renorm = opts.per_mat_renorm
        heads = None if renorm else group_heads(name, blocks, shapes, dh, hq // hkv)
        if heads is not None:
            return self._local_plan(name, group0, heads, blocks, hq // hkv, dh)
        if name == "ov" and not renorm and fusable(opts, dh, shapes[1][0], shapes[0][1]):
            ov = ov_heads(blocks[0], blocks[1], shapes, dh, hq // hkv, coords)
            if ov is not None:
                self._use("ov_sharded")
                width = self.sub((ov[self.rank].width_dim,))

                def sharded(w, gr, m, grp, o, pr, amax):
                    scale = None if amax is None else direction_scale(*amax)
                    return ov_sharded(self, dh, hq // hkv, ov, blocks[1], width, w, gr, m, o,
                                      pr, scale)  # fmt: skip

                return sharded
        return self._heads_gather_plan(name, group0, params, blocks, hq // hkv, dh, renorm)

    def _local_plan(self, name: str, group0: dict, heads: list[tuple[int, int]], blocks,
                    g: int, dh: int, params=None, grp: Group | None = None,
                    region=None):  # fmt: skip
        """Every rank holds whole KV groups ``heads[r]`` of the pair (or, with ``grp``, the
        ranks of ``grp`` together hold them: gathered there first): the one-process step of
        those heads; the hybrid O sign over the ranks holding other heads."""
        a, b_ = heads[self.rank]
        plan = "heads_gather" if grp is not None else LOCAL_PLAN.get(name, "heads_local")
        self._use(plan)
        args = dict(group0.get("layout_args") or {})
        loc = get_layout(name, (b_ - a) * g, b_ - a, dh, **args)
        o_at = O_PARAM.get(name)
        ov = [OVHeads(h, h, None) for h in heads]

        def run(w, gr, m, group0, o, pr, amax):
            if o_at is not None and o.hybrid:
                pr = dataclasses.replace(pr, whole_msign=self._whole_sign(ov, blocks[o_at], o,
                                                                          pr))  # fmt: skip
            if grp is None:
                return compute_attention(loc, w, gr, m, group0, o, pr, amax)
            return self._gathered(loc, params, w, gr, m, group0, o, pr, amax, grp, region)

        return run

    def _heads_gather_plan(self, name: str, group0: dict, params, blocks, g: int, dh: int,
                           whole: bool = False):  # fmt: skip
        """A 2-D mesh whose blocks cut heads (FSDP2's rows inside a TP rank's KV head), or
        flags ``ov_sharded`` does not take: the ranks along one mesh dimension together hold
        whole heads (a TP rank's; HSDP: a replica's), so the pair is gathered over that
        dimension only (``heads_gather``: one all_gather within the group) and its heads
        stepped there; the hybrid O sign across the other dimension. ``whole``: only where
        that group holds the whole pair (per_mat_renorm)."""
        if self.mesh is None or self.mesh.ndim < 2:
            return None
        shapes = tuple(tuple(p.shape) for p in params)
        for d in range(self.mesh.ndim):
            union = [[_union([bl[m] for m in self.mesh.members((d,), r)])
                      for r in range(self.world)] for bl in blocks]  # fmt: skip
            if any(u is None for per in union for u in per):
                continue
            if whole and any(u != whole_block(p) for per, p in zip(union, params) for u in per):
                continue
            heads = group_heads(name, union, shapes, dh, g)
            if heads is None:
                continue
            return self._local_plan(name, group0, heads, union, g, dh, params, self.sub((d,)),
                                    [u[self.rank] for u in union])  # fmt: skip
        return None

    def _whole_sign(self, heads: list[OVHeads], o_blocks: list[Block], opts: CMOptions, prims,
                    width: bool = False):  # fmt: skip
        """The hybrid O sign of this rank's part ``(B, rows, cols)`` of the whole matrix: its
        heads' rows (``rows / (its KV heads)`` rows per KV head, in the global head order) and
        its width's columns (``width``: o's rows; else all). Over the ranks whose part differs
        (the group of the mesh dimensions along which o's block varies): ``"gather"`` (one
        all_gather, the single-process sign, each keeps its part) or ``"sharded"``
        (Newton-Schulz with its Grams all-reduced, where only one of rows and columns is
        split), by ``o_sign`` (``"auto"``: ``o_sign_cost``)."""
        coords = self.mesh.coords
        dims = tuple(sorted(set(varying_dims(o_blocks, coords, "rows"))
                            | set(varying_dims(o_blocks, coords, "cols"))))  # fmt: skip
        grp = self.sub(dims)
        mine = heads[self.rank]

        def sign(x: Tensor, coefficients, dtype, how="ns", restart=0) -> Tensor:
            if grp.size == 1:  # the whole matrix is here
                return prims.msign(x, coefficients, dtype, how, restart)
            per = x.shape[-2] // (mine.universe[1] - mine.universe[0])
            n_all = per * max(h.universe[1] for h in heads)
            d_all = max(b.r1 for b in o_blocks) if width else x.shape[-1]
            parts = [(heads[r].universe[0] * per, heads[r].universe[1] * per,
                      *((o_blocks[r].r0, o_blocks[r].r1) if width else (0, d_all)))
                     for r in grp.members]  # fmt: skip
            rows_split = len({p[:2] for p in parts}) > 1
            cols_split = len({p[2:] for p in parts}) > 1
            strategy = self.o_sign
            if rows_split and cols_split:
                strategy = "gather"
            elif strategy == "auto":
                n, d = (n_all, d_all) if cols_split else (d_all, n_all)
                cost = o_sign_cost(min(n, d), max(n, d), grp.size)
                strategy = min(cost, key=cost.get)
            if strategy == "sharded" and (n_all > d_all if cols_split else d_all > n_all):
                strategy = "gather"  # the sharded iteration runs on the wide orientation only
            self.plans[f"o_sign_{strategy}"] += 1
            if strategy == "sharded":
                if cols_split:
                    return self.sharded_msign(x, coefficients, dtype, grp)
                return self.sharded_msign(x.mT, coefficients, dtype, grp).mT
            rm = max(p[1] - p[0] for p in parts)
            cm = max(p[3] - p[2] for p in parts)
            pad = torch.nn.functional.pad(x, (0, cm - x.shape[-1], 0, rm - x.shape[-2]))
            every = self.all_gather(pad, grp)  # (W, B, rm, cm)
            full = x.new_empty(x.shape[0], n_all, d_all)
            for piece, (r0, r1, c0, c1) in zip(every, parts):
                full[:, r0:r1, c0:c1] = piece[:, : r1 - r0, : c1 - c0]
            u = prims.msign(full, coefficients, dtype, how, restart)
            r0, r1, c0, c1 = parts[grp.index]
            return u[:, r0:r1, c0:c1]

        return sign

    def sharded_msign(self, x: Tensor, coefficients, dtype, grp: Group | None = None) -> Tensor:
        """``msign`` of ``(B, n, d)`` matrices whose width d is sharded over ``grp`` (``x``
        holds this rank's columns), by Newton-Schulz with ``X X^T`` all-reduced each step
        (n <= d)."""
        out_dtype = compute_dtype(x.dtype)
        y = x.to(out_dtype)
        sq = self.all_reduce(y.square().sum((-2, -1)), grp)
        y = y / (sq.sqrt()[:, None, None] * 1.01 + 1e-7)
        y = ns_iterate(y.to(dtype or out_dtype), coefficients,
                       lambda t: self.all_reduce(t, grp))  # fmt: skip
        return y.to(out_dtype)

    def _split_attention(self, layout, weights, grads, moms, group0, opts: CMOptions, prims,
                         amax=None):  # fmt: skip
        """Replicated parameters: this rank steps its chunk of the batch, one all_gather."""
        n = weights[0].shape[0]
        mine, chunk, first = self.split(n)
        run, keep = mine, slice(0, mine.stop - mine.start)
        if keep.stop == 1 and n > 1 and _one_entry_differs(opts, weights[0]):
            # Computing a neighbour along keeps this rank on the single-process path (two
            # entries or more), bit for bit, for one entry's extra work.
            lo = min(mine.start, n - 2)
            run, keep = slice(lo, lo + 2), slice(mine.start - lo, mine.start - lo + 1)
        if keep.stop > keep.start:
            part = None if amax is None else [a[run] for a in amax]
            new_w, new_m = compute_attention(layout, [w[run] for w in weights],
                                             [g[run] for g in grads], [m[run] for m in moms],
                                             group0, opts, prims, part)  # fmt: skip
            new_w, new_m = [x[keep] for x in new_w], [x[keep] for x in new_m]
        else:  # fewer entries than ranks: this rank only joins the gather
            new_w, new_m = [w[:0] for w in weights], [m[:0] for m in moms]
        if opts.momentum_reproject:  # the new momentum is projected: gathered with the weights
            full = self.gather_split(new_w + new_m, n, chunk, first)
            return full[: len(weights)], full[len(weights) :]
        return self.gather_split(new_w, n, chunk, first), _momentum(
            layout, weights, grads, moms, group0, opts
        )


def _union(blocks: list[Block]) -> Block | None:
    """The block the distinct ``blocks`` tile exactly, or None."""
    distinct = set(blocks)
    box = Block(min(b.r0 for b in distinct), max(b.r1 for b in distinct),
                min(b.c0 for b in distinct), max(b.c1 for b in distinct))  # fmt: skip
    area = sum(b.size[0] * b.size[1] for b in distinct)
    return box if area == box.size[0] * box.size[1] else None


def _one_entry_differs(opts: CMOptions, w: Tensor) -> bool:
    """Whether the step of a one-entry batch can round differently from the same entry in a
    batch of several (everything else is batch-invariant: 3-D contiguous products on
    contiguous heads, ``engine.compute_attention``): ``per_mat_renorm`` sums each leg matrix
    whole (``(B, H, dh, d) -> (B,)``): with one output and several intra-op threads, the CPU
    splits that one sum over the threads (one output per thread otherwise), another
    summation order.
    """
    return opts.per_mat_renorm and w.device.type == "cpu" and torch.get_num_threads() > 1


def _momentum(layout, weights, grads, moms, group: dict, opts: CMOptions) -> list[Tensor]:
    """The new momentum stacks ``compute_attention`` returns, without the rest of the step
    (``momentum_reproject`` off). Elementwise, by the rule's own expressions and casts: every
    pair factor's ``beta m + G`` in the compute dtype (``momentum_update``, ``phases.stream``),
    rounded to the buffer's dtype as the write does; each Muon extra's rows (the layout covers
    every row exactly once) ``m mom + G`` in the buffer's dtype (``_muon_math``)."""
    cdtype = compute_dtype(weights[0].dtype)
    new_m = [(opts.beta * m.to(cdtype) + g.to(cdtype)).to(m.dtype) for m, g in zip(moms, grads)]
    for extra in layout.muon:
        m, gr = (extra.heads(x[extra.param]) for x in (moms, grads))
        extra.write(new_m[extra.param], m * group["momentum"] + gr)
    return new_m
