"""Batched primitives of Compositional Muon in pure torch (spec §2, §2.1).

Every function here is pure: it never writes to its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cm_triton.schedules import INV_SQRT_NEWTON, INV_SQRT_QUINTIC, POLAR_EXPRESS_8

__all__ = [
    "compute_dtype",
    "msign",
    "ns_iterate",
    "gram_polynomial",
    "normalise",
    "inv_sqrt",
    "gram",
    "apply_root",
    "gram_inv_sqrt",
    "partner_roots",
]

Coefficients = Sequence[tuple[float, float, float]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rule computes in for tensors of ``dtype``: float64 for float64, float32
    for everything else (bf16/fp16 weights and gradients are widened on read: spec §2's
    normalisation and output in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add_eye_(x: Tensor, a: float) -> Tensor:
    """``x + a I`` for a batch of square matrices, in place: ``x`` must be a new tensor of the
    caller's (every call site passes a product or a sum just made), so nothing is copied."""
    x.diagonal(dim1=-2, dim2=-1).add_(a)
    return x


def normalise(x: Tensor) -> Tensor:
    """``X / (||X||_F 1.01 + 1e-7)`` per trailing slice, out of place (spec §2 step 2)."""
    return x / (torch.linalg.matrix_norm(x, keepdim=True) * 1.01 + 1e-7)


def _buffers(like: Tensor, n: int) -> list[Tensor]:
    """``n`` new contiguous tensors of ``like``'s shape, dtype and device. The iterations below
    write their products into these (``out=``) rather than allocating one per product: on the
    CPU, glibc's malloc maps each allocation over 32 MB fresh from the OS, and it faults in
    page by page (a 4-block d-1024 model's step faulted in 800k pages before this, 450k
    after; `bench/results/cpu_step.md`)."""
    return [torch.empty(like.shape, dtype=like.dtype, device=like.device) for _ in range(n)]


def gram_polynomial(r: Tensor, coefficients: Coefficients) -> tuple[Tensor, Tensor]:
    """The Newton-Schulz polynomial evaluated on the Gram (spec §2.1).

    Shapes: ``r (..., m, m) -> (q (..., m, m), r_final (..., m, m))``. For ``r = X X^T``,
    ``q X`` is what the iteration ``X <- a X + (b A + c A A) X`` makes of ``X`` and
    ``r_final = (q X)(q X)^T``: per step ``P = a I + b R + c R^2; Q <- P Q; R <- P R P``.
    """
    shape = r.shape
    r = r.reshape(-1, *shape[-2:])
    if not coefficients:
        return _add_eye_(torch.zeros_like(r), 1.0).view(shape), r.view(shape)
    # Each product has its buffer; Q ping-pongs between two. R's new value goes to `r_buf`
    # after the step has read the old one (the caller's r, in the first step, is only read).
    p_buf, spare, q_next, pr, prp, r_buf = _buffers(r, 6)
    q = None
    for a, b, c in coefficients:
        p = _add_eye_(torch.baddbmm(r, r, r, beta=b, alpha=c, out=p_buf), a)  # a I + b R + c R^2
        if q is None:
            q, p_buf = p, spare  # Q = P: this P is kept, the next one goes to the spare
        else:
            q, q_next = torch.bmm(p, q, out=q_next), q
        torch.bmm(torch.bmm(p, r, out=pr), p, out=prp)
        # P and R commute: symmetric in exact arithmetic
        r = torch.add(prp, prp.mT, out=r_buf).mul_(0.5)
    return q.view(shape), r.view(shape)


