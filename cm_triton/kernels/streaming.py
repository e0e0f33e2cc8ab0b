"""Triton kernels of the Gram-form step's streaming passes (``reference/phases.py``).

- ``stream``: ``m <- beta m + G`` written once, and each head's partial Grams ``W W^T`` and
  ``D D^T`` over a chunk of columns; the chunks split the width so that realistic shapes
  launch hundreds of programs, and their partial Grams are summed in a fixed order afterwards
  (no atomics: steps are bit-reproducible).
- ``restart_gram``: ``X = T D`` formed tile by tile and ``X X^T`` accumulated, never storing X.
- ``apply_update``: ``W <- decay W - step T D``, written once.

Big tensors ``(B, H, dh, n)`` are read through their strides (views are never copied).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cm_triton.cost_model import use_kernel
from cm_triton.kernels.common import DOT_PRECISION, TUNING, _block, _chunk, _padded, supported
from cm_triton.reference import phases as ref


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
