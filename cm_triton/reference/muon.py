"""Muon for the matrices CM does not pair (MLP, experts, gates); AdamW is ``adamw.py``.

Pure functions: inputs are never written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cm_triton.reference.legs import use_gram
from cm_triton.reference.primitives import msign

__all__ = ["muon_shape_factor", "muon_direction", "muon_update"]


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


def muon_update(
    w: Tensor,
    g: Tensor,
    m: Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    coefficients: Sequence[tuple[float, float, float]],
    dtype: torch.dtype | None,
    method: str,
    restart: int,
    transposed: bool = False,
    msign_fn=msign,
) -> tuple[Tensor, Tensor]:
    """Muon on ``(B, ..., rows, cols)`` stacks (a 3-D parameter is a batch of matrices), out
    of place: nesterov momentum ``m' = mom m + g``, one msign per matrix of ``g + mom m'``,
    Muon's shape factor of the mathematical ``(out, in)`` shape (``transposed``: stored
    ``(in, out)``, as GPT-2's ``Conv1D``) -> ``(w', m')`` in ``w``'s and ``m``'s dtypes."""
    m_new = m * momentum + g
    update = g + momentum * m_new
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    flat = update.to(cdt).reshape(-1, *update.shape[-2:])
    o = muon_direction(flat, coefficients, dtype, method, restart, msign_fn).view(update.shape)
    rows, cols = update.shape[-2:]
    scale = muon_shape_factor(cols, rows) if transposed else muon_shape_factor(rows, cols)
    return (w * (1 - lr * weight_decay) - (lr * scale) * o).to(w.dtype), m_new
