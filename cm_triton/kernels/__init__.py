"""Triton kernels: optional accelerators of the step's phases (spec §2.2).

``KERNEL_PHASES`` has the names and signatures of ``cm_triton.reference.phases``; importing
this package needs ``triton`` (``cm_triton.dispatch`` only imports it when Triton is there).
Every big-matrix pass of every flag combination is a kernel (``streaming``); of the dh x dh
algebra the maps and the quintic inverse root are kernels for heads up to ``MAX_HEAD_DIM``.
What stays in torch, on purpose: the signs iterated on a whole matrix (the hybrid O sign, an
``ns_method="ns"`` sign, Muon: cuBLAS-sized products), eigh and the connections' solves,
float64. The kernels raise on input they do not take; ``cm_triton.dispatch`` chooses.
"""

from cm_triton.kernels.phases import (
    apply_update,
    cross_grams,
    first_maps,
    inv_sqrt,
    last_maps,
    maps_take,
    restart_gram,
    stream,
    stream_grams,
    streams_take,
)
from cm_triton.reference import primitives as ref
from cm_triton.reference.phases import PhaseOps
from cm_triton.reference.rule import Primitives

KERNEL_PHASES = PhaseOps(stream, stream_grams, cross_grams, first_maps, restart_gram,
                         last_maps, apply_update, inv_sqrt)  # fmt: skip
KERNELS = Primitives(msign=ref.msign, phases=KERNEL_PHASES)

__all__ = ["KERNELS", "KERNEL_PHASES", "maps_take", "streams_take"]
