"""Triton kernels: optional accelerators of the Gram-form step's phases.

``KERNEL_PHASES`` has the names and signatures of ``cm_triton.reference.phases``; importing
this package needs ``triton`` (``cm_triton.dispatch`` only imports it when Triton is there).
What stays in torch, on purpose: the hybrid O sign (one Newton-Schulz sign over a whole
matrix: cuBLAS-sized products), Muon's signs, eigh, float64, and the flags the phases do not
cover (joint, connections, momentum reprojection: ``reference.phases.fusable``).
"""

from cm_triton.kernels.phases import (
    apply_update,
    first_maps,
    inv_sqrt,
    last_maps,
    restart_gram,
    stream,
)
from cm_triton.reference import legs
from cm_triton.reference import primitives as ref
from cm_triton.reference.phases import PhaseOps
from cm_triton.reference.rule import Primitives

KERNEL_PHASES = PhaseOps(stream, first_maps, restart_gram, last_maps, apply_update, inv_sqrt)
KERNELS = Primitives(
    roots=ref.partner_roots, whitened_sign=legs.whitened_sign, msign=ref.msign,
    phases=KERNEL_PHASES,
)  # fmt: skip

__all__ = ["KERNELS", "KERNEL_PHASES"]
