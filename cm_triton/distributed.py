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
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cm_triton.engine import compute_attention, compute_muon
from cm_triton.groups import group_layout
from cm_triton.head_plans import OVHeads, ov_heads, ov_sharded, qk_heads, varying_dims
from cm_triton.layouts import get_layout
from cm_triton.options import CMOptions
from cm_triton.placement import (
    Block,
    Mesh,
    blocks_of,
    is_dtensor,
    mesh_of,
    placement_key,
    shard_dim,
)
from cm_triton.reference.muon import muon_direction
from cm_triton.reference.phases import direction_scale, fusable
from cm_triton.reference.primitives import compute_dtype, ns_iterate

__all__ = ["Comm", "comm_for", "O_SIGN_STRATEGIES", "REPLICATED", "o_sign_cost"]

O_SIGN_STRATEGIES = ("auto", "gather", "sharded")
REPLICATED = ("split", "every_rank")  # how replicated (DDP) parameters are stepped


def check_replicated(replicated: str) -> None:
    if not isinstance(replicated, str) or replicated not in REPLICATED:
        raise ValueError(f"replicated must be one of {REPLICATED}, got {replicated!r}")


def _placement(p: Tensor) -> str:
    """``"sharded"``, ``"replicate"`` (a DTensor replicated on every mesh dimension) or
    ``"local"`` (a plain tensor); a placement of another kind (``Partial``) raises."""
    if not is_dtensor(p):
        return "local"
    from torch.distributed.tensor import Replicate

    if all(isinstance(pl, Replicate) for pl in p.placements):
        return "replicate"
    if all(isinstance(pl, Replicate) or shard_dim(pl) is not None for pl in p.placements):
        return "sharded"
    raise NotImplementedError(
        f"CompositionalMuon takes DTensor parameters sharded (Shard, FSDP2's strided shards) or "
        f"replicated; got placements {p.placements} for a parameter of shape {tuple(p.shape)}"
    )


def _mesh_of_params(groups: list[dict]) -> Mesh | None:
    """The root mesh of the optimizer's DTensor parameters (slices of one mesh share it)."""
    meshes: list[Any] = []
    for g in groups:
        for p in g["params"]:
            if is_dtensor(p):
                _placement(p)
                m = mesh_of(p)
                if not any(m is x or m == x for x in meshes):
                    meshes.append(m)
    if not meshes:
        return None
    if len(meshes) > 1:
        raise NotImplementedError("the optimizer's DTensor parameters live on different meshes "
                                  "(not slices of one mesh)")  # fmt: skip
    return Mesh(meshes[0])


def comm_for(groups: list[dict], explicit: Any = None, o_sign: str = "auto",
             replicated: str = "split") -> Comm | None:  # fmt: skip
    """The communicator of the optimizer's parameters: ``explicit`` (a ``Comm``, a process
    group or a ``DeviceMesh``), else the mesh of its DTensor parameters (1-D or 2-D), else
    None. ``replicated="every_rank"`` with no DTensor parameter: None (nothing to
    communicate)."""
    check_replicated(replicated)
    if isinstance(explicit, Comm):
        return explicit
    mesh = _mesh_of_params(groups)
    if explicit is not None:
        if hasattr(explicit, "get_group"):  # a DeviceMesh
            return Comm(None, o_sign, replicated, mesh or Mesh(explicit))
        if replicated == "every_rank" and mesh is None:
            return None
        return Comm(explicit, o_sign, replicated, mesh)
    if mesh is None:
        return None
    return Comm(None, o_sign, replicated, mesh)


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


@dataclass(frozen=True)
class Group:
    """A process group (``pg``; None: the default group) and its flat ranks, in its rank
    order; ``index``: this rank's position."""

    pg: Any
    members: tuple[int, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.members)


