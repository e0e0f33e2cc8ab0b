"""Muon's plans of ``Comm``: replicated matrices split over the ranks, whole matrices local,
blocks orthogonalised once on an owner rank (``muon_owner``)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from cm_triton.engine import compute_muon
from cm_triton.options import CMOptions
from cm_triton.placement import Block, placement_of
from cm_triton.reference.muon import muon_direction
from cm_triton.reference.phases import direction_scale
from cm_triton.reference.primitives import compute_dtype

__all__ = ["MuonPlans", "muon_owner"]


class MuonPlans:
    """``Comm``'s Muon plans (a mixin: ``self`` is the ``Comm``)."""

    def muon(self, b, w, g, m, group: dict, opts: CMOptions, prims, amax=None):
        """Muon on a batch of sharded matrices: each orthogonalised once, on its owner rank.
        Every plan takes Muon's own sign (as the owner plan must: it gathers the direction,
        not the weights), so the plans agree bit for bit."""
        prims = dataclasses.replace(prims, in_place=False)
        params = b.params[0]
        where = placement_of(params[0])
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


def muon_owner(comm, blocks: list[Block], params: list[Tensor], w, g, m, group: dict,
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
