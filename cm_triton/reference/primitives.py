"""Batched primitives of Compositional Muon in pure torch (spec §2).

Every function here is pure: it never writes to its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cm_triton.schedules import INV_SQRT_NEWTON, POLAR_EXPRESS_8

__all__ = ["msign", "inv_sqrt", "gram", "gram_inv_sqrt", "partner_roots", "apply_root"]


def msign(
    x: Tensor,
    coefficients: Sequence[tuple[float, float, float]] = POLAR_EXPRESS_8,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Orthogonal polar factor ``U V^T`` of each slice, by Newton-Schulz (spec §2).

    Shapes: ``(..., m, n) -> (..., m, n)``. Each trailing ``(m, n)`` slice is normalised by its
    own Frobenius norm; tall slices (m > n) are iterated on their transpose. ``dtype`` is the
    iteration dtype (default: float32, or float64 for float64 input); the result is float32
    (float64 for float64 input).
    """
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    it_dtype = dtype if dtype is not None else out_dtype
    tall = x.shape[-2] > x.shape[-1]
    y = x.to(out_dtype)
    if tall:
        y = y.mT
    # Out of place: never normalise a caller's tensor (torch.optim.Muon once did).
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) * 1.01 + 1e-7)
    lead = y.shape[:-2]
    y = y.to(it_dtype).reshape(-1, *y.shape[-2:])
    for a, b, c in coefficients:
        # A = X X^T;  X <- a X + (b A + c A A) X, with the scalings fused into the products
        # (baddbmm: beta*input + alpha*(m1 @ m2)), which halves the passes over X on the CPU.
        gram_ = torch.bmm(y, y.mT)
        poly = torch.baddbmm(gram_, gram_, gram_, beta=b, alpha=c)
        y = torch.baddbmm(y, poly, y, beta=a)
    y = y.reshape(*lead, *y.shape[-2:]).to(out_dtype)
    return y.mT if tall else y


def inv_sqrt(
    a: Tensor,
    method: str = "newton",
    floor: float = 1e-12,
    coefficients: Sequence[tuple[float, float]] = INV_SQRT_NEWTON,
) -> Tensor:
    """Inverse square root of a batch of SPD matrices (spec §2).

    Shapes: ``(..., n, n) -> (..., n, n)``. ``"newton"``: coupled Newton-Schulz, matmul only.
    ``"eigh"``: exact, eigenvalues clamped below at ``floor`` before ``w^{-1/2}``.
    """
    if method == "eigh":
        sym = 0.5 * (a + a.mT)
        w, p = torch.linalg.eigh(sym)
        return (p * w.clamp_min(floor).rsqrt().unsqueeze(-2)) @ p.mT
    if method != "newton":
        raise ValueError(f"inv_root must be 'newton' or 'eigh', got {method!r}")
    n = a.shape[-1]
    s = (1.0 - 1e-3) / torch.linalg.matrix_norm(a, keepdim=True)
    y = (s * a).reshape(-1, n, n)
    z = torch.eye(n, dtype=a.dtype, device=a.device).expand_as(y)
    for ca, cb in coefficients:
        p = torch.bmm(z, y)
        y = torch.baddbmm(y, y, p, beta=ca, alpha=cb)  # a Y + b Y P
        z = torch.baddbmm(z, p, z, beta=ca, alpha=cb)  # a Z + b P Z
        y = y.add(y.mT).mul_(0.5)
        z = z.add(z.mT).mul_(0.5)
    return z.view(a.shape) * s.sqrt()


def gram(w: Tensor, group_size: int = 1, damping: float = 0.0) -> Tensor:
    """Damped row Gram of head blocks, summed over consecutive groups (spec §1).

    Shapes: ``w (H, dh, d) -> (H // group_size, dh, dh)``:
    ``A_g = sum_{h in g} W_h W_h^T + damping I``.
    """
    h, dh, _ = w.shape
    a = (w @ w.mT).view(h // group_size, group_size, dh, dh).sum(1)
    return a + damping * torch.eye(dh, dtype=a.dtype, device=a.device)


def apply_root(root: Tensor, x: Tensor) -> Tensor:
    """Multiply each head block by its group's root from the left.

    Shapes: ``root (R, dh, dh), x (R*k, dh, d) -> (R*k, dh, d)``; head ``i`` uses root ``i // k``.
    """
    r = root.shape[0]
    xs = x.reshape(r, x.shape[0] // r, *x.shape[1:])
    return (root.unsqueeze(1) @ xs).reshape(x.shape)


def gram_inv_sqrt(
    w: Tensor,
    damping: float,
    group_size: int = 1,
    method: str = "newton",
    apply_to: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Partner inverse root ``C^{-1} = (sum_g W W^T + damping I)^{-1/2}`` and, optionally, the
    whitened operand ``C^{-1} D`` (spec §1-§2).

    Shapes: ``w (H, dh, d) -> root (H // group_size, dh, dh)``;
    ``apply_to (R*k, dh, d) -> (R*k, dh, d)`` with ``R = H // group_size``.
    """
    root = inv_sqrt(gram(w, group_size, damping), method, floor=max(damping, 1e-12))
    return root, (None if apply_to is None else apply_root(root, apply_to))


def partner_roots(
    p: Tensor,
    s: Tensor,
    damping: float,
    method: str = "newton",
    dp: Tensor | None = None,
    ds: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Both partner roots of a pair from one batched inverse root (fewer, larger products than
    two ``gram_inv_sqrt`` calls; the same math), and optionally the whitened operands.

    Shapes: ``p (Hq, dh, d), s (Hkv, dh, d)`` with ``G = Hq // Hkv`` ->
    ``r_s (Hkv, dh, dh) = (S_g S_g^T + damping I)^{-1/2}`` (whitens the P heads of group g),
    ``r_p (Hkv, dh, dh) = (sum_{h in g} P_h P_h^T + damping I)^{-1/2}`` (whitens S_g),
    ``r_s[g(h)] dp_h`` for ``dp (Hq, dh, d)`` and ``r_p ds`` for ``ds (Hkv, dh, d)``.
    """
    hkv = s.shape[0]
    grams = torch.cat([gram(s, 1, damping), gram(p, p.shape[0] // hkv, damping)])
    r_s, r_p = inv_sqrt(grams, method, floor=max(damping, 1e-12)).split(hkv)
    wp = None if dp is None else apply_root(r_s, dp)
    ws = None if ds is None else apply_root(r_p, ds)
    return r_s, r_p, wp, ws
