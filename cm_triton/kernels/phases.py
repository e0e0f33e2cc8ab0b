"""Triton kernels for the phases of the Gram-form CM step (``reference/phases.py``).

Mirrors ``cm_triton.reference.phases``: the same function names and signatures.

- ``stream``: one streaming pass per leg: ``m <- beta m + G`` written once, and the partial
  Grams ``W W^T`` and ``D D^T`` of each head over a chunk of columns; the chunks split the width
  so that realistic shapes launch hundreds of programs, and their partial Grams are summed in a
  fixed order afterwards (no atomics: steps are bit-reproducible).
- ``restart_gram``: ``X = T D`` formed tile by tile and ``X X^T`` accumulated, never storing X.
- ``apply_update``: ``W <- decay W - step T D``, written once in the weight's dtype.
- ``first_maps`` / ``last_maps`` / ``inv_sqrt``: the dh x dh algebra, one program per matrix,
  with the matrices in a global scratch (L2-resident) and products computed in row blocks, so
  at most a ``BLOCK_M x dh`` tile and one accumulator are live in registers at any time.

Every ``tl.dot`` runs at ``DOT_PRECISION``: ``"tf32x3"`` (three tf32 products: fp32-level
accuracy on tensor cores) on a GPU; the interpreter evaluates it in fp32.
Shapes: big tensors ``(B, H, dh, n)``, read through their strides (views are never copied);
small ones ``(..., dh, dh)``. The kernels raise on input they do not take
(``streams_take``, ``maps_take``); ``cm_triton.dispatch`` chooses, before any launch.
"""

from __future__ import annotations

from cm_triton.kernels.algebra import first_maps, inv_sqrt, last_maps, maps_take
from cm_triton.kernels.common import MAX_HEAD_DIM, TUNING, streams_take
from cm_triton.kernels.streaming import (
    apply_update,
    cross_grams,
    restart_gram,
    stream,
    stream_grams,
)

__all__ = ["stream", "stream_grams", "cross_grams", "restart_gram", "apply_update",
           "first_maps", "last_maps", "inv_sqrt", "MAX_HEAD_DIM", "TUNING", "streams_take",
           "maps_take"]  # fmt: skip
