"""The Compositional Muon rule for a batch of attention pairs, every variant (spec §3-§4).

Generic form: a per-query factor ``P (B, Hq, dh, d_p)`` and a shared factor
``S (B, Hkv, dh, d_s)``, ``G = Hq // Hkv``; ``B`` pairs of equal shapes (layers) are
stepped together and never mix. QK is ``P = Q, S = K``; OV is ``P = O^T, S = V``: transposing
the column blocks of ``o_w`` turns "whiten from the right" into "whiten from the left" and
``msign`` commutes with transposition, so one function computes both rules. The hybrid OV
rule (one sign over the whole ``o_w``) is ``hybrid=True``. The step itself is
``reference.pipeline.pair_step`` (spec §2.2's three phases); this module names the backend's
pieces it runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from cm_triton.options import CMOptions
from cm_triton.reference import pipeline
from cm_triton.reference import primitives as ref
from cm_triton.reference.phases import REFERENCE_PHASES, PhaseOps

__all__ = ["Primitives", "REFERENCE", "momentum_update", "pair_step"]


@dataclass(frozen=True)
class Primitives:
    """One backend: ``phases`` (``reference.phases.PhaseOps``: the big-matrix passes and the
    dh x dh algebra) and ``msign`` (an ordinary Newton-Schulz sign, as ``reference.msign``,
    for the signs that are iterated on the matrix: the hybrid O sign, Muon)."""

    msign: Callable[..., Tensor]
    phases: PhaseOps = REFERENCE_PHASES
    in_place: bool = False  # the phases read each layer where it lives (``tables.LayerRows``)
    # The sign over a whole leg matrix (the hybrid O sign) where its rows or columns live on
    # other ranks (``heads``): ``(B, rows, n) -> (B, rows, n)`` on this rank's part;
    # None: ``msign``.
    whole_msign: Callable[..., Tensor] | None = None


REFERENCE = Primitives(msign=ref.msign)


def momentum_update(m: Tensor, grad: Tensor, beta: float) -> Tensor:
    """``m <- beta m + G`` out of place (spec §3). Shapes: any, equal."""
    return beta * m + grad


def pair_step(
    p: Tensor, s: Tensor, gp: Tensor, gs: Tensor, mp: Tensor, ms: Tensor, opts: CMOptions,
    hybrid: bool = False, prims: Primitives = REFERENCE, scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One CM step of B pairs, out of place (``reference.pipeline.pair_step``).

    Shapes: ``p, gp, mp (B, Hq, dh, d_p); s, gs, ms (B, Hkv, dh, d_s)``, all in the compute
    dtype; ``opts`` resolved (``ns_method`` and ``inv_root`` concrete); ``scale (B,)`` the
    direction's power of two (``phases.direction_scale``) or None. Returns
    ``(p', s', mp', ms')``.
    """
    return pipeline.pair_step(p, s, gp, gs, mp, ms, opts, hybrid, prims.phases, prims.msign,
                              scale, prims.whole_msign)  # fmt: skip
