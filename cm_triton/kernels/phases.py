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
small ones ``(..., dh, dh)``. dh <= ``MAX_HEAD_DIM``; larger heads and float64 use the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cm_triton.dispatch import use_kernel
from cm_triton.reference import phases as ref
from cm_triton.reference.primitives import inv_sqrt as ref_inv_sqrt
from cm_triton.schedules import INV_SQRT_QUINTIC

MAX_HEAD_DIM = 128
DOT_PRECISION = "tf32x3"
TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs: split the width until a leg has these


def _block(dh: int) -> int:
    return max(16, triton.next_power_of_2(dh))


# Launch shapes per kernel and block (dh rounded up to a power of two): (warps, tile, BLOCK_K),
# the tile being BLOCK_N (columns per step) for the streaming kernels and BLOCK_M (rows per
# product block) for the dh x dh ones. Chosen from ahead-of-time compiles for sm_90 and sm_80
# (bench/compile_report.py): the largest tiles that stay spill-free on both targets.
TUNING = {
    "stream": {16: (4, 64, 0), 32: (4, 64, 0), 64: (4, 32, 0), 128: (8, 16, 0)},
    "restart": {16: (4, 64, 16), 32: (4, 16, 32), 64: (8, 32, 32), 128: (8, 16, 16)},
    "apply": {16: (4, 64, 16), 32: (4, 64, 32), 64: (4, 64, 32), 128: (8, 32, 32)},
    "maps": {16: (4, 16, 16), 32: (4, 32, 16), 64: (4, 16, 16), 128: (4, 16, 16)},
}