class Comm:
    """Explicit, counted collectives on one process group, and the distributed plans."""

    def __init__(self, group: Any = None, o_sign: str = "auto", replicated: str = "split",
                 mesh: Mesh | None = None) -> None:  # fmt: skip
        if o_sign not in O_SIGN_STRATEGIES:
            raise ValueError(f"o_sign must be one of {O_SIGN_STRATEGIES}, got {o_sign!r}")
        check_replicated(replicated)
        self.mesh = mesh
        if mesh is not None and group is None:
            group, self.world, self.rank = mesh.flat_group, mesh.world, mesh.rank
        else:
            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
            if mesh is not None and (mesh.world, mesh.rank) != (self.world, self.rank):
                raise ValueError("process_group: its ranks are not those of the parameters' mesh")
        self.group = group
        self.flat = Group(group, tuple(range(self.world)), self.rank)
        self.o_sign = o_sign
        self.replicated = replicated
        self.counts: Counter = Counter()  # the last step's collectives, by kind
        self.sent: Counter = Counter()  # bytes this rank sent in them (ring algorithms)
        self.plans: Counter = Counter()  # the last step's plans, by name
        self.by_plan: Counter = Counter()  # the last step's collectives, by the plan issuing them
        self._current = "agree"
        self._blocks: dict[tuple, list[Block]] = {}
        self._next_owner = 0  # Muon: the owner of the next matrix
        self._next_slot = 0  # replicated split: the rank computing the next batch's 1st chunk

    def begin_step(self) -> None:
        self.counts = Counter()
        self.sent = Counter()
        self.plans = Counter()
        self.by_plan = Counter()
        self._current = "agree"
        self._next_owner = 0
        self._next_slot = 0

    def _use(self, plan: str) -> None:
        """Count ``plan`` and charge it the collectives that follow, until the next plan."""
        self.plans[plan] += 1
        self._current = plan

    def _record(self, kind: str, nbytes: float, plan: str | None = None) -> None:
        self.counts[kind] += 1
        self.sent[kind] += nbytes
        self.by_plan[plan or self._current] += 1

    def sub(self, dims: tuple[int, ...]) -> Group:
        """The group over the mesh dimensions ``dims``."""
        assert self.mesh is not None
        if not dims:
            return Group(None, (self.rank,), 0)
        if len(dims) == self.mesh.ndim:
            return self.flat
        members = tuple(self.mesh.members(dims))
        return Group(self.mesh.group(dims), members, members.index(self.rank))

    def blocks(self, p: Tensor) -> list[Block]:
        """Every rank's block of ``p`` (``placement.blocks_of``; a plain tensor: all of it)."""
        if not is_dtensor(p):
            n = p.shape[1] if p.dim() > 1 else 1
            return [Block(0, p.shape[0], 0, n)] * self.world
        key = (tuple(p.shape), placement_key(p))
        if key not in self._blocks:
            if self.mesh is None:
                raise NotImplementedError("DTensor parameters need the optimizer's mesh")
            self._blocks[key] = blocks_of(p, self.mesh)
        return self._blocks[key]

    # -- collectives (on the flat group unless ``grp`` names another) -----------------------
    def all_reduce(self, t: Tensor, grp: Group | None = None) -> Tensor:
        """Sum over ranks, in place; returns ``t``."""
        grp = grp or self.flat
        if grp.size == 1:
            return t
        w = grp.size
        self._record("all_reduce", 2 * (w - 1) / w * t.numel() * t.element_size())
        dist.all_reduce(t, group=grp.pg)
        return t

    def all_max(self, t: Tensor) -> Tensor:
        """Elementwise maximum over ranks (a new tensor)."""
        x = t.clone()
        part = 2 * (self.world - 1) / self.world
        self._record("all_reduce", part * x.numel() * x.element_size(), "agree")
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_true(self, flags: Tensor) -> Tensor:
        """Logical AND over ranks of a bool vector."""
        x = flags.to(torch.int32)
        self._record("all_reduce", 2 * (self.world - 1) / self.world * x.numel() * 4, "agree")
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return x.bool()

    def all_gather(self, t: Tensor, grp: Group | None = None) -> Tensor:
        """``(W, *t.shape)``: every rank's ``t`` (equal shapes), in the group's order."""
        grp = grp or self.flat
        flat = t.contiguous().flatten()
        if grp.size == 1:
            return flat.view(1, *t.shape)
        out = flat.new_empty(grp.size * flat.numel())
        self._record("all_gather", (grp.size - 1) * flat.numel() * flat.element_size())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=grp.pg)
        return out.view(grp.size, *t.shape)

    def all_to_all(self, send: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        out = send.new_empty(sum(recv_splits))
        mine = send_splits[self.rank]
        self._record("all_to_all", (send.numel() - mine) * send.element_size())
        dist.all_to_all_single(out, send, recv_splits, send_splits, group=self.group)
        return out

    def gather_blocks(self, stacks: list[Tensor], params: list[Tensor], grp: Group | None = None,
                      region: list[Block] | None = None) -> list[Tensor]:  # fmt: skip
        """``(L, N_i, M_i, ...)`` stacks of ``region[i]`` of ``params[i]`` (None: all of it)
        from the blocks ``stacks[i]`` the ranks of ``grp`` hold (the flat group by default;
        uneven, empty and replicated blocks included): one all_gather of the DTensors'
        blocks (a plain tensor is whole on every rank: used as it is)."""
        grp = grp or self.flat
        sharded = [i for i, p in enumerate(params) if is_dtensor(p)]
        layout = {i: [self.blocks(params[i])[r] for r in grp.members] for i in sharded}
        pads = {i: (max(b.size[0] for b in bl), max(b.size[1] for b in bl))
                for i, bl in layout.items()}  # fmt: skip

        def padded(st: Tensor, rm: int, cm: int) -> Tensor:  # (L, r, c, rest) padded to rm, cm
            x = st if st.dim() > 2 else st.unsqueeze(-1)
            pad = [0, 0] * (x.dim() - 3) + [0, cm - x.shape[2], 0, rm - x.shape[1]]
            return torch.nn.functional.pad(x, pad)

        flat = [padded(stacks[i], *pads[i]).flatten() for i in sharded]
        sizes = [f.numel() for f in flat]
        every = self.all_gather(torch.cat(flat), grp) if flat else None  # (W, sum sizes)
        out, off = list(stacks), 0
        for i, size in zip(sharded, sizes):
            st, p, (rm, cm) = stacks[i], params[i], pads[i]
            area = _whole(p) if region is None else region[i]
            shape = (st.shape[0], *area.size, *p.shape[2:])[: 1 + p.dim()]
            full = st.new_empty(shape if st.dim() > 2 else (*shape, 1))
            rest = tuple(full.shape[3:])
            for r, blk in enumerate(layout[i]):
                piece = every[r, off : off + size].view(st.shape[0], rm, cm, *rest)
                rows = slice(blk.r0 - area.r0, blk.r1 - area.r0)
                cols = slice(blk.c0 - area.c0, blk.c1 - area.c0)
                full[:, rows, cols] = piece[:, : blk.size[0], : blk.size[1]]
            out[i] = full.view(shape)
            off += size
        return out

    def own(self, full: Tensor, p: Tensor, area: Block | None = None) -> Tensor:
        """This rank's block of a ``(L, ...)`` stack of ``area`` of ``p`` (None: all of it)."""
        if not is_dtensor(p):
            return full
        blk, at = self.blocks(p)[self.rank], area or _whole(p)
        rows = slice(blk.r0 - at.r0, blk.r1 - at.r0)
        return full[:, rows, blk.c0 - at.c0 : blk.c1 - at.c0] if full.dim() > 2 else full[:, rows]

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
        """The plan that keeps a separate q/k or v/o pair's legs where its heads live
        (``head_plans``), or None (gathered). Every rank answers the same."""
        kind, dh = group0["kind"], group0["head_dim"]
        if kind not in ("qk", "ov") or len(params) != 2:
            return None
        blocks = [self.blocks(p) for p in params]
        shapes = tuple(tuple(p.shape) for p in params)
        coords = self.mesh.coords if self.mesh is not None else [(r,) for r in range(self.world)]
        # per_mat_renorm: its norms span every head, so only a gather of whole tensors serves
        renorm = opts.per_mat_renorm
        direct = None if renorm else self._direct_plan(kind, dh, blocks, shapes, coords, opts)
        return direct or self._heads_gather_plan(kind, dh, params, blocks, shapes, coords, renorm)

    def _direct_plan(self, kind: str, dh: int, blocks, shapes, coords, opts: CMOptions):
        """Each rank's blocks hold whole heads: ``qk_local``, ``ov_local``, ``ov_sharded``."""
        if kind == "qk":
            hq, hkv = shapes[0][0] // dh, shapes[1][0] // dh
            heads = qk_heads(blocks[0], blocks[1], shapes, dh, hq // hkv)
            if heads is None:
                return None
            a, b_ = heads[self.rank]
            self._use("qk_local")
            loc = get_layout("qk", (b_ - a) * (hq // hkv), b_ - a, dh)
            return lambda w, g, m, grp, o, pr, amax: compute_attention(loc, w, g, m, grp, o, pr,
                                                                       amax)  # fmt: skip
        hkv, hq = shapes[0][0] // dh, shapes[1][1] // dh
        g = hq // hkv
        heads = ov_heads(blocks[0], blocks[1], shapes, dh, g, coords)
        if heads is None:
            return None
        mine = heads[self.rank]
        uni = mine.universe[1] - mine.universe[0]
        if mine.width_dim is None:  # o's rows whole: every leg local, the hybrid sign gathered
            self._use("ov_local")
            loc = get_layout("ov", uni * g, uni, dh)

            def local(w, gr, m, grp, o, pr, amax):
                if o.hybrid:
                    pr = dataclasses.replace(pr, whole_msign=self._whole_sign(heads, blocks[1],
                                                                              o, pr))  # fmt: skip
                return compute_attention(loc, w, gr, m, grp, o, pr, amax)

            return local
        if not fusable(opts, dh, shapes[1][0], shapes[0][1]):
            return None
        self._use("ov_sharded")
        width = self.sub((mine.width_dim,))

        def sharded(w, gr, m, grp, o, pr, amax):
            scale = None if amax is None else direction_scale(*amax)
            return ov_sharded(self, dh, g, heads, blocks[1], width, w, gr, m, o, pr, scale)

        return sharded

    def _heads_gather_plan(self, kind: str, dh: int, params, blocks, shapes, coords,
                           whole: bool = False):  # fmt: skip
        """A 2-D mesh whose blocks cut heads (FSDP2's rows inside a TP rank's KV head): the
        ranks along one mesh dimension together hold whole heads (a TP rank's), so the pair
        is gathered over that dimension only (``heads_gather``: one all_gather within the
        group) and its heads stepped there; the hybrid O sign across the other dimension.
        ``whole``: only where that group holds the whole pair (HSDP's shard dimension)."""
        if self.mesh is None or self.mesh.ndim < 2:
            return None
        for d in range(self.mesh.ndim):
            union = [[_union([bl[m] for m in self.mesh.members((d,), r)])
                      for r in range(self.world)] for bl in blocks]  # fmt: skip
            if any(u is None for per in union for u in per):
                continue
            if whole and any(u != _whole(p) for per, p in zip(union, params) for u in per):
                continue
            if kind == "qk":
                hq, hkv = shapes[0][0] // dh, shapes[1][0] // dh
                heads = qk_heads(union[0], union[1], shapes, dh, hq // hkv)
                if heads is None:
                    continue
                a, b_ = heads[self.rank]
                loc = get_layout("qk", (b_ - a) * (hq // hkv), b_ - a, dh)
                ov = None
            else:
                hkv, hq = shapes[0][0] // dh, shapes[1][1] // dh
                ov = ov_heads(union[0], union[1], shapes, dh, hq // hkv, coords)
                if ov is None or ov[self.rank].width_dim is not None:
                    continue
                uni = ov[self.rank].universe
                loc = get_layout("ov", (uni[1] - uni[0]) * (hq // hkv), uni[1] - uni[0], dh)
            self._use("heads_gather")
            grp, region = self.sub((d,)), [u[self.rank] for u in union]

            def run(w, g, m, group0, o, pr, amax, loc=loc, ov=ov, grp=grp, region=region,
                    o_union=union[-1]):  # fmt: skip
                if ov is not None and o.hybrid:
                    pr = dataclasses.replace(pr, whole_msign=self._whole_sign(ov, o_union, o,
                                                                              pr))  # fmt: skip
                return self._gathered(loc, params, w, g, m, group0, o, pr, amax, grp,
                                      region)  # fmt: skip

            return run
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

    def muon(self, b, w, g, m, group: dict, opts: CMOptions, prims, amax=None):
        """Muon on a batch of sharded matrices: each orthogonalised once, on its owner rank.
        Every plan takes Muon's own sign (as the owner plan must: it gathers the direction,
        not the weights), so the plans agree bit for bit."""
        prims = dataclasses.replace(prims, in_place=False)
        params = b.params[0]
        where = _placement(params[0])
        shape = group.get("shape", "matrix")
        if self.replicated == "split" and where == "local":  # replicated: split over L
            self._use("muon_replicated_split")
            mine, chunk, first = self.split(w.shape[0])
            part = w[:0]
            if mine.stop > mine.start:
                part, _ = compute_muon(w[mine], g[mine], m[mine], group, opts, prims,
                                       None if amax is None else amax[mine])  # fmt: skip
            (w_new,) = self.gather_split([part], w.shape[0], chunk, first)
            return w_new, m * group["momentum"] + g  # compute_muon's momentum, elementwise
        blocks = self.blocks(params[0]) if where == "sharded" else None
        full_shape = tuple(params[0].shape)
        whole_cols = blocks is None or all((b_.c0, b_.c1) == (0, full_shape[1]) for b_ in blocks)
        if where != "sharded" or shape.startswith("experts") and whole_cols:
            self._use("muon_local")  # whole matrices (expert stacks split by experts)
            return compute_muon(w, g, m, group, opts, prims, amax)
        if len(full_shape) > 2 and not whole_cols:
            raise NotImplementedError(
                f"Muon: a {len(full_shape)}-D parameter of shape {full_shape} split along its "
                f"dimension 1 ({params[0].placements}): only its first dimension may be sharded"
            )
        self._use("muon_owner")
        return muon_owner(self, blocks, params, w, g, m, group, opts, prims, amax)


def muon_owner(comm: Comm, blocks: list[Block], params: list[Tensor], w, g, m, group: dict,
               opts: CMOptions, prims, amax=None):  # fmt: skip
    """Muon on matrices split into blocks over the ranks (rows under FSDP2, columns under
    tensor parallel, both under FSDP2 x TP): each matrix orthogonalised once, on its owner
    (owners rotate over the step's matrices and every rank, replicas included, so a replicate
    dimension shares the work). One all_to_all sends each block to its owner, from one holder
    of each distinct block (a replica sends nothing); one sends every rank its block of the
    result."""
    mom = group["momentum"]
    m_new = m * mom + g
    update = (g + mom * m_new).flatten(2)  # (L, rows_loc, cols_loc * rest)
    if amax is not None:  # the power of two one process scales this update by
        update = update * direction_scale(amax)[:, None, None]
    full_shape = tuple(params[0].shape)
    rest = math.prod(full_shape[2:])
    n, k = full_shape[0], math.prod(full_shape[1:])
    flat = [Block(b.r0, b.r1, b.c0 * rest, b.c1 * rest) for b in blocks]
    source = [flat.index(b) == r for r, b in enumerate(flat)]  # the first holder sends
    rm, cm = max(b.size[0] for b in flat), max(b.size[1] for b in flat)
    per, world, me = rm * cm, comm.world, comm.rank
    owner = [(comm._next_owner + i) % world for i in range(len(params))]
    comm._next_owner += len(params)
    mine = [i for i, o in enumerate(owner) if o == me]
    cdt = compute_dtype(w.dtype)
    mb = flat[me]
    padded = torch.nn.functional.pad(update.to(cdt), (0, cm - mb.size[1], 0, rm - mb.size[0]))
    empty = padded.new_empty(0)
    send = torch.cat([padded[[i for i, o in enumerate(owner) if o == r]].flatten()
                      if source[me] else empty for r in range(world)])  # fmt: skip
    send_splits = [owner.count(r) * per if source[me] else 0 for r in range(world)]
    recv = comm.all_to_all(
        send, send_splits, [len(mine) * per if source[r] else 0 for r in range(world)]
    )
    full = padded.new_empty(len(mine), n, k)
    off = 0
    for r in range(world):
        if source[r]:
            piece = recv[off : off + len(mine) * per].view(len(mine), rm, cm)
            b = flat[r]
            full[:, b.rows, b.cols] = piece[:, : b.size[0], : b.size[1]]
            off += len(mine) * per
    o = muon_direction(full, opts.ns_coefficients, opts.ns_dtype, opts.ns_method,
                       opts.ns_restart, prims.msign)  # fmt: skip
    back = torch.cat([torch.nn.functional.pad(o[:, flat[r].rows, flat[r].cols],
                                              (0, cm - flat[r].size[1], 0, rm - flat[r].size[0]))
                      .flatten() for r in range(world)])  # fmt: skip
    got = comm.all_to_all(back, [len(mine) * per] * world, [owner.count(r) * per
                                                            for r in range(world)])  # fmt: skip
    result = torch.empty(len(params), rm, cm, dtype=cdt, device=w.device)
    off = 0
    for r in range(world):  # from each owner r: its matrices' blocks of this rank, in order
        idx = [i for i, o_ in enumerate(owner) if o_ == r]
        if idx:
            result[idx] = got[off : off + len(idx) * per].view(len(idx), rm, cm)
        off += len(idx) * per
    o_local = result[:, : mb.size[0], : mb.size[1]]
    transposed = group.get("shape", "matrix").endswith("_t")
    scale = math.sqrt(max(1.0, (k / n) if transposed else (n / k)))
    lr, wd = group["lr"], group["weight_decay"]
    w_new = w * (1 - lr * wd) - (lr * scale) * o_local.reshape(w.shape)
    return w_new.to(w.dtype), m_new


def _union(blocks: list[Block]) -> Block | None:
    """The block the distinct ``blocks`` tile exactly, or None."""
    distinct = set(blocks)
    box = Block(min(b.r0 for b in distinct), max(b.r1 for b in distinct),
                min(b.c0 for b in distinct), max(b.c1 for b in distinct))  # fmt: skip
    area = sum(b.size[0] * b.size[1] for b in distinct)
    return box if area == box.size[0] * box.size[1] else None


def _whole(p: Tensor) -> Block:
    return Block(0, p.shape[0], 0, p.shape[1] if p.dim() > 1 else 1)


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
