"""Triton kernels of the Gram-form step's dh x dh algebra (``reference/phases.py``).

``first_maps`` / ``last_maps`` (the whitened Gram iteration and the map ``T``) and
``inv_sqrt`` (the quintic coupled inverse root): one program per matrix, the matrices in a
global scratch (L2-resident) and products computed in row blocks, so at most a
``BLOCK_M x dh`` tile and one accumulator are live in registers at any time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cm_triton.kernels.common import (
    DOT_PRECISION,
    MAX_HEAD_DIM,
    _block,
    launch_options,
    on_device,
    tuning,
    unsupported,
)
from cm_triton.schedules import INV_SQRT_QUINTIC
from cm_triton.tables import device_constant


@triton.jit
def _mm(a_ptr, b_ptr, c_ptr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """``C = A B`` for ``BLOCK_R``-square matrices in scratch, by row blocks."""
    cols = tl.arange(0, BLOCK_R)
    for m0 in range(0, BLOCK_R, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, BLOCK_R, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * BLOCK_R + ks[None, :])
            b = tl.load(b_ptr + ks[:, None] * BLOCK_R + cols[None, :])
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(c_ptr + rows[:, None] * BLOCK_R + cols[None, :], acc)
    tl.debug_barrier()


@triton.jit
def _poly(r_ptr, r2_ptr, p_ptr, ca, cb, cc, R, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """``P = a I_R + b R + c R^2`` (I_R: the identity on the valid block only)."""
    cols = tl.arange(0, BLOCK_R)
    for m0 in range(0, BLOCK_R, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        off = rows[:, None] * BLOCK_R + cols[None, :]
        eye = tl.where((rows[:, None] == cols[None, :]) & (rows[:, None] < R), 1.0, 0.0)
        p = ca * eye + cb * tl.load(r_ptr + off) + cc * tl.load(r2_ptr + off)
        tl.store(p_ptr + off, p)
    tl.debug_barrier()


@triton.jit
def _symmetrise(x_ptr, out_ptr, scale, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """``out = scale (X + X^T) / 2``."""
    cols = tl.arange(0, BLOCK_R)
    for m0 in range(0, BLOCK_R, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + rows[:, None] * BLOCK_R + cols[None, :])
        xt = tl.load(x_ptr + cols[None, :] * BLOCK_R + rows[:, None])
        tl.store(out_ptr + rows[:, None] * BLOCK_R + cols[None, :], scale * 0.5 * (x + xt))
    tl.debug_barrier()


@triton.jit
def _copy(x_ptr, out_ptr, scale, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.arange(0, BLOCK_R)
    for m0 in range(0, BLOCK_R, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        off = rows[:, None] * BLOCK_R + cols[None, :]
        tl.store(out_ptr + off, scale * tl.load(x_ptr + off))
    tl.debug_barrier()


@triton.jit
def _trace(x_ptr, BLOCK_R: tl.constexpr):
    i = tl.arange(0, BLOCK_R)
    return tl.sum(tl.load(x_ptr + i * BLOCK_R + i))


@triton.jit
def _frobenius(x_ptr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, BLOCK_R, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + rows[:, None] * BLOCK_R + cols[None, :])
        acc += x * x
    return tl.sqrt(tl.sum(acc))


@triton.jit
def _gram_steps(
    r_ptr, q_ptr, s1, s2, s3, coef_ptr, first, n_steps, R,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Spec §2.1 on scratch: for each step ``P = a I + b R + c R^2; Q <- P Q; R <- P R P``
    (symmetrised). ``Q`` must hold its start value; ``s1..s3`` are free scratch matrices."""
    for i in range(n_steps):
        ca = tl.load(coef_ptr + 3 * (first + i))
        cb = tl.load(coef_ptr + 3 * (first + i) + 1)
        cc = tl.load(coef_ptr + 3 * (first + i) + 2)
        _mm(r_ptr, r_ptr, s1, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # R^2
        _poly(r_ptr, s1, s2, ca, cb, cc, R, BLOCK_R, BLOCK_M)  # P
        _mm(s2, q_ptr, s1, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # P Q
        _copy(s1, q_ptr, 1.0, BLOCK_R, BLOCK_M)
        _mm(s2, r_ptr, s1, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # P R
        _mm(s1, s2, s3, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # (P R) P
        _symmetrise(s3, r_ptr, 1.0, BLOCK_R, BLOCK_M)


@triton.jit
def _eye(out_ptr, scale, R, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.arange(0, BLOCK_R)
    for m0 in range(0, BLOCK_R, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        eye = tl.where((rows[:, None] == cols[None, :]) & (rows[:, None] < R), scale, 0.0)
        tl.store(out_ptr + rows[:, None] * BLOCK_R + cols[None, :], eye)
    tl.debug_barrier()


@triton.jit
def _maps_kernel(
    s_ptr, pre_ptr, tin_ptr, t_ptr, r_ptr, scratch_ptr, coef_ptr, first, n_steps, R, G,
    MODE: tl.constexpr, HAS_ROOT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per head. All matrices ``BLOCK_R``-square, zero-padded, contiguous; inputs
    are only read, outputs (``t``, ``r``) written whole.

    MODE 0 (first_maps): in ``s`` (= D D^T), ``pre``; out ``t = Q pre / nu`` and ``r``.
    MODE 1 (last_maps): in ``s`` (the restart Gram), ``tin`` (= T_r), ``pre`` (= post); out
    ``t = post Q T_r`` and ``r`` (its final Gram, for ||U||^2).
    """
    i = tl.program_id(0).to(tl.int64)  # i * 5 * mat passes 2^31 at a few thousand heads
    mat = BLOCK_R * BLOCK_R
    s_i, t_i, r_i = s_ptr + i * mat, t_ptr + i * mat, r_ptr + i * mat
    root = pre_ptr + (i // G) * mat  # G heads share a root (grouped: per_head)
    tin_i = tin_ptr + i * mat
    sc = scratch_ptr + i * 5 * mat
    q, s1, s2, s3, s4 = sc, sc + mat, sc + 2 * mat, sc + 3 * mat, sc + 4 * mat
    if MODE == 0:
        if HAS_ROOT:  # R0 = pre S pre^T (pre symmetric)
            _mm(root, s_i, s1, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)
            _mm(s1, root, r_i, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)
        else:
            _copy(s_i, r_i, 1.0, BLOCK_R, BLOCK_M)
        nu = tl.sqrt(tl.maximum(_trace(r_i, BLOCK_R), 0.0)) * 1.01 + 1e-7
        _copy(r_i, r_i, 1.0 / (nu * nu), BLOCK_R, BLOCK_M)
        _eye(q, 1.0, R, BLOCK_R, BLOCK_M)
        _gram_steps(r_i, q, s1, s2, s3, coef_ptr, first, n_steps, R, BLOCK_R, BLOCK_M, BLOCK_K,
                    PRECISION)  # fmt: skip
        if HAS_ROOT:
            _mm(q, root, s4, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)
            _copy(s4, t_i, 1.0 / nu, BLOCK_R, BLOCK_M)
        else:
            _copy(q, t_i, 1.0 / nu, BLOCK_R, BLOCK_M)
    else:
        _copy(s_i, r_i, 1.0, BLOCK_R, BLOCK_M)
        _eye(q, 1.0, R, BLOCK_R, BLOCK_M)
        _gram_steps(r_i, q, s1, s2, s3, coef_ptr, first, n_steps, R, BLOCK_R, BLOCK_M, BLOCK_K,
                    PRECISION)  # fmt: skip
        _mm(q, tin_i, s4, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)
        if HAS_ROOT:
            _mm(root, s4, t_i, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)
        else:
            _copy(s4, t_i, 1.0, BLOCK_R, BLOCK_M)


def _square(x: Tensor, n: int, block: int) -> Tensor:
    """An input of the dh x dh kernels, only read: ``(..., r, r)`` as ``(n, block, block)``
    fp32 contiguous, zero-padded (a copy) only where ``r < block``."""
    r = x.shape[-1]
    x = x.reshape(n, r, r)
    if r == block and x.dtype == torch.float32 and x.is_contiguous():
        return x
    out = torch.zeros(n, block, block, dtype=torch.float32, device=x.device)
    out[:, :r, :r] = x
    return out


def _run_maps(mode: int, s_or_r: Tensor, t: Tensor | None, root: Tensor | None,
              coefficients: Sequence[tuple[float, float, float]]):  # fmt: skip
    shape = s_or_r.shape
    r = shape[-1]
    block = _block(r)
    n = s_or_r.numel() // (r * r)
    src = _square(s_or_r, n, block)
    tin = _square(t, n, block) if t is not None else src  # MODE 0 reads no T
    # A grouped root (a KV group's P heads share it) is read by index, not repeated.
    roots = n if root is None else root.numel() // (r * r)
    rootp = _square(root, roots, block) if root is not None else src  # HAS_ROOT False: unread
    tt = torch.empty(n, block, block, dtype=torch.float32, device=s_or_r.device)
    rr = torch.empty_like(tt)
    scratch = torch.empty(n, 5, block, block, dtype=torch.float32, device=s_or_r.device)
    coef = device_constant(coefficients or [(1.0, 0.0, 0.0)], torch.float32, s_or_r.device)
    warps, block_m, block_k = tuning("maps", block)
    with on_device(s_or_r):
        _maps_kernel[(n,)](
            src, rootp, tin, tt, rr, scratch, coef, 0, len(coefficients), r, n // roots,
            MODE=mode, HAS_ROOT=root is not None, BLOCK_R=block, BLOCK_M=block_m, BLOCK_K=block_k,
            PRECISION=DOT_PRECISION, num_warps=warps, **launch_options(),
        )  # fmt: skip
    return tt[:, :r, :r].reshape(shape), rr[:, :r, :r].reshape(shape)


def maps_take(x: Tensor) -> bool:
    """Whether the dh x dh kernels take these matrices: fp32/bf16/fp16, at most
    ``MAX_HEAD_DIM`` square, not empty."""
    return x.shape[-1] <= MAX_HEAD_DIM and x.dtype != torch.float64 and x.numel() > 0


def first_maps(s: Tensor, pre: Tensor | None, coefficients):
    """``reference.phases.first_maps``, one program per head."""
    if not maps_take(s):
        raise unsupported("first_maps", s)
    return _run_maps(0, s, None, pre, coefficients)


def last_maps(r: Tensor, t: Tensor, post: Tensor | None, coefficients):
    """``reference.phases.last_maps``, one program per head."""
    if not maps_take(r):
        raise unsupported("last_maps", r)
    return _run_maps(1, r, t, post, coefficients)


@triton.jit
def _inv_sqrt_kernel(
    a_ptr, z_ptr, scratch_ptr, coef_ptr, n_steps, R,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Coupled quintic Newton-Schulz (``reference.primitives._coupled_newton``) per matrix."""
    i = tl.program_id(0).to(tl.int64)
    mat = BLOCK_R * BLOCK_R
    a_i, z = a_ptr + i * mat, z_ptr + i * mat
    sc = scratch_ptr + i * 4 * mat
    y, p, s1, s2 = sc, sc + mat, sc + 2 * mat, sc + 3 * mat
    s = (1.0 - 1e-3) / _frobenius(a_i, BLOCK_R, BLOCK_M)
    _copy(a_i, y, s, BLOCK_R, BLOCK_M)
    _eye(z, 1.0, R, BLOCK_R, BLOCK_M)
    for k in range(n_steps):
        ca = tl.load(coef_ptr + 3 * k)
        cb = tl.load(coef_ptr + 3 * k + 1)
        cc = tl.load(coef_ptr + 3 * k + 2)
        _mm(z, y, p, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # P = Z Y
        _mm(p, p, s1, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # P^2
        _poly(p, s1, s2, ca, cb, cc, R, BLOCK_R, BLOCK_M)  # q(P)
        _mm(y, s2, s1, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # Y q(P)
        _symmetrise(s1, y, 1.0, BLOCK_R, BLOCK_M)
        _mm(s2, z, s1, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)  # q(P) Z
        _symmetrise(s1, z, 1.0, BLOCK_R, BLOCK_M)
    _copy(z, z, tl.sqrt(s), BLOCK_R, BLOCK_M)


def inv_sqrt(a: Tensor, method: str = "newton", floor: float = 0.0) -> Tensor:
    """``reference.inv_sqrt`` with ``method="quintic"``, one program per matrix (the other
    methods, ``"newton"`` and ``"eigh"``, are the reference's: ``cm_triton.dispatch``)."""
    r = a.shape[-1]
    if method != "quintic" or not maps_take(a):
        raise unsupported(f"inv_sqrt({method!r})", a)
    block = _block(r)
    n = a.numel() // (r * r)
    ap = _square(a, n, block)
    z = torch.empty(n, block, block, dtype=torch.float32, device=a.device)
    scratch = torch.empty(n, 4, block, block, dtype=torch.float32, device=a.device)
    coef = device_constant(INV_SQRT_QUINTIC, torch.float32, a.device)
    warps, block_m, block_k = tuning("inv_sqrt", block)
    with on_device(a):
        _inv_sqrt_kernel[(n,)](
            ap, z, scratch, coef, len(INV_SQRT_QUINTIC), r,
            BLOCK_R=block, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=DOT_PRECISION,
            num_warps=warps, **launch_options(),
        )  # fmt: skip
    return z[:, :r, :r].reshape(a.shape)