def supported(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors (else the reference runs)."""
    return all(
        t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.shape[-2] <= MAX_HEAD_DIM
        for t in tensors
    )


def _chunk(b: int, h: int, n: int, block_n: int) -> int:
    """Columns per program: enough programs to fill the machine, whole tiles each."""
    chunks = max(1, min(triton.cdiv(n, block_n), triton.cdiv(TARGET_PROGRAMS, b * h)))
    return triton.cdiv(triton.cdiv(n, chunks), block_n) * block_n


# -- streaming passes -------------------------------------------------------------------------
@triton.jit
def _direction(g, m_new, beta, NESTEROV: tl.constexpr):
    if NESTEROV:
        return g + beta * m_new
    return m_new


@triton.jit
def _program(C, H, CHUNK, N):
    """This program's head ``(b, h)``, its flat index ``bh``, its chunk ``c`` of the width and
    the chunk's columns ``[start, stop)``: the grid is ``B * H * C`` programs."""
    pid = tl.program_id(0)
    c = pid % C
    bh = pid // C
    start = c * CHUNK
    return bh // H, bh % H, bh, c, start, tl.minimum(start + CHUNK, N)


@triton.jit
def _stream_kernel(
    w_ptr, g_ptr, m_ptr, mo_ptr, gram_ptr, beta, H, R, N, C, CHUNK,
    swb, swh, swr, swn, sgb, sgh, sgr, sgn, smb, smh, smr, smn, sob, soh, sor, son,
    NESTEROV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # Inlined, not _program(): this order keeps ptxas's sm_80 allocation at dh 128 spill-free
    # (it sits at 128 registers for 2 programs per SM; reordering these lines spills 16 B).
    pid = tl.program_id(0)
    which = tl.program_id(1)  # 0: the partner Gram W W^T; 1: momentum and D D^T
    c = pid % C
    bh = pid // C
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < R
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    start = c * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < stop)[None, :]
        if which == 0:
            x = tl.load(w_ptr + b * swb + h * swh + rows[:, None] * swr + cols[None, :] * swn,
                        mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        else:
            g = tl.load(g_ptr + b * sgb + h * sgh + rows[:, None] * sgr + cols[None, :] * sgn,
                        mask=mask, other=0.0).to(tl.float32)  # fmt: skip
            m = tl.load(m_ptr + b * smb + h * smh + rows[:, None] * smr + cols[None, :] * smn,
                        mask=mask, other=0.0).to(tl.float32)  # fmt: skip
            m_new = beta * m + g
            out = mo_ptr + b * sob + h * soh + rows[:, None] * sor + cols[None, :] * son
            tl.store(out, m_new.to(mo_ptr.dtype.element_ty), mask=mask)
            x = _direction(g, m_new, beta, NESTEROV)
        acc += tl.dot(x, tl.trans(x), input_precision=PRECISION)
    base = gram_ptr + (((which * (tl.num_programs(0) // C) + bh) * C + c) * BLOCK_R * BLOCK_R)
    tl.store(base + rows[:, None] * BLOCK_R + rows[None, :], acc)


def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def stream(
    w: Tensor, g: Tensor, m: Tensor, beta: float, nesterov: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.phases.stream``, fused: ``(m_new, W W^T, D D^T)``."""
    b, h, r, n = w.shape
    if not supported(w, g, m) or w.numel() == 0 or not use_kernel("stream", b, h, r, n, w.device):
        return ref.stream(w, g, m, beta, nesterov)
    block_r = _block(r)
    warps, block_n, _ = TUNING["stream"][block_r]
    chunk = _chunk(b, h, n, block_n)
    c = triton.cdiv(n, chunk)
    m_new = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    grams = torch.empty(2, b * h, c, block_r, block_r, dtype=torch.float32, device=w.device)
    _stream_kernel[(b * h * c, 2)](
        w, g, m, m_new, grams, float(beta), h, r, n, c, chunk,
        *_strides(w), *_strides(g), *_strides(m), *_strides(m_new),
        NESTEROV=bool(nesterov), BLOCK_R=block_r, BLOCK_N=block_n, PRECISION=DOT_PRECISION,
        num_warps=warps,
    )  # fmt: skip
    full = grams.sum(2)[:, :, :r, :r].reshape(2, b, h, r, r)  # fixed-order sum: deterministic
    return m_new, full[0], full[1]


@triton.jit
def _tile_apply(
    t_ptr, g_ptr, m_ptr, b, h, cols, cmask, beta, R, stb, sth, sgb, sgh, sgr, sgn,
    smb, smh, smr, smn,
    NESTEROV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``T D[:, cols]`` for one head: ``(BLOCK_R, BLOCK_N)``, accumulated over K chunks of T."""
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, BLOCK_R, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < R
        t = tl.load(t_ptr + b * stb + h * sth + rows[:, None] * BLOCK_R + ks[None, :])
        dmask = kmask[:, None] & cmask[None, :]
        m = tl.load(m_ptr + b * smb + h * smh + ks[:, None] * smr + cols[None, :] * smn,
                    mask=dmask, other=0.0).to(tl.float32)  # fmt: skip
        if NESTEROV:
            g = tl.load(g_ptr + b * sgb + h * sgh + ks[:, None] * sgr + cols[None, :] * sgn,
                        mask=dmask, other=0.0).to(tl.float32)  # fmt: skip
            d = g + beta * m
        else:
            d = m
        acc += tl.dot(t, d, input_precision=PRECISION)
    return acc


@triton.jit
def _restart_kernel(
    t_ptr, g_ptr, m_ptr, gram_ptr, beta, H, R, N, C, CHUNK, stb, sth,
    sgb, sgh, sgr, sgn, smb, smh, smr, smn,
    NESTEROV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, bh, c, start, stop = _program(C, H, CHUNK, N)
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        x = _tile_apply(t_ptr, g_ptr, m_ptr, b, h, cols, cols < stop, beta, R, stb, sth,
                        sgb, sgh, sgr, sgn, smb, smh, smr, smn, NESTEROV, BLOCK_R, BLOCK_N,
                        BLOCK_K, PRECISION)  # fmt: skip
        acc += tl.dot(x, tl.trans(x), input_precision=PRECISION)
    tl.store(gram_ptr + (bh * C + c) * BLOCK_R * BLOCK_R + rows[:, None] * BLOCK_R + rows[None, :],
             acc)  # fmt: skip


def _padded(t: Tensor, block: int) -> Tensor:
    """``(B, H, r, r) -> (B, H, block, block)`` fp32, zero-padded, contiguous."""
    b, h, r, _ = t.shape
    out = torch.zeros(b, h, block, block, dtype=torch.float32, device=t.device)
    out[..., :r, :r] = t
    return out


def restart_gram(t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool) -> Tensor:
    """``reference.phases.restart_gram``, fused: ``(T D)(T D)^T`` without storing ``T D``."""
    b, h, r, n = m_new.shape
    if (not supported(g, m_new) or g.numel() == 0
            or not use_kernel("restart", b, h, r, n, g.device)):  # fmt: skip
        return ref.restart_gram(t, g, m_new, beta, nesterov)
    block_r = _block(r)
    warps, block_n, block_k = TUNING["restart"][block_r]
    chunk = _chunk(b, h, n, block_n)
    c = triton.cdiv(n, chunk)
    tp = _padded(t, block_r)
    grams = torch.empty(b * h, c, block_r, block_r, dtype=torch.float32, device=m_new.device)
    _restart_kernel[(b * h * c,)](
        tp, g, m_new, grams, float(beta), h, r, n, c, chunk, tp.stride(0), tp.stride(1),
        *_strides(g), *_strides(m_new),
        NESTEROV=bool(nesterov), BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=DOT_PRECISION, num_warps=warps,
    )  # fmt: skip
    return grams.sum(1)[:, :r, :r].reshape(b, h, r, r)


@triton.jit
def _apply_kernel(
    w_ptr, wo_ptr, t_ptr, g_ptr, m_ptr, step_ptr, decay, beta, H, R, N, C, CHUNK, stb, sth,
    swb, swh, swr, swn, sob, soh, sor, son, sgb, sgh, sgr, sgn, smb, smh, smr, smn,
    NESTEROV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, bh, c, start, stop = _program(C, H, CHUNK, N)
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < R
    step = tl.load(step_ptr + b)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < stop
        delta = _tile_apply(t_ptr, g_ptr, m_ptr, b, h, cols, cmask, beta, R, stb, sth,
                            sgb, sgh, sgr, sgn, smb, smh, smr, smn, NESTEROV, BLOCK_R, BLOCK_N,
                            BLOCK_K, PRECISION)  # fmt: skip
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + b * swb + h * swh + rows[:, None] * swr + cols[None, :] * swn,
                    mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        out = decay * w - step * delta
        tl.store(wo_ptr + b * sob + h * soh + rows[:, None] * sor + cols[None, :] * son,
                 out.to(wo_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def apply_update(
    w: Tensor, t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool,
    decay: float, step: Tensor | float,
) -> Tensor:  # fmt: skip
    """``reference.phases.apply_update``, fused: ``decay W - step T D`` (fp32 result)."""
    b, h, r, n = w.shape
    if not supported(w, g, m_new) or w.numel() == 0 or not use_kernel("apply", b, h, r, n,
                                                                        w.device):  # fmt: skip
        return ref.apply_update(w, t, g, m_new, beta, nesterov, decay, step)
    block_r = _block(r)
    warps, block_n, block_k = TUNING["apply"][block_r]
    chunk = _chunk(b, h, n, block_n)
    c = triton.cdiv(n, chunk)
    tp = _padded(t, block_r)
    steps = torch.as_tensor(step, dtype=torch.float32, device=w.device).reshape(-1).expand(b)
    steps = steps.contiguous()
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    _apply_kernel[(b * h * c,)](
        w, out, tp, g, m_new, steps, float(decay), float(beta), h, r, n, c, chunk,
        tp.stride(0), tp.stride(1), *_strides(w), *_strides(out), *_strides(g), *_strides(m_new),
        NESTEROV=bool(nesterov), BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=DOT_PRECISION, num_warps=warps,
    )  # fmt: skip
    return out


# -- the dh x dh algebra --------------------------------------------------------------------
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
            acc += tl.dot(a, b, input_precision=PRECISION)
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
    s_ptr, pre_ptr, t_ptr, r_ptr, scratch_ptr, coef_ptr, first, n_steps, R,
    MODE: tl.constexpr, HAS_ROOT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per head. All matrices ``BLOCK_R``-square, zero-padded, contiguous.

    MODE 0 (first_maps): in ``s`` (= D D^T), ``pre``; out ``t = Q pre / nu`` and ``r``.
    MODE 1 (last_maps): in ``r`` (restart Gram), ``t`` (= T_r), ``pre`` (= post); out ``t =
    post Q T_r`` and ``r`` (its final Gram, for ||U||^2).
    """
    i = tl.program_id(0)
    mat = BLOCK_R * BLOCK_R
    s_i, t_i, r_i, root = s_ptr + i * mat, t_ptr + i * mat, r_ptr + i * mat, pre_ptr + i * mat
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
        _eye(q, 1.0, R, BLOCK_R, BLOCK_M)
        _gram_steps(r_i, q, s1, s2, s3, coef_ptr, first, n_steps, R, BLOCK_R, BLOCK_M, BLOCK_K,
                    PRECISION)  # fmt: skip
        _mm(q, t_i, s4, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)
        if HAS_ROOT:
            _mm(root, s4, t_i, BLOCK_R, BLOCK_M, BLOCK_K, PRECISION)
        else:
            _copy(s4, t_i, 1.0, BLOCK_R, BLOCK_M)


def _run_maps(mode: int, s_or_r: Tensor, t: Tensor | None, root: Tensor | None,
              coefficients: Sequence[tuple[float, float, float]]):  # fmt: skip
    shape = s_or_r.shape
    r = shape[-1]
    block = _block(r)
    n = s_or_r.numel() // (r * r)
    flat = s_or_r.reshape(n, r, r)
    pad = torch.zeros(n, block, block, dtype=torch.float32, device=s_or_r.device)

    def padded(x: Tensor | None) -> Tensor:
        out = pad.clone()
        if x is not None:
            out[:, :r, :r] = x.reshape(n, r, r)
        return out

    src = padded(flat)
    tt = padded(t)
    rr = src if mode == 1 else pad.clone()
    rootp = padded(root)
    scratch = torch.empty(n, 5, block, block, dtype=torch.float32, device=s_or_r.device)
    coef = torch.tensor(coefficients if coefficients else [(1.0, 0.0, 0.0)], dtype=torch.float32,
                        device=s_or_r.device).reshape(-1)  # fmt: skip
    warps, block_m, block_k = TUNING["maps"][block]
    _maps_kernel[(n,)](
        src, rootp, tt, rr, scratch, coef, 0, len(coefficients), r,
        MODE=mode, HAS_ROOT=root is not None, BLOCK_R=block, BLOCK_M=block_m, BLOCK_K=block_k,
        PRECISION=DOT_PRECISION, num_warps=warps,
    )  # fmt: skip
    return tt[:, :r, :r].reshape(shape), rr[:, :r, :r].reshape(shape)


def _maps_ok(x: Tensor, phase: str = "maps") -> bool:
    r = x.shape[-1]
    return (r <= MAX_HEAD_DIM and x.dtype != torch.float64 and x.numel() > 0
            and use_kernel(phase, 1, x.numel() // (r * r), r, r, x.device))  # fmt: skip


def first_maps(s: Tensor, pre: Tensor | None, coefficients):
    """``reference.phases.first_maps``, one program per head."""
    if not _maps_ok(s):
        return ref.first_maps(s, pre, coefficients)
    return _run_maps(0, s, None, pre, coefficients)


def last_maps(r: Tensor, t: Tensor, post: Tensor | None, coefficients):
    """``reference.phases.last_maps``, one program per head."""
    if not _maps_ok(r):
        return ref.last_maps(r, t, post, coefficients)
    t_new, r_final = _run_maps(1, r, t, post, coefficients)
    return t_new, ref.trace(r_final)


@triton.jit
def _inv_sqrt_kernel(
    a_ptr, z_ptr, scratch_ptr, coef_ptr, n_steps, R,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Coupled quintic Newton-Schulz (``reference.primitives._coupled_newton``) per matrix."""
    i = tl.program_id(0)
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
    """``reference.inv_sqrt``; ``"quintic"`` runs here, one program per matrix; the other
    methods (``"newton"``, ``"eigh"``), float64 and dh > 128 use the reference."""
    r = a.shape[-1]
    if method != "quintic" or not _maps_ok(a, "inv_sqrt"):
        return ref_inv_sqrt(a, method, floor)
    block = _block(r)
    n = a.numel() // (r * r)
    ap = torch.zeros(n, block, block, dtype=torch.float32, device=a.device)
    ap[:, :r, :r] = a.reshape(n, r, r)
    z = torch.empty_like(ap)
    scratch = torch.empty(n, 4, block, block, dtype=torch.float32, device=a.device)
    coef = torch.tensor(INV_SQRT_QUINTIC, dtype=torch.float32, device=a.device).reshape(-1)
    warps, block_m, block_k = TUNING["maps"][block]
    _inv_sqrt_kernel[(n,)](
        ap, z, scratch, coef, len(INV_SQRT_QUINTIC), r,
        BLOCK_R=block, BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=DOT_PRECISION,
        num_warps=warps,
    )  # fmt: skip
    return z[:, :r, :r].reshape(a.shape)
