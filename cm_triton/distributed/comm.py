"""The communicator: one flat process group over the mesh's ranks (and one per mesh dimension),
explicit collectives counted by kind, plan and bytes, and the blocks each rank holds
(``cm_triton.placement``). The plans are its mixins: ``attention.AttentionPlans``,
``muon.MuonPlans`` (see the package doc)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cm_triton.distributed.attention import AttentionPlans, o_sign_cost
from cm_triton.distributed.muon import MuonPlans
from cm_triton.placement import (
    Block,
    Group,
    Mesh,
    blocks_of,
    is_dtensor,
    mesh_of,
    placement_key,
    placement_of,
    whole_block,
)

__all__ = ["Comm", "Group", "O_SIGN_STRATEGIES", "REPLICATED", "check_replicated", "comm_for",
           "o_sign_cost"]  # fmt: skip

O_SIGN_STRATEGIES = ("auto", "gather", "sharded")
REPLICATED = ("split", "every_rank")  # how replicated (DDP) parameters are stepped


def check_replicated(replicated: str) -> None:
    if not isinstance(replicated, str) or replicated not in REPLICATED:
        raise ValueError(f"replicated must be one of {REPLICATED}, got {replicated!r}")


def _mesh_of_params(groups: list[dict]) -> Mesh | None:
    """The root mesh of the optimizer's DTensor parameters (slices of one mesh share it)."""
    meshes: list[Any] = []
    for g in groups:
        for p in g["params"]:
            if is_dtensor(p):
                placement_of(p)
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


class Comm(AttentionPlans, MuonPlans):
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
        """Every rank's block of ``p`` (``cm_triton.placement.blocks_of``; a plain tensor:
        all of it)."""
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
            area = whole_block(p) if region is None else region[i]
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
        blk, at = self.blocks(p)[self.rank], area or whole_block(p)
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
