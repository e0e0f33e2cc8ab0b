"""Where each piece of a DTensor parameter lives: its block on every rank of its mesh (no math).

A DTensor on a 1-D or 2-D ``DeviceMesh`` (FSDP2, tensor parallel, HSDP, FSDP2 x TP) holds on
each rank one block of the full tensor: a contiguous range of rows and of columns for the
placements PyTorch's parallelisms produce (``Shard(0)``, ``Shard(1)``, ``Replicate()`` and the
``_StridedShard(0)`` that ``fully_shard`` puts over a ``ColwiseParallel`` weight). ``Mesh``
numbers the mesh's ranks in one flat order (the global ranks, ascending) and ``blocks_of``
gives every rank's block, computed the way torch splits (left to right over the mesh
dimensions, ``torch.chunk`` sizes; a strided shard takes its piece of each of ``split_factor``
chunks). A block that is not contiguous, a sharded dimension past the first two, or a
placement of another kind is refused with an error naming the parameter's shape and
placements; this rank's block is checked against torch's own answer
(``compute_local_shape_and_global_offset``) before it is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "block_at",
    "Group",
    "placement_of",
    "whole_block",
    "Block",
    "Mesh",
    "blocks_of",
    "is_dtensor",
    "mesh_of",
    "placement_key",
    "root_mesh",
    "shard_dim",
]


@dataclass(frozen=True)
class Block:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of a parameter's first two dimensions held
    by one rank (every later dimension whole)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r1)

    @property
    def cols(self) -> slice:
        return slice(self.c0, self.c1)

    @property
    def size(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


class Mesh:
    """A device mesh's ranks in one flat order, and a process group for each set of its
    dimensions the plans communicate over (a dimension's own group; all of them: the flat
    group). ``coords[r]``: the mesh coordinate of flat rank ``r``."""

    def __init__(self, device_mesh: Any) -> None:
        self.device_mesh = device_mesh
        self.shape = tuple(device_mesh.shape)
        self.ndim = len(self.shape)
        ranks = device_mesh.mesh.flatten().tolist()
        self.world = len(ranks)
        if self.ndim == 1:
            self.flat_group = device_mesh.get_group()
        elif self.world == dist.get_world_size():
            self.flat_group = None  # the default group: every rank, in global order
        else:
            raise NotImplementedError(
                f"a {self.ndim}-D device mesh of {self.world} of the job's "
                f"{dist.get_world_size()} ranks: a multi-dimensional mesh must cover every rank"
            )
        # flat rank r = position of the global rank in ascending order (the flat group's order)
        order = sorted(ranks)
        where = {g: i for i, g in enumerate(ranks)}
        self.coords = [_unravel(where[g], self.shape) for g in order]
        self.rank = order.index(dist.get_rank())
        self.coord = self.coords[self.rank]

    def group(self, dims: tuple[int, ...]) -> Any:
        """The process group over ``dims`` (ranks that differ only there); ``dims`` all: the
        flat group."""
        if len(dims) == self.ndim:
            return self.flat_group
        (d,) = dims
        return self.device_mesh.get_group(d)

    def members(self, dims: tuple[int, ...], rank: int | None = None) -> list[int]:
        """The flat ranks of ``rank``'s group over ``dims``, in the group's rank order (a
        process group numbers its ranks in ascending global rank, as the flat order does)."""
        mine = self.coords[self.rank if rank is None else rank]
        keep = [i for i in range(self.ndim) if i not in dims]
        return [r for r, c in enumerate(self.coords) if all(c[i] == mine[i] for i in keep)]


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(i % n)
        i //= n
    return tuple(reversed(out))


def shard_dim(pl: Any) -> int | None:
    """The tensor dimension a placement splits (``Shard``, ``_StridedShard``), else None."""
    from torch.distributed.tensor import Shard, placement_types

    strided = getattr(placement_types, "_StridedShard", Shard)
    return pl.dim if isinstance(pl, (Shard, strided)) else None


def root_mesh(device_mesh: Any) -> Any:
    """The mesh ``device_mesh`` was sliced from (itself if none)."""
    get = getattr(device_mesh, "_get_root_mesh", None)
    return get() if callable(get) else device_mesh


def mesh_of(p: Tensor) -> Any:
    """The root of ``p``'s device mesh: FSDP2 x TP puts q/k/v on the 2-D mesh and the
    embeddings on its data-parallel slice; both are numbered by the root."""
    return root_mesh(p.device_mesh)


def placement_key(p: Tensor) -> tuple | None:
    """What a batch of parameters must share to be stepped by one plan (None: a plain
    tensor)."""
    if not is_dtensor(p):
        return None
    return tuple(repr(x) for x in p.placements), tuple(p.device_mesh.mesh.flatten().tolist())


def _coords_in(sub: Any, mesh: Mesh, p: Tensor) -> list[tuple[int, ...]]:
    """Each flat rank's coordinate in ``sub``, a slice of ``mesh`` (matched by dim names)."""
    if sub is mesh.device_mesh or sub == mesh.device_mesh:
        return mesh.coords
    names, root = sub.mesh_dim_names, mesh.device_mesh.mesh_dim_names
    if not names or not root or any(n not in root for n in names):
        raise NotImplementedError(
            f"{_describe(p)} lives on a mesh that is not a named slice of the optimizer's "
            f"mesh {mesh.device_mesh}: give every mesh dimension a name (init_device_mesh("
            f"..., mesh_dim_names=...))"
        )
    dims = [root.index(n) for n in names]
    return [tuple(c[d] for d in dims) for c in mesh.coords]


