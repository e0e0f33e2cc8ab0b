"""Fused batched Newton-Schulz msign (spec §2), one Triton program per (m x n) slice.

Mirrors ``cm_triton.reference.primitives.msign``: same name, signature and result.
Per slice the m x m ``A = X X^T`` and ``B = b A + c A A`` stay on chip while X streams through
in column tiles; all steps of the schedule run in one launch. The slice is read through its
strides (row blocks of q/k/v, column blocks of o, transposes), never copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from cm_triton.dispatch import interpreting
from cm_triton.reference import primitives as ref
from cm_triton.schedules import POLAR_EXPRESS_8

MAX_ROWS = 128  # rows of the short side kept on chip; larger slices use the reference (cuBLAS)


@triton.jit
def _dot_bf16(a, b, NATIVE: tl.constexpr):
    """``a @ b`` of bf16-rounded operands with fp32 accumulation.

    Triton 3.6's interpreter returns garbage for ``tl.dot`` on bf16 operands (errors ~1e10,
    seen here), so under ``TRITON_INTERPRET=1`` the rounded operands are multiplied in fp32:
    the same arithmetic, since a product of two bf16 numbers is exact in fp32.
    """
    if NATIVE:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    a32 = a.to(tl.bfloat16).to(tl.float32)
    b32 = b.to(tl.bfloat16).to(tl.float32)
    return tl.dot(a32, b32, input_precision="ieee")


@triton.jit
def _msign_kernel(
    x_ptr, out_ptr, coef_ptr, n_steps, M, N,
    sxb, sxm, sxn, sob, som, son,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ITER_BF16: tl.constexpr,
    NATIVE_BF16: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    x_base = x_ptr + pid * sxb
    o_base = out_ptr + pid * sob
    # Pass 0: the slice's Frobenius norm.
    sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        x = tl.load(x_base + rows[:, None] * sxm + cols[None, :] * sxn, mask=mask, other=0.0)
        x = x.to(tl.float32)
        sq += x * x
    scale = 1.0 / (tl.sqrt(tl.sum(sq)) * 1.01 + 1e-7)
    # Pass 1: normalised copy into the output, which is the iteration's scratch.
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        x = tl.load(x_base + rows[:, None] * sxm + cols[None, :] * sxn, mask=mask, other=0.0)
        x = x.to(tl.float32) * scale
        if ITER_BF16:
            x = x.to(tl.bfloat16).to(tl.float32)
        tl.store(o_base + rows[:, None] * som + cols[None, :] * son, x, mask=mask)
    tl.debug_barrier()
    for step in range(n_steps):
        a = tl.load(coef_ptr + 3 * step)
        b = tl.load(coef_ptr + 3 * step + 1)
        c = tl.load(coef_ptr + 3 * step + 2)
        # A = X X^T, accumulated in fp32 over column tiles.
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = (rows[:, None] < M) & (cols[None, :] < N)
            x = tl.load(o_base + rows[:, None] * som + cols[None, :] * son, mask=mask, other=0.0)
            if ITER_BF16:
                acc += _dot_bf16(x, tl.trans(x), NATIVE_BF16)
            else:
                acc += tl.dot(x, tl.trans(x), input_precision="ieee")
        if ITER_BF16:
            ab = acc.to(tl.bfloat16).to(tl.float32)  # A is rounded to bf16, as in the reference
            poly = b * ab + c * _dot_bf16(ab, ab, NATIVE_BF16)
        else:
            poly = b * acc + c * tl.dot(acc, acc, input_precision="ieee")
        tl.debug_barrier()
        # X <- a X + B X, tile by tile (each tile depends only on B and itself).
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = (rows[:, None] < M) & (cols[None, :] < N)
            ptrs = o_base + rows[:, None] * som + cols[None, :] * son
            x = tl.load(ptrs, mask=mask, other=0.0)
            if ITER_BF16:
                new = a * x + _dot_bf16(poly, x, NATIVE_BF16)
                new = new.to(tl.bfloat16).to(tl.float32)
            else:
                new = a * x + tl.dot(poly, x, input_precision="ieee")
            tl.store(ptrs, new, mask=mask)
        tl.debug_barrier()


def _supported(x: Tensor) -> bool:
    return (
        x.dtype in (torch.float32, torch.bfloat16, torch.float16) and min(x.shape[-2:]) <= MAX_ROWS
    )


def msign(
    x: Tensor,
    coefficients: Sequence[tuple[float, float, float]] = POLAR_EXPRESS_8,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Orthogonal polar factor of each slice (spec §2), fused. ``(..., m, n) -> (..., m, n)``.

    Iterations in bf16 when ``dtype`` is bf16 (fp32 accumulation), else in fp32; result fp32.
    Slices whose short side exceeds ``MAX_ROWS`` (the hybrid O sign over a whole matrix, large
    joint stacks) and float64 input go to the reference: those are large matmuls that cuBLAS
    already runs at peak, and an m x m block past 128 would not fit on chip.
    """
    if not _supported(x) or x.numel() == 0:
        return ref.msign(x, coefficients, dtype)
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    xb = x.reshape(-1, m, n)  # a view for every layout cm_triton passes
    out = torch.empty(xb.shape, dtype=torch.float32, device=x.device)
    xk, ok = (xb.mT, out.mT) if m > n else (xb, out)  # iterate on the wide orientation
    rows, cols = xk.shape[-2:]
    coef = torch.tensor(coefficients, dtype=torch.float32, device=x.device).reshape(-1)
    block_m = max(16, triton.next_power_of_2(rows))
    block_n = 64 if block_m >= 128 else 128
    _msign_kernel[(xk.shape[0],)](
        xk, ok, coef, len(coefficients), rows, cols,
        *xk.stride(), *ok.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, ITER_BF16=dtype == torch.bfloat16,
        NATIVE_BF16=not interpreting(),
    )  # fmt: skip
    return out.reshape(*lead, m, n)
