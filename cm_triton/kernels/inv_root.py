"""Fused whitened Gram inverse root (spec §1-§2), one Triton program per root.

Mirrors ``cm_triton.reference.primitives.gram_inv_sqrt``: same name, signature and result.
Per root: the group-summed Gram ``sum_h W_h W_h^T`` streamed from head blocks read through
their strides (row blocks of q/k/v, transposed column blocks of o), ``+ lambda I``, the coupled
Newton-Schulz inverse root on chip, and optionally ``C^{-1} D`` for every head that uses it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cm_triton.reference import primitives as ref
from cm_triton.schedules import INV_SQRT_NEWTON

MAX_HEAD_DIM = 128


@triton.jit
def _gram_inv_sqrt_kernel(
    w_ptr, d_ptr, root_ptr, white_ptr, coef_ptr, n_steps, damping,
    DH, N, GROUP, PER_ROOT,
    swh, swm, swn, sdh, sdm, sdn, srh, srm, srn, sxh, sxm, sxn,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, APPLY: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    # Gram of the group: sum over its GROUP head blocks, streamed in column tiles.
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for h in range(GROUP):
        base = w_ptr + (r * GROUP + h) * swh
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = (idx[:, None] < DH) & (cols[None, :] < N)
            w = tl.load(base + idx[:, None] * swm + cols[None, :] * swn, mask=mask, other=0.0)
            w = w.to(tl.float32)
            acc += tl.dot(w, tl.trans(w), input_precision="ieee")
    valid = idx < DH
    eye = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
    a = acc + damping * tl.where(valid[:, None], eye, 0.0)
    s = (1.0 - 1e-3) / tl.sqrt(tl.sum(a * a))
    # Padding rows/columns carry an identity block, which the iteration leaves at identity and
    # which never mixes with the valid block (block-diagonal algebra).
    pad_eye = tl.where(valid[:, None], 0.0, eye)
    y = s * a + pad_eye
    z = eye
    for step in range(n_steps):
        ca = tl.load(coef_ptr + 2 * step)
        cb = tl.load(coef_ptr + 2 * step + 1)
        p = tl.dot(z, y, input_precision="ieee")
        y = ca * y + cb * tl.dot(y, p, input_precision="ieee")
        z = ca * z + cb * tl.dot(p, z, input_precision="ieee")
        y = 0.5 * (y + tl.trans(y))
        z = 0.5 * (z + tl.trans(z))
    root = z * tl.sqrt(s)
    rmask = valid[:, None] & valid[None, :]
    tl.store(root_ptr + r * srh + idx[:, None] * srm + idx[None, :] * srn, root, mask=rmask)
    if APPLY:
        root = tl.where(rmask, root, 0.0)
        for k in range(PER_ROOT):
            head = r * PER_ROOT + k
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                mask = (idx[:, None] < DH) & (cols[None, :] < N)
                dv = tl.load(
                    d_ptr + head * sdh + idx[:, None] * sdm + cols[None, :] * sdn,
                    mask=mask, other=0.0,
                ).to(tl.float32)  # fmt: skip
                out = tl.dot(root, dv, input_precision="ieee")
                tl.store(
                    white_ptr + head * sxh + idx[:, None] * sxm + cols[None, :] * sxn,
                    out,
                    mask=mask,
                )


def gram_inv_sqrt(
    w: Tensor,
    damping: float,
    group_size: int = 1,
    method: str = "newton",
    apply_to: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Partner inverse root and optionally the whitened operand, fused (spec §1-§2).

    Shapes: ``w (H, dh, d) -> root (H // group_size, dh, dh)`` (fp32);
    ``apply_to (R*k, dh, d) -> (R*k, dh, d)`` (fp32), head ``i`` whitened by root ``i // k``.
    ``method="eigh"``, float64 input and ``dh > 128`` use the reference (torch's eigh has no
    Triton counterpart here; fp64 and large blocks are outside what the kernel keeps on chip).
    """
    h, dh, d = w.shape
    if method != "newton" or w.dtype == torch.float64 or dh > MAX_HEAD_DIM or w.numel() == 0:
        return ref.gram_inv_sqrt(w, damping, group_size, method, apply_to)
    n_roots = h // group_size
    root = torch.empty(n_roots, dh, dh, dtype=torch.float32, device=w.device)
    white = None
    d_arg = w
    per_root = 0
    if apply_to is not None:
        white = torch.empty(apply_to.shape, dtype=torch.float32, device=w.device)
        d_arg, per_root = apply_to, apply_to.shape[0] // n_roots
    x_arg = white if white is not None else root
    coef = torch.tensor(INV_SQRT_NEWTON, dtype=torch.float32, device=w.device).reshape(-1)
    _gram_inv_sqrt_kernel[(n_roots,)](
        w, d_arg, root, x_arg, coef, len(INV_SQRT_NEWTON), float(damping),
        dh, d, group_size, per_root,
        *w.stride(), *d_arg.stride(), *root.stride(), *x_arg.stride(),
        BLOCK=max(16, triton.next_power_of_2(dh)), BLOCK_N=64, APPLY=apply_to is not None,
    )  # fmt: skip
    return root, white