def _split(index: Tensor, n: int, rank: int, strided: int) -> Tensor:
    """This rank's part of ``index`` (a dimension's global indices) split over ``n`` ranks:
    ``torch.chunk``'s pieces; ``strided`` > 1: its piece of each of ``strided`` chunks."""
    if strided > 1:
        return torch.cat([_split(part, n, rank, 1) for part in index.chunk(strided)])
    chunk = -(-index.numel() // n)
    return index[rank * chunk : (rank + 1) * chunk]


def _describe(p: Tensor) -> str:
    return f"a parameter of shape {tuple(p.shape)} with placements {tuple(p.placements)}"


def block_at(shape: tuple[int, ...], mesh_shape: tuple[int, ...], coord: tuple[int, ...],
             placements) -> Block | None:  # fmt: skip
    """The block of a tensor of ``shape`` held at ``coord`` of a mesh of ``mesh_shape`` under
    ``placements`` (split left to right over the mesh dimensions, as torch does), or None
    where it is not contiguous. Placements other than shards act as replication."""
    index = [torch.arange(n) for n in shape[:2]]
    for d, pl in enumerate(placements):
        dim = shard_dim(pl)
        if dim is not None:  # a strided shard: its piece of each of split_factor chunks
            index[dim] = _split(index[dim], mesh_shape[d], coord[d], getattr(pl, "split_factor", 1))
    ends = []
    for ix in index + [torch.arange(1)] * (2 - len(index)):
        if ix.numel() and not bool((ix.diff() == 1).all()):
            return None
        start = int(ix[0]) if ix.numel() else 0
        ends.append((start, start + ix.numel()))
    return Block(ends[0][0], ends[0][1], ends[1][0], ends[1][1])


def blocks_of(p: Tensor, mesh: Mesh) -> list[Block]:
    """Every flat rank's block of the DTensor ``p`` (see the module doc)."""
    from torch.distributed.tensor import Replicate

    shape = tuple(p.shape)
    for pl in p.placements:
        d = shard_dim(pl)
        ok = isinstance(pl, Replicate) or d is not None and d < min(2, len(shape))
        if not ok:
            raise NotImplementedError(
                f"CompositionalMuon takes DTensor parameters sharded along their first two "
                f"dimensions (Shard(0), Shard(1), FSDP2's strided shards) or replicated; got "
                f"{_describe(p)}"
            )
    sub_shape = tuple(p.device_mesh.shape)
    out = []
    for coord in _coords_in(p.device_mesh, mesh, p):
        blk = block_at(shape, sub_shape, coord, p.placements)
        if blk is None:
            raise NotImplementedError(
                f"CompositionalMuon needs each rank's shard of a DTensor parameter to be one "
                f"contiguous block; {_describe(p)} is not"
            )
        out.append(blk)
    mine = out[mesh.rank]
    local = tuple(p.to_local().shape[:2])
    if local != mine.size[: len(local)]:
        raise NotImplementedError(
            f"{_describe(p)}: this rank holds {local}, where the mesh's split gives "
            f"{mine.size}; CompositionalMuon does not know this sharding"
        )
    return out


def placement_of(p: Tensor) -> str:
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


def whole_block(p: Tensor) -> Block:
    return Block(0, p.shape[0], 0, p.shape[1] if p.dim() > 1 else 1)


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
