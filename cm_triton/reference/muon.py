"""Muon for the matrices CM does not pair (MLP, experts, gates); AdamW is ``adamw.py``.

Pure functions: inputs are never written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cm_triton.reference.legs import use_gram
from cm_triton.reference.phases import PhaseOps, scaled_maps
from cm_triton.reference.primitives import compute_dtype, msign

__all__ = ["muon_shape_factor", "muon_direction", "muon_update", "muon_gram_update"]


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
    ops: PhaseOps | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Muon on ``(B, ..., rows, cols)`` stacks (a 3-D parameter is a batch of matrices), out
    of place: nesterov momentum ``m' = mom m + g``, one msign per matrix of ``g + mom m'``,
    Muon's shape factor of the mathematical ``(out, in)`` shape (``transposed``: stored
    ``(in, out)``, as GPT-2's ``Conv1D``) -> ``(w', m')`` in ``w``'s and ``m``'s dtypes.

    ``ops``: a batch of matrices ``(B, rows, cols)`` whose sign is taken in Gram form runs
    through these phases (``muon_gram_update``: a stream and an apply pass, as CM's legs).
    ``scale (B,)``: the power of two the update is scaled by before its sign
    (``phases.direction_scale``; the sign does not depend on it, its fp32 Grams do)."""
    rows, cols = w.shape[-2:]
    shape = muon_shape_factor(cols, rows) if transposed else muon_shape_factor(rows, cols)
    decay = 1 - lr * weight_decay
    if ops is not None and w.dim() == 3 and use_gram(rows, cols, method):
        return muon_gram_update(w, g, m, momentum, decay, lr * shape, coefficients, restart, ops,
                                scale)  # fmt: skip
    # Each product below is a new tensor of this function's, finished in place: the same
    # arithmetic as `m * momentum + g` etc. with one allocation per result (on the CPU each
    # allocation of a large stack faults in fresh pages: `primitives._buffers`).
    m_new = (m * momentum).add_(g)
    update = (m_new * momentum).add_(g)
    cdt = compute_dtype(w.dtype)
    flat = update.to(cdt)
    if scale is not None:
        flat = flat * scale.view(-1, *[1] * (flat.dim() - 1))
    flat = flat.reshape(-1, *update.shape[-2:])
    o = muon_direction(flat, coefficients, dtype, method, restart, msign_fn).view(update.shape)
    return (w * decay).sub_(o.mul(lr * shape)).to(w.dtype), m_new


def muon_gram_update(
    w: Tensor, g: Tensor, m: Tensor, beta: float, decay: float, step: float,
    coefficients: Sequence[tuple[float, float, float]], restart: int, ops: PhaseOps,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Gram-form Muon through the phases of a CM leg (spec §2.1, §2.2): ``(B, rows, cols)``
    -> ``(w', m')``, each matrix one leg of one head on its short side (a tall matrix is read
    transposed, through its strides): the stream writes ``m' = beta m + g`` and takes
    ``S = D D^T`` of ``D = g + beta m'``; the polynomial runs on S (restarting from the
    formed iterate's Gram after ``restart`` steps, as ``msign``); the apply writes
    ``decay W - step T D``. Inputs in the compute dtype (float32, or float64 for float64
    input; a ``tables.LayerRows`` already is): the kernels convert on load."""
    tall = w.shape[-2] > w.shape[-1]
    cdt = compute_dtype(w.dtype)

    def leg(x: Tensor) -> Tensor:  # (B, rows, cols) -> (B, 1, short, long), a view
        return (x.mT if tall else x).unsqueeze(1).to(cdt)

    def back(x: Tensor) -> Tensor:
        x = x[:, 0]
        return x.mT if tall else x

    wl, gl, ml = leg(w), leg(g), leg(m)
    m_new, grams = ops.stream_grams(wl, gl, ml, beta, True, ("dd",), scale)
    first = tuple(coefficients[:restart]) if 0 < restart < len(coefficients) else ()
    t, r = ops.first_maps(grams["dd"], None, first)
    if first:
        r = ops.restart_gram(scaled_maps(t, scale), gl, m_new, beta, True)
    t, _ = ops.last_maps(r, t, None, tuple(coefficients[len(first) :]))
    w_new = ops.apply_update(wl, scaled_maps(t, scale), gl, m_new, beta, True, decay, step)
    return back(w_new).to(w.dtype), back(m_new).to(m.dtype)
