"""Each rank's block of a DTensor (``placement.block_at``) against torch's own split
(``_compute_local_shape_and_global_offset``) over every coordinate of 1-D and 2-D meshes, even
and uneven sizes, ``Shard(0)``, ``Shard(1)``, ``Replicate()`` and the strided shard FSDP2 puts
over a ``ColwiseParallel`` weight. No process group: both are pure functions of the shapes."""

from __future__ import annotations

import itertools

import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from cm_triton.placement import Block, block_at

PLACEMENTS_1D = [[Shard(0)], [Shard(1)], [Replicate()]]
PLACEMENTS_2D = [
    [Replicate(), Shard(0)],  # HSDP
    [Shard(0), Shard(1)],  # FSDP2 over RowwiseParallel
    [_StridedShard(0, split_factor=2), Shard(0)],  # FSDP2 over ColwiseParallel (TP 2)
    [Shard(0), Shard(0)],
    [Shard(1), Replicate()],
]


def _torch_block(shape, mesh_shape, coord, placements) -> Block:
    local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord),
                                                           placements)  # fmt: skip
    return Block(offset[0], offset[0] + local[0], offset[1], offset[1] + local[1])


@pytest.mark.parametrize("shape", [(64, 32), (24, 40), (30, 7)])
@pytest.mark.parametrize(
    "mesh_shape, placements",
    [((4,), p) for p in PLACEMENTS_1D] + [((2, 2), p) for p in PLACEMENTS_2D]
    + [((2, 4), PLACEMENTS_2D[2][:1] + [Shard(0)])],
)  # fmt: skip
def test_every_rank_s_block_is_torch_s(shape, mesh_shape, placements):
    if isinstance(placements[0], _StridedShard) and shape[0] % (2 * mesh_shape[0] * 2):
        pytest.skip("strided shards of uneven rows: FSDP2 pads them; not a layout CM meets")
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        mine = block_at(shape, mesh_shape, coord, placements)
        want = _torch_block(shape, mesh_shape, coord, placements)
        if want.size[0] == 0 or want.size[1] == 0:  # an empty shard's offset is torch's choice
            assert mine.size[0] * mine.size[1] == 0, (coord, mine, want)
            continue
        assert mine == want, (coord, mine, want)


def test_a_strided_shard_that_is_not_one_block_is_reported():
    # _StridedShard alone (no shard after it): rank 0 holds rows 0-7 and 16-23, two pieces.
    assert block_at((32, 8), (2,), (0,), [_StridedShard(0, split_factor=2)]) is None
