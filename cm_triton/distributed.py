"""CompositionalMuon on sharded parameters (FSDP2: DTensors with ``Shard(0)`` on a 1-D mesh).

Everything is computed on ``to_local()`` shards with explicit collectives on the mesh's group,
never by implicit DTensor redistribution. FSDP2 shards weights by rows, and the rows of
q/k/v are heads, which CM can exploit (``Comm.attention`` picks a plan per batch):

- ``"qk"`` pairs whose query and KV heads split evenly (Hq and Hkv divisible by the world
  size): rank r's query heads are exactly the queries of its KV heads, so the step is local:
  **no collective** (every flag but per_mat_renorm, whose norms span all heads).
- ``"ov"`` pairs with V heads split evenly: o_w's rows are the model width, so each rank holds
  a width slice of *every* O head. **One all_reduce** carries the O Grams (summed over the
  width) and the V Grams (each from its owner); the V legs are then local. The O leg: per head,
  one more all_reduce for the Gram restart; hybrid (one sign over all of o_w), either
  ``"gather"`` (one all_gather of the whitened direction, then the single-process sign) or
  ``"sharded"`` (Newton-Schulz whose ``X X^T`` is all-reduced each step), by a cost estimate
  (``o_sign="auto"``). For Gram-form flags (``reference.phases.fusable``).
- anything else (fused q/k/v, uneven heads, joint OV, connections, per_mat_renorm): the
  pair's weights, gradients and momentum are all-gathered (**one all_gather**), the
  single-process step runs on every rank, and each keeps its rows.
- Muon: matrices sharded by rows are orthogonalised once, on one owner rank each (microsoft/
  dion's scheme): one all_to_all sends every shard to its owner, one sends the result back.
  Expert stacks sharded along the expert axis hold whole matrices: local.
- AdamW: elementwise on the shards, local.

Replicated parameters (plain tensors, as DDP keeps them: identical on every rank) with a
process group: ``replicated="split"`` (the default) splits each batch's L stacked entries
(layers) into contiguous chunks of ``ceil(L / W)``, rank r computes the step of its chunk
(the chunks' first rank rotates over the step's batches, so small batches spread), and
**one all_gather** per batch (chunks padded to equal sizes, all of a batch's weight stacks in
one buffer) brings every rank the full new weights: plan ``"replicated_split"`` (attention)
or ``"muon_replicated_split"``. The momentum update is elementwise (``beta m + G``; Muon's
``m mom + G`` for Muon rows), so every rank computes it for all L with the rule's own
expression, bit for bit, and nothing more is sent; ``momentum_reproject`` writes a projected
momentum, which is gathered with the weights instead. Batched products on 3-D contiguous
stacks are batch-invariant on the CPU, so the result equals the single-process step bit for
bit; where a one-entry chunk of a longer batch would round differently (``_one_entry_differs``)
that rank computes a neighbouring entry along. Whatever the device, every rank ends the step
with the same gathered bytes: the replicas never drift apart. ``replicated="every_rank"``:
every rank computes everything (plan ``"local"``), and with no DTensor parameter there is no
communicator at all (zero collectives, as without a group). Replicated DTensors (``Replicate``
placements) keep the ``"local"`` plan.

Every decision that could differ between ranks (non-finite gradients, a non-finite result) is
agreed by an all_reduce first, so no rank ever waits in a collective another rank skipped.
``Comm.counts`` holds the last step's collectives, by kind.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cm_triton.engine import compute_attention, compute_muon
from cm_triton.groups import group_layout
from cm_triton.layouts import get_layout
from cm_triton.options import CMOptions
from cm_triton.reference.muon import muon_direction
from cm_triton.reference.phases import (
    direction_scale,
    fusable,
    hybrid_update,
    leg_update,
    partner_roots_from_grams,
)
from cm_triton.reference.primitives import compute_dtype, ns_iterate

__all__ = ["Comm", "comm_for", "O_SIGN_STRATEGIES", "REPLICATED", "o_sign_cost"]

O_SIGN_STRATEGIES = ("auto", "gather", "sharded")
REPLICATED = ("split", "every_rank")  # how replicated (DDP) parameters are stepped


def check_replicated(replicated: str) -> None:
    if not isinstance(replicated, str) or replicated not in REPLICATED:
        raise ValueError(f"replicated must be one of {REPLICATED}, got {replicated!r}")


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _placement(p: Tensor) -> str:
    """``"shard0"``, ``"replicate"`` or ``"local"`` (a plain tensor); other layouts raise."""
    dtensor = _dtensor_cls()
    if dtensor is None or not isinstance(p, dtensor):
        return "local"
    from torch.distributed.tensor import Replicate, Shard

    (pl,) = p.placements if len(p.placements) == 1 else (None,)
    if isinstance(pl, Shard) and pl.dim == 0:
        return "shard0"
    if isinstance(pl, Replicate):
        return "replicate"
    raise NotImplementedError(
        f"CompositionalMuon supports DTensor parameters sharded by rows (Shard(0), FSDP2) or "
        f"replicated on a 1-D mesh; got placements {p.placements} for a parameter of shape "
        f"{tuple(p.shape)}"
    )


def comm_for(groups: list[dict], explicit: Any = None, o_sign: str = "auto",
             replicated: str = "split") -> Comm | None:  # fmt: skip
    """The communicator of the optimizer's parameters: ``explicit`` (a ``Comm``, a process
    group or a 1-D ``DeviceMesh``), else the mesh of its DTensor parameters, else None.
    ``replicated="every_rank"`` with no DTensor parameter: None (nothing to communicate)."""
    check_replicated(replicated)
    if isinstance(explicit, Comm):
        return explicit
    dtensor = _dtensor_cls()
    if explicit is not None:
        if hasattr(explicit, "get_group"):
            if explicit.ndim != 1:
                raise NotImplementedError(f"a 1-D device mesh is needed, got {explicit.ndim}-D")
            explicit = explicit.get_group()
        plain = dtensor is None or not any(isinstance(p, dtensor) for g in groups
                                           for p in g["params"])  # fmt: skip
        if replicated == "every_rank" and plain:
            return None
        return Comm(explicit, o_sign, replicated)
    meshes = []
    for g in groups:
        for p in g["params"]:
            if dtensor is not None and isinstance(p, dtensor):
                _placement(p)
                if not meshes or p.device_mesh is not meshes[0] and p.device_mesh != meshes[0]:
                    meshes.append(p.device_mesh)
    if not meshes:
        return None
    if len(meshes) > 1:
        raise NotImplementedError("the optimizer's DTensor parameters live on different meshes")
    if meshes[0].ndim != 1:
        raise NotImplementedError(f"a 1-D device mesh is needed, got {meshes[0].ndim}-D (HSDP)")
    return Comm(meshes[0].get_group(), o_sign, replicated)


def _rows(p: Tensor, world: int, rank: int) -> tuple[int, int, int]:
    """``(start, stop, chunk)`` of this rank's rows of ``p`` (torch.chunk's split, as FSDP2)."""
    n = p.shape[0]
    if _placement(p) != "shard0":
        return 0, n, n
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n), chunk


def o_sign_cost(n: int, d: int, world: int, flops_per_s: float = 2e14,
                bytes_per_s: float = 5e10) -> dict[str, float]:  # fmt: skip
    """Estimated seconds of the hybrid O sign of an ``n x d`` matrix (n = Hq dh rows, width d
    sharded over ``world`` ranks), 8 Newton-Schulz steps, fp32 transfers. ``"gather"``: one
    all_gather of the whole direction, every rank computes the whole sign; ``"sharded"``: each
    step all-reduces ``X X^T`` (a ring all_reduce moves 2(W-1)/W of it), the big products are
    split over ranks. Defaults: ~200 TFLOP/s of bf16 matmul, ~50 GB/s per rank between nodes
    (assumptions, not measurements)."""
    part = (world - 1) / world
    gather = 8 * (4 * n * n * d + 2 * n**3) / flops_per_s + 4 * n * d * part / bytes_per_s
    sharded = (8 * (4 * n * n * d / world + 2 * n**3) / flops_per_s
               + 8 * 2 * 4 * n * n * part / bytes_per_s)  # fmt: skip
    return {"gather": gather, "sharded": sharded}


class Comm:
    """Explicit, counted collectives on one process group, and the distributed plans."""

    def __init__(self, group: Any = None, o_sign: str = "auto", replicated: str = "split") -> None:
        if o_sign not in O_SIGN_STRATEGIES:
            raise ValueError(f"o_sign must be one of {O_SIGN_STRATEGIES}, got {o_sign!r}")
        check_replicated(replicated)
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.o_sign = o_sign
        self.replicated = replicated
        self.counts: Counter = Counter()  # the last step's collectives, by kind
        self.sent: Counter = Counter()  # bytes this rank sent in them (ring algorithms)
        self.plans: Counter = Counter()  # the last step's plans, by name
        self._next_owner = 0  # Muon: the owner of the next matrix
        self._next_slot = 0  # replicated split: the rank computing the next batch's 1st chunk

    def begin_step(self) -> None:
        self.counts = Counter()
        self.sent = Counter()
        self.plans = Counter()
        self._next_owner = 0
        self._next_slot = 0

    def _record(self, kind: str, nbytes: float) -> None:
        self.counts[kind] += 1
        self.sent[kind] += nbytes

    # -- collectives ------------------------------------------------------------------------
    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks, in place; returns ``t``."""
        w = self.world
        self._record("all_reduce", 2 * (w - 1) / w * t.numel() * t.element_size())
        dist.all_reduce(t, group=self.group)
        return t

    def all_max(self, t: Tensor) -> Tensor:
        """Elementwise maximum over ranks (a new tensor)."""
        x = t.clone()
        self._record("all_reduce", 2 * (self.world - 1) / self.world * x.numel() * x.element_size())
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_true(self, flags: Tensor) -> Tensor:
        """Logical AND over ranks of a bool vector."""
        x = flags.to(torch.int32)
        self._record("all_reduce", 2 * (self.world - 1) / self.world * x.numel() * 4)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return x.bool()

    def all_gather(self, t: Tensor) -> Tensor:
        """``(W, *t.shape)``: every rank's ``t`` (equal shapes)."""
        flat = t.contiguous().flatten()
        out = flat.new_empty(self.world * flat.numel())
        self._record("all_gather", (self.world - 1) * flat.numel() * flat.element_size())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=self.group)
        return out.view(self.world, *t.shape)

    def all_to_all(self, send: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        out = send.new_empty(sum(recv_splits))
        mine = send_splits[self.rank]
        self._record("all_to_all", (send.numel() - mine) * send.element_size())
        dist.all_to_all_single(out, send, recv_splits, send_splits, group=self.group)
        return out

    def gather_rows(self, stacks: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        """Full ``(L, N_i, ...)`` stacks from each rank's row shards ``stacks[i]`` of
        ``params[i]`` (uneven and empty shards included): one all_gather for all of them."""
        layout = [_rows(p, self.world, self.rank) for p in params]
        flat = []
        for st, (_, _, chunk) in zip(stacks, layout):
            pad = chunk - st.shape[1]
            flat.append(torch.nn.functional.pad(st.flatten(2), (0, 0, 0, pad)).flatten())
        sizes = [f.numel() for f in flat]
        every = self.all_gather(torch.cat(flat))  # (W, sum sizes)
        out = []
        for i, (st, p, size) in enumerate(zip(stacks, params, sizes)):
            off = sum(sizes[:i])
            chunk = layout[i][2]
            blocks = every[:, off : off + size].reshape(self.world, st.shape[0], chunk, -1)
            n = p.shape[0]
            full = blocks.transpose(0, 1).reshape(st.shape[0], self.world * chunk, -1)[:, :n]
            out.append(full.reshape(st.shape[0], n, *st.shape[2:]))
        return out

    def split(self, n: int) -> tuple[slice, int, int]:
        """This rank's share of a replicated batch of ``n`` entries: ``(entries, chunk,
        first)``: contiguous chunks of ``ceil(n / W)`` (torch.chunk's split), chunk ``c``
        computed by rank ``(first + c) % W``; ``first`` rotates over the step's batches."""
        w = self.world
        chunk = max(1, -(-n // w))
        first = self._next_slot
        self._next_slot = (first + -(-n // chunk)) % w
        start = min(((self.rank - first) % w) * chunk, n)
        return slice(start, min(start + chunk, n)), chunk, first

    def gather_split(self, parts: list[Tensor], n: int, chunk: int, first: int) -> list[Tensor]:
        """Full ``(n, ...)`` stacks from each rank's chunk ``parts[i]`` (``split``'s, possibly
        empty): one all_gather of every part, as bytes (so dtypes may differ), each chunk
        padded to ``chunk`` entries."""
        flat = []
        for x in parts:
            pad = x.new_zeros(chunk - x.shape[0], *x.shape[1:])
            flat.append(torch.cat([x, pad]).reshape(-1).view(torch.uint8))
        sizes = [f.numel() for f in flat]
        every = self.all_gather(torch.cat(flat))  # (W, sum sizes): rank r's bytes in row r
        by_chunk = every[[(first + c) % self.world for c in range(self.world)]]
        out = []
        for x, piece in zip(parts, by_chunk.split(sizes, 1)):
            full = piece.contiguous().view(-1).view(x.dtype)
            out.append(full.view(self.world * chunk, *x.shape[1:])[:n])
        return out

    # -- plans --------------------------------------------------------------------------------
    def attention(self, b, weights, grads, moms, opts: CMOptions, prims, amax=None):
        """New local weight and momentum stacks of one attention batch (see the module doc).
        ``amax``: per position, each layer's largest gradient or momentum magnitude, the same
        on every rank (``engine._agree_scales``): every plan scales as one process would."""
        group0 = b.members[0]
        params = [ps[0] for ps in b.params]
        where = [_placement(p) for p in params]
        layout = group_layout(group0)
        if self.replicated == "split" and all(w == "local" for w in where):
            self.plans["replicated_split"] += 1
            return self._split_attention(layout, weights, grads, moms, group0, opts, prims, amax)
        if all(w != "shard0" for w in where):
            self.plans["local"] += 1
            return compute_attention(layout, weights, grads, moms, group0, opts, prims, amax)
        kind, dh, w = group0["kind"], group0["head_dim"], self.world
        even = all(w_ == "shard0" and p.shape[0] % (w * dh) == 0 for w_, p in zip(where, params))
        if kind == "qk" and even and not opts.per_mat_renorm:
            self.plans["qk_local"] += 1
            hq, hkv = params[0].shape[0] // dh, params[1].shape[0] // dh
            loc = get_layout("qk", hq // w, hkv // w, dh)
            return compute_attention(loc, weights, grads, moms, group0, opts, prims, amax)
        v, o = params if kind == "ov" else (None, None)
        ov_ok = kind == "ov" and where == ["shard0", "shard0"] and v.shape[0] % (w * dh) == 0
        if ov_ok and fusable(opts, dh, o.shape[0], v.shape[1]) and not opts.per_mat_renorm:
            self.plans["ov_sharded"] += 1
            scale = None if amax is None else direction_scale(*amax)
            return self._ov_sharded(dh, params, weights, grads, moms, opts, prims, scale)
        self.plans["gather"] += 1
        n = len(params)
        if opts.momentum_reproject or layout.muon:  # these read the whole momentum
            full = self.gather_rows([*weights, *grads, *moms], params * 3)
            new_w, new_m = compute_attention(layout, full[:n], full[n : 2 * n], full[2 * n :],
                                             group0, opts, prims, amax)  # fmt: skip
            return [self._own_rows(x, p) for x, p in zip(new_w, params)], [
                self._own_rows(x, p) for x, p in zip(new_m, params)
            ]
        # The momentum update is elementwise: done here on the shards, and only the weights and
        # the direction are gathered. The rule then sees the direction as a gradient with zero
        # momentum and beta 0: m = 0 * 0 + D = D exactly, so its arithmetic is unchanged.
        new_m = [opts.beta * m + g for m, g in zip(moms, grads)]
        dirs = [g + opts.beta * m if opts.nesterov else m for g, m in zip(grads, new_m)]
        full = self.gather_rows([*weights, *dirs], params * 2)
        plain = dataclasses.replace(opts, beta=0.0, nesterov=False)
        zeros = [torch.zeros_like(x) for x in full[n:]]
        new_w, _ = compute_attention(layout, full[:n], full[n:], zeros, group0, plain, prims,
                                     amax)  # fmt: skip
        return [self._own_rows(x, p) for x, p in zip(new_w, params)], new_m

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

    def _own_rows(self, full: Tensor, p: Tensor) -> Tensor:
        start, stop, _ = _rows(p, self.world, self.rank)
        return full[:, start:stop]

    def _ov_sharded(self, dh: int, params, weights, grads, moms, opts: CMOptions, prims,
                    scale=None):  # fmt: skip
        """OV with V heads split evenly and o_w's rows (the width) sharded: see module doc.
        ``scale (L,)``: the pair's direction power of two, agreed over the ranks."""
        v_p, o_p = params
        hq, hkv = o_p.shape[1] // dh, v_p.shape[0] // dh
        hkv_loc = hkv // self.world
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
        # One all_reduce: O Grams (partial over the width), V Grams (each from its owner rank),
        # and, for per-head O legs, the O direction Grams.
        first = self.rank * hkv_loc
        a_v_all = a_v.new_zeros(a_v.shape[0], hkv, dh, dh)
        a_v_all[:, first : first + hkv_loc] = a_v
        parts = [a_o, a_v_all] + ([] if opts.hybrid else [s_o])
        packed = self.all_reduce(torch.cat([x.flatten(1) for x in parts], 1))
        sizes = [x[0].numel() for x in parts]
        pieces = [c.view_as(x) for c, x in zip(packed.split(sizes, 1), parts)]
        a_o, a_v_all = pieces[0], pieces[1]
        root_o, root_v = partner_roots_from_grams(a_o, a_v_all, opts, ops)
        own_v = None if root_v is None else root_v[:, first : first + hkv_loc]
        b_o, b_v = opts.budgets(hq // hkv)
        v_new = leg_update(v, gv, mv_new, s_v, own_v, opts, b_v, ops, scale=scale)
        if opts.hybrid:
            sign = self._o_sign_fn(opts, hq * dh, o_p, prims)
            o_new = hybrid_update(o, go, mo_new, root_o, opts, sign, scale=scale)
        else:
            o_new = leg_update(o, go, mo_new, pieces[2], root_o, opts, b_o, ops,
                               reduce=self.all_reduce, scale=scale)  # fmt: skip

        def v_back(x):
            return x.flatten(1, 2)

        def o_back(x):  # P-form (L, hq, dh, d_loc) -> (L, d_loc, hq*dh)
            return x.permute(0, 3, 1, 2).flatten(2)

        return [v_back(v_new), o_back(o_new)], [v_back(mv_new), o_back(mo_new)]

    def _o_sign_fn(self, opts: CMOptions, n: int, o_p: Tensor, prims):
        """The hybrid O sign of ``(L, n, d_loc)`` directions whose width (o_w's rows) is
        sharded: a function of the local columns returning the local columns of the sign."""
        d = o_p.shape[0]
        strategy = self.o_sign
        if strategy == "auto":
            cost = o_sign_cost(n, d, self.world)
            strategy = min(cost, key=cost.get)
        if strategy == "sharded" and n > d:
            strategy = "gather"  # the sharded iteration runs on the wide orientation only
        self.plans[f"o_sign_{strategy}"] += 1
        start, stop, chunk = _rows(o_p, self.world, self.rank)

        def gathered(x: Tensor) -> Tensor:
            every = self.all_gather(torch.nn.functional.pad(x, (0, chunk - x.shape[-1])))
            full = every.permute(1, 2, 0, 3).reshape(x.shape[0], x.shape[1], -1)[..., :d]
            u = prims.msign(full, opts.ns_coefficients, opts.ns_dtype, "ns", 0)
            return u[..., start:stop]

        def sharded(x: Tensor) -> Tensor:
            return self.sharded_msign(x, opts.ns_coefficients, opts.ns_dtype)

        return gathered if strategy == "gather" else sharded

    def sharded_msign(self, x: Tensor, coefficients, dtype) -> Tensor:
        """``msign`` of ``(B, n, d)`` matrices whose width d is sharded (``x`` holds this
        rank's columns), by Newton-Schulz with ``X X^T`` all-reduced each step (n <= d)."""
        out_dtype = compute_dtype(x.dtype)
        y = x.to(out_dtype)
        sq = self.all_reduce(y.square().sum((-2, -1)))
        y = y / (sq.sqrt()[:, None, None] * 1.01 + 1e-7)
        y = ns_iterate(y.to(dtype or out_dtype), coefficients, self.all_reduce)
        return y.to(out_dtype)

    def muon(self, b, w, g, m, group: dict, opts: CMOptions, prims, amax=None):
        """Muon on a batch of sharded matrices: each orthogonalised once, on its owner rank.
        Every plan takes Muon's own sign (as the owner plan must: it gathers the direction,
        not the weights), so the plans agree bit for bit."""
        prims = dataclasses.replace(prims, in_place=False)
        params = b.params[0]
        where = _placement(params[0])
        shape = group.get("shape", "matrix")
        if self.replicated == "split" and where == "local":  # replicated: split over L
            self.plans["muon_replicated_split"] += 1
            mine, chunk, first = self.split(w.shape[0])
            part = w[:0]
            if mine.stop > mine.start:
                part, _ = compute_muon(w[mine], g[mine], m[mine], group, opts, prims,
                                       None if amax is None else amax[mine])  # fmt: skip
            (w_new,) = self.gather_split([part], w.shape[0], chunk, first)
            return w_new, m * group["momentum"] + g  # compute_muon's momentum, elementwise
        if where != "shard0" or shape.startswith("experts"):  # whole matrices are local
            self.plans["muon_local"] += 1
            return compute_muon(w, g, m, group, opts, prims, amax)
        self.plans["muon_owner"] += 1
        mom = group["momentum"]
        m_new = m * mom + g
        update = (g + mom * m_new).flatten(2)  # (L, rows_loc, K)
        if amax is not None:  # the power of two one process scales this update by
            update = update * direction_scale(amax)[:, None, None]
        n, k = params[0].shape[0], update.shape[-1]
        start, stop, chunk = _rows(params[0], self.world, self.rank)
        rows = [_rows(params[0], self.world, r) for r in range(self.world)]
        # Owners rotate over the step's batches, so a model's matrices spread over all ranks.
        owner = [(self._next_owner + i) % self.world for i in range(len(params))]
        self._next_owner += len(params)
        mine = [i for i, o in enumerate(owner) if o == self.rank]
        cdt = compute_dtype(w.dtype)
        padded = torch.nn.functional.pad(update.to(cdt), (0, 0, 0, chunk - (stop - start)))
        send = torch.cat([padded[[i for i, o in enumerate(owner) if o == r]].flatten()
                          for r in range(self.world)])  # fmt: skip
        per = chunk * k
        send_splits = [owner.count(r) * per for r in range(self.world)]
        recv = self.all_to_all(send, send_splits, [len(mine) * per] * self.world)
        pieces = recv.view(self.world, len(mine), chunk, k)
        full = torch.cat([pieces[r, :, : rows[r][1] - rows[r][0]] for r in range(self.world)], 1)
        o = muon_direction(full, opts.ns_coefficients, opts.ns_dtype, opts.ns_method,
                           opts.ns_restart, prims.msign)  # fmt: skip
        back = torch.cat([torch.nn.functional.pad(o[:, rows[r][0] : rows[r][1]],
                                                  (0, 0, 0, chunk - (rows[r][1] - rows[r][0])))
                          .flatten() for r in range(self.world)])  # fmt: skip
        got = self.all_to_all(back, [len(mine) * per] * self.world, send_splits)
        # got: for each owner r, the owned matrices' rows of this rank, in owner order
        result = torch.empty(len(params), chunk, k, dtype=cdt, device=w.device)
        off = 0
        for r in range(self.world):
            idx = [i for i, o_ in enumerate(owner) if o_ == r]
            cnt = len(idx) * per
            if idx:
                result[idx] = got[off : off + cnt].view(len(idx), chunk, k)
            off += cnt
        o_local = result[:, : stop - start].view(update.shape)
        rows_, cols = (n, k)
        transposed = shape.endswith("_t")
        scale = math.sqrt(max(1.0, (cols / rows_) if transposed else (rows_ / cols)))
        lr, wd = group["lr"], group["weight_decay"]
        w_new = w * (1 - lr * wd) - (lr * scale) * o_local.view(w.shape)
        return w_new.to(w.dtype), m_new


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
