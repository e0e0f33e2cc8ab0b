"""Muon for the matrices CM does not pair (MLP, experts, gates), and AdamW for the rest.

Pure functions: inputs are never written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cm_triton.reference.legs import use_gram
from cm_triton.reference.primitives import msign

__all__ = ["muon_shape_factor", "muon_direction"]


def muon_shape_factor(rows: int, cols: int) -> float:
    """Muon's scale ``sqrt(max(1, rows / cols))`` of an ``(out=rows, in=cols)`` matrix."""
    return max(1.0, rows / cols) ** 0.5


def muon_direction(
    update: Tensor,
    coefficients: Sequence[tuple[float, float, float]],
    dtype: torch.dtype | None,
    method: str,
    restart: int,
    msign_fn=msign,
) -> Tensor:
    """``msign`` of each matrix of a batch: ``(B, m, n) -> (B, m, n)`` (float32/64).

    ``method="gram"`` evaluates in Gram form only where that is cheaper (``use_gram``).
    """
    m, n = update.shape[-2:]
    how = "gram" if use_gram(m, n, method) else "ns"
    return msign_fn(update, coefficients, dtype, how, restart)