def ns_iterate(
    y: Tensor, coefficients: Coefficients, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Newton-Schulz on a normalised ``y (B, m, n)``, ``m <= n``: per step ``A = Y Y^T``,
    ``Y <- a Y + (b A + c A A) Y`` -> ``(B, m, n)``. ``reduce`` (or None) is applied to each
    ``A`` before it is used: a ``y`` whose columns are split over ranks all-reduces it."""
    if not coefficients:
        return y
    y_a, y_b = _buffers(y, 2)
    gram_, poly = _buffers(y[..., : y.shape[-2]], 2)
    for a, b, c in coefficients:
        # The scalings are fused into the products (baddbmm: beta*input + alpha*(m1 @ m2)),
        # which halves the passes over Y on the CPU.
        g = torch.bmm(y, y.mT, out=gram_)
        g = g if reduce is None else reduce(g)
        torch.baddbmm(g, g, g, beta=b, alpha=c, out=poly)
        y, y_a, y_b = torch.baddbmm(y, poly, y, beta=a, out=y_a), y_b, y_a
    return y


def _msign_gram(y: Tensor, coefficients: Coefficients, restart: int) -> Tensor:
    r = y @ y.mT
    if 0 < restart < len(coefficients):
        # Restart (spec §2.1): the fp32 Gram loses singular values below ~sqrt(u); after
        # `restart` steps they are amplified (by ~33 after two Polar Express steps), and the
        # Gram of the explicitly formed X_r resolves them again.
        q, _ = gram_polynomial(r, coefficients[:restart])
        y = q @ y
        r = y @ y.mT
        coefficients = coefficients[restart:]
    q, _ = gram_polynomial(r, coefficients)
    return q @ y


def msign(
    x: Tensor,
    coefficients: Coefficients = POLAR_EXPRESS_8,
    dtype: torch.dtype | None = None,
    method: str = "ns",
    restart: int = 0,
) -> Tensor:
    """Orthogonal polar factor ``U V^T`` of each slice, by Newton-Schulz (spec §2, §2.1).

    Shapes: ``(..., m, n) -> (..., m, n)``. Each trailing ``(m, n)`` slice is normalised by its
    own Frobenius norm; tall slices (m > n) are iterated on their transpose.
    ``method="ns"`` iterates on X in ``dtype`` (default: float32, or float64 for float64
    input). ``method="gram"`` evaluates the same polynomial on the short side's Gram in the
    compute dtype (``dtype`` does not apply), restarting once after ``restart`` steps
    (0: never). The result is float32 (float64 for float64 input).
    """
    if method not in ("ns", "gram"):
        raise ValueError(f"ns_method must be 'ns' or 'gram', got {method!r}")
    out_dtype = compute_dtype(x.dtype)
    tall = x.shape[-2] > x.shape[-1]
    y = x.to(out_dtype)
    if tall:
        y = y.mT
    # Out of place: never normalise a caller's tensor (torch.optim.Muon once did).
    y = normalise(y)
    lead = y.shape[:-2]
    y = y.reshape(-1, *y.shape[-2:])
    if method == "gram":
        y = _msign_gram(y, coefficients, restart)
    else:
        y = ns_iterate(y.to(dtype if dtype is not None else out_dtype), coefficients)
    y = y.reshape(*lead, *y.shape[-2:]).to(out_dtype)
    return y.mT if tall else y


def _coupled_newton(a: Tensor, coefficients: Sequence[tuple[float, ...]]) -> Tensor:
    """Coupled Newton-Schulz ``Z -> A^{-1/2}``: ``(B, n, n) -> (B, n, n)``.

    With ``Y_0 = s A``, ``Z_0 = I`` and ``P = Z Y``, each step applies a polynomial
    ``q(P) = a + b P (+ c P^2)``: ``Y <- Y q(P); Z <- q(P) Z``. On an eigenvalue ``t`` of
    ``s A`` this is the msign step ``x <- x q(x^2)`` on ``x = sqrt(t)``, so the quintic Polar
    Express schedule of msign drives every ``sqrt(t)`` in ``[1e-3, 1]`` to 1, i.e.
    ``Z -> (s A)^{-1/2}``.
    """
    n = a.shape[-1]
    s = (1.0 - 1e-3) / torch.linalg.matrix_norm(a, keepdim=True)
    y = s * a
    z = torch.eye(n, dtype=a.dtype, device=a.device).expand_as(y)
    for step in coefficients:
        p = torch.bmm(z, y)
        if len(step) == 2:
            ca, cb = step
            y = torch.baddbmm(y, y, p, beta=ca, alpha=cb)  # a Y + b Y P
            z = torch.baddbmm(z, p, z, beta=ca, alpha=cb)  # a Z + b P Z
        else:
            ca, cb, cc = step
            poly = _add_eye_(torch.baddbmm(p, p, p, beta=cb, alpha=cc), ca)  # a + b P + c P^2
            y = torch.bmm(y, poly)
            z = torch.bmm(poly, z)
        y = y.add(y.mT).mul_(0.5)
        z = z.add(z.mT).mul_(0.5)
    return z * s.sqrt()


INV_ROOTS_MATMUL = {"newton": INV_SQRT_NEWTON, "quintic": INV_SQRT_QUINTIC}


def inv_sqrt(
    a: Tensor,
    method: str = "newton",
    floor: float = 0.0,
) -> Tensor:
    """Inverse square root of a batch of SPD matrices (spec §2).

    Shapes: ``(..., n, n) -> (..., n, n)``. ``"newton"``: the release's coupled Newton-Schulz,
    25 cubic steps. ``"quintic"``: the same coupled iteration with 7 quintic steps (the first
    six of Polar Express, then one classic step: 28 products instead of 75, equally accurate).
    ``"eigh"``: exact; eigenvalues are clamped below at ``floor`` (rounding can push a damped
    Gram's eigenvalues under the damping), and a zero one with ``floor = 0`` gives a non-finite
    root, as the matmul methods do for a singular matrix.
    """
    if method == "eigh":
        sym = 0.5 * (a + a.mT)
        w, p = torch.linalg.eigh(sym)
        return (p * w.clamp_min(floor).rsqrt().unsqueeze(-2)) @ p.mT
    if method not in INV_ROOTS_MATMUL:
        raise ValueError(f"inv_root must be one of {['eigh', *INV_ROOTS_MATMUL]}, got {method!r}")
    n = a.shape[-1]
    z = _coupled_newton(a.reshape(-1, n, n), INV_ROOTS_MATMUL[method])
    return z.view(a.shape)


def gram(w: Tensor, group_size: int = 1, damping: float = 0.0) -> Tensor:
    """Damped row Gram of head blocks, summed over consecutive groups (spec §1).

    Shapes: ``w (..., H, dh, d) -> (..., H // group_size, dh, dh)``:
    ``A_g = sum_{h in g} W_h W_h^T + damping I``.
    """
    *lead, h, dh, _ = w.shape
    a = (w @ w.mT).view(*lead, h // group_size, group_size, dh, dh).sum(-3)
    return _add_eye_(a, damping) if damping else a


def apply_root(root: Tensor, x: Tensor) -> Tensor:
    """Multiply each head block by its group's root from the left.

    Shapes: ``root (..., R, dh, dh), x (..., R*k, dh, d) -> (..., R*k, dh, d)``; head ``i``
    uses root ``i // k``.
    """
    *lead, r, dh, _ = root.shape
    xs = x.reshape(*lead, r, x.shape[-3] // r, *x.shape[-2:])
    return (root.unsqueeze(-3) @ xs).reshape(x.shape)


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
    root = inv_sqrt(gram(w, group_size, damping), method, floor=damping)
    return root, (None if apply_to is None else apply_root(root, apply_to))


def partner_roots(
    p: Tensor, s: Tensor, damping: float, method: str = "newton"
) -> tuple[Tensor, Tensor]:
    """Both partner roots of a pair from one batched inverse root.

    Shapes: ``p (..., Hq, dh, d_p), s (..., Hkv, dh, d_s)`` with ``G = Hq // Hkv`` ->
    ``r_s (..., Hkv, dh, dh) = (S_g S_g^T + damping I)^{-1/2}`` (whitens the P heads of group g)
    and ``r_p (..., Hkv, dh, dh) = (sum_{h in g} P_h P_h^T + damping I)^{-1/2}`` (whitens S_g).
    """
    hkv = s.shape[-3]
    grams = torch.cat([gram(s, 1, damping), gram(p, p.shape[-3] // hkv, damping)], dim=-3)
    r_s, r_p = inv_sqrt(grams, method, floor=damping).split(hkv, dim=-3)
    return r_s, r_p
