"""Triton kernels of the step's big-matrix passes (``reference/phases.py``), every variant.

Two kernels serve every pass of spec §2.2:

- ``_gram_kernel`` (``stream_grams``, ``stream``, ``cross_grams``): per head, Grams of up to
  three *forms* of its big operands ``x0, x1, x2`` (``F0 = x0``, ``F1 = a1 x1 + b1 x2``,
  ``F2 = a2 x1 + b2 x2``): the stream reads ``W, G, m`` and takes ``F1 = beta m + G``
  (written once, the new momentum) and ``F2 = D``; an explicit sign's Grams read ``W, U``.
- ``_map_kernel`` (``apply_update``, ``restart_gram``): per head, ``X = T D + T_W W`` with
  dh x dh (``R x R``) maps; written as ``decay W - step X`` (the apply, the explicit sign's
  forming pass, the reprojected momentum), or only its Gram ``X X^T`` accumulated without
  storing ``X`` (the restart).

A leg's rows ``R`` may exceed one block (joint's ``(G+1) dh``): rows are tiled in blocks of
``BLOCK_R``, a Gram program computes one ``(i, j)`` block pair and an apply program one row
block, reading all of the head's rows through the maps. The width is split into chunks so that
realistic shapes launch hundreds of programs; partial Grams are summed in a fixed order
afterwards (no atomics: steps are bit-reproducible). Big tensors ``(B, H, R, n)`` are read
through their strides (views are never copied), each batch entry at its own offset: a stack's
``b * stride(0)``, or a ``tables.LayerRows``' table, so that each layer's weight and gradient
are read where they live. ``apply_update`` without maps (``t`` None) writes
``decay W - step D`` for a ``D`` formed elsewhere (the hybrid O sign's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cm_triton.kernels.common import (
    DOT_PRECISION,
    _chunk,
    gram_row_cap,
    launch_options,
    on_device,
    streams_take,
    tuning,
    unsupported,
)
from cm_triton.reference.phases import group_size
from cm_triton.tables import LayerRows, device_constant, stride_offsets

__all__ = ["stream", "stream_grams", "cross_grams", "restart_gram", "apply_update"]

FORMS = {"w": 0, "m": 1, "d": 2}  # stream_grams' names of the forms F0, F1, F2


def _row_blocks(r: int, cap: int = 128) -> tuple[int, int]:
    """``(BLOCK_R, blocks)`` for ``r`` rows: one power-of-two block up to ``cap``, else
    blocks of ``cap`` rows."""
    block = max(16, triton.next_power_of_2(r)) if r <= cap else cap
    return block, triton.cdiv(r, block)


@triton.jit
def _at(ptr, offsets, b, ALIGNED: tl.constexpr):
    """Batch entry ``b`` (int64) of an operand: ``ptr + offsets[b]`` (an int64 table).
    ``ALIGNED``: every offset is a whole number of 16 bytes (checked at launch), so vector
    loads stay possible."""
    off = tl.load(offsets + b)
    if ALIGNED:
        off = tl.multiple_of(off, 128 // ptr.dtype.element_ty.primitive_bitwidth)
    return ptr + off


@triton.jit
def _load(ptr, h, rows, cols, sh, sr, sn, mask):
    # h is int64 (the head's offset may pass 2^31 in a big layer); the tile's offsets stay
    # int32, bounded by one head's extent (checked at launch: streams_take).
    return tl.load(ptr + h * sh + rows[:, None] * sr + cols[None, :] * sn, mask=mask,
                   other=0.0).to(tl.float32)  # fmt: skip


@triton.jit
def _entry(pid, NQ, C, H):
    """A 1-D program id -> ``(q, c, bh, b, h)``: q (the row-block job, fastest, so programs on
    the same columns run together), the column chunk c, and the head ``bh = b H + h``.
    ``bh``, ``b`` and ``h`` are int64: every offset built from them may pass 2^31."""
    q = pid % NQ
    rest = pid // NQ
    c = rest % C
    bh = (rest // C).to(tl.int64)
    return q, c, bh, bh // H, bh % H


@triton.jit
def _form(f, x0, x1, x2, h, rows, cols, mask, a1, b1, a2, b2, sc,
          s0h, s0r, s0n, s1h, s1r, s1n, s2h, s2r, s2n, HAS_X2: tl.constexpr):  # fmt: skip
    """Form ``f`` of the operands on a tile: ``F0 = x0``, ``F1 = sc (a1 x1 + b1 x2)`` or
    ``F2 = sc (a2 x1 + b2 (a1 x1 + b1 x2))`` (``sc`` a power of two)."""
    if f == 0:
        x = _load(x0, h, rows, cols, s0h, s0r, s0n, mask)
    else:
        v1 = _load(x1, h, rows, cols, s1h, s1r, s1n, mask)
        x = a1 * v1
        if HAS_X2:
            x += b1 * _load(x2, h, rows, cols, s2h, s2r, s2n, mask)
        if f == 2:
            x = a2 * v1 + b2 * x
        x = x * sc
    return x


@triton.jit
def _gram_kernel(
    x0, x1, x2, mo_ptr, f0, f1, f2, fo, gram_ptr, pairs_ptr, blocks_ptr, scale_ptr, scale_sb,
    a1, b1, a2, b2, H, R, N, C, CHUNK, KB, NB, NQ, s0h, s0r, s0n, s1h, s1r, s1n, s2h, s2r, s2n,
    soh, sor, son,
    HAS_X2: tl.constexpr, WRITE_M: tl.constexpr, SAME: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # SAME: every pair is a form with itself in one row block (the default stream: W W^T and
    # D D^T), so one tile per step is live, as spill-free tiling at dh 128 on sm_80 needs.
    # A taller leg's row blocks: the block pairs (i, j) of the table at ``blocks_ptr`` (NB of
    # them: i <= j only when every pair is a form with itself, the Gram being symmetric).
    # With WRITE_M the first pair is (F2, F2) and its i == j programs write F1 = m_new.
    # The forms F1, F2 (the momentum and the direction) enter the Grams scaled by the batch
    # entry's power of two (``scale``: exact), so no finite gradient overflows them; m_new is
    # written unscaled.
    q, c, bh, b, h = _entry(tl.program_id(0), NQ, C, H)  # q: (pair, block pair)
    sc = tl.load(scale_ptr + b * scale_sb)
    # Each operand's batch entry b at its own offset (layers read where they live: tables.py)
    x0 = _at(x0, f0, b, ALIGNED)
    x1 = _at(x1, f1, b, ALIGNED)
    x2 = _at(x2, f2, b, ALIGNED)
    mo_ptr = _at(mo_ptr, fo, b, ALIGNED)
    pair = (q // NB).to(tl.int64)
    t = (q % NB).to(tl.int64)
    i = tl.load(blocks_ptr + 2 * t)
    j = tl.load(blocks_ptr + 2 * t + 1)
    fa = tl.load(pairs_ptr + 2 * pair)
    fb = tl.load(pairs_ptr + 2 * pair + 1)
    same = (fa == fb) & (i == j)
    write = (pair == 0) & (i == j)
    ar = tl.arange(0, BLOCK_R)
    rows_i = i * BLOCK_R + ar
    rows_j = j * BLOCK_R + ar
    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    start = c * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = (cols < stop)[None, :]
        mask_i = (rows_i < R)[:, None] & cm
        if WRITE_M:
            if write:  # F1 = m_new written once per row block, F2 = D from the same loads
                v1 = _load(x1, h, rows_i, cols, s1h, s1r, s1n, mask_i)
                xm = a1 * v1 + b1 * _load(x2, h, rows_i, cols, s2h, s2r, s2n, mask_i)
                out = mo_ptr + h * soh + rows_i[:, None] * sor + cols[None, :] * son
                tl.store(out, xm.to(mo_ptr.dtype.element_ty), mask=mask_i)
                xa = (a2 * v1 + b2 * xm) * sc
            else:
                xa = _form(fa, x0, x1, x2, h, rows_i, cols, mask_i, a1, b1, a2, b2, sc, s0h,
                           s0r, s0n, s1h, s1r, s1n, s2h, s2r, s2n, HAS_X2)  # fmt: skip
        else:
            xa = _form(fa, x0, x1, x2, h, rows_i, cols, mask_i, a1, b1, a2, b2, sc, s0h, s0r,
                       s0n, s1h, s1r, s1n, s2h, s2r, s2n, HAS_X2)  # fmt: skip
        if SAME:
            xb = xa
        elif same:
            xb = xa
        else:
            mask_j = (rows_j < R)[:, None] & cm
            xb = _form(fb, x0, x1, x2, h, rows_j, cols, mask_j, a1, b1, a2, b2, sc, s0h, s0r,
                       s0n, s1h, s1r, s1n, s2h, s2r, s2n, HAS_X2)  # fmt: skip
        acc = tl.dot(xa, tl.trans(xb), acc, input_precision=PRECISION)
    rp = KB * BLOCK_R
    bhs = tl.num_programs(0) // (C * NQ)  # B H
    base = gram_ptr + ((pair * bhs + bh) * C + c) * rp * rp
    tl.store(base + rows_i[:, None] * rp + rows_j[None, :], acc)


def _operand(x: Tensor) -> tuple[Tensor, Tensor, bool, int, int, int]:
    """A big ``(B, H, R, n)`` operand as the kernels read it: ``(pointer, offsets, aligned, sh,
    sr, sn)``, batch entry ``b`` at ``pointer + offsets[b]`` (``aligned``: every offset a whole
    number of 16 bytes). A ``LayerRows`` is read where its layers live (its table); a tensor
    through its batch stride."""
    if isinstance(x, LayerRows):
        return (x.first, x.offsets, x.aligned, *x.first.stride())
    offsets = stride_offsets(x.device, x.shape[0], x.stride(0))
    return (x, offsets, x.stride(0) * x.element_size() % 16 == 0, *x.stride()[1:])


def _per_entry(name: str, value: Tensor | None, b: int, device: torch.device) -> tuple[Tensor, int]:
    """A per-batch-entry number as the kernels read it (``value[b * stride]``): a device
    tensor of 1 or ``b`` values and its stride (0: one for all); None is 1."""
    if value is None:
        return device_constant((1.0,), torch.float32, device), 0
    v = value.to(device=device, dtype=torch.float32).reshape(-1)
    if v.numel() not in (1, b):
        raise ValueError(f"{name}: expected 1 or {b} values (one per batch entry), "
                         f"got {v.numel()}")  # fmt: skip
    return v, int(v.numel() > 1)


def _block_pairs(kb: int, symmetric: bool, device: torch.device) -> tuple[Tensor, int]:
    """The row-block pairs (i, j) a Gram's programs compute, as a device table (made once):
    every pair, or i <= j only for a symmetric Gram (the rest mirrored, ``_mirror``)."""
    blocks = [(i, j) for i in range(kb) for j in range(kb) if j >= i or not symmetric]
    return device_constant(blocks, torch.int32, device), len(blocks)


_LOWER: dict[tuple, Tensor] = {}


def _mirror(full: Tensor, block: int) -> Tensor:
    """``(..., rp, rp)`` with only its row blocks i <= j computed -> the symmetric whole: each
    block below the diagonal is its mirror's transpose (the mask made on the device, once)."""
    rp = full.shape[-1]
    key = (full.device, rp, block)
    if key not in _LOWER:
        ids = torch.arange(rp, device=full.device) // block
        _LOWER[key] = ids[:, None] > ids[None, :]
    return torch.where(_LOWER[key], full.mT, full)


def _grams(x0: Tensor, x1: Tensor, x2: Tensor | None, coef: tuple[float, ...],
           pairs: list[tuple[int, int]], m_out: Tensor | None,
           scale: Tensor | None = None) -> list[Tensor]:  # fmt: skip
    """Launch ``_gram_kernel``: the ``(B, H, R, R)`` Gram of each pair of forms (F1, F2
    times ``scale``, one per batch entry)."""
    b, h, r, n = x0.shape
    # Cross pairs (W D^T, joint's groups) keep two tiles live: 64-row blocks stay spill-free
    # where 128-row ones do not, as do Grams of one form on mma.sync targets (gram_row_cap;
    # bench/results/compile_report.md).
    diagonal = all(fa == fb for fa, fb in pairs)
    block_r, kb = _row_blocks(r, gram_row_cap() if diagonal else 64)
    same = kb == 1 and diagonal
    warps, block_n, _ = tuning("stream" if same else "stream_cross", block_r)
    blocks, nb = _block_pairs(kb, diagonal, x0.device)
    chunk = _chunk(b, h * nb, n, block_n)
    c = triton.cdiv(n, chunk)
    rp = kb * block_r
    grams = torch.empty(len(pairs), b * h, c, rp, rp, dtype=torch.float32, device=x0.device)
    table = device_constant(pairs, torch.int32, x0.device)
    scales, scale_sb = _per_entry("scale", scale, b, x0.device)
    ops = [_operand(x) for x in (x0, x1, x1 if x2 is None else x2, x1 if m_out is None else m_out)]
    nq = len(pairs) * nb
    with on_device(x0):
        _gram_kernel[(b * h * c * nq,)](
            *(o[0] for o in ops), *(o[1] for o in ops), grams, table, blocks, scales, scale_sb,
            *(float(v) for v in coef), h, r, n, c, chunk, kb, nb, nq,
            *(s for o in ops for s in o[3:]),
            HAS_X2=x2 is not None, WRITE_M=m_out is not None, SAME=same,
            ALIGNED=all(o[2] for o in ops), BLOCK_R=block_r, BLOCK_N=block_n,
            PRECISION=DOT_PRECISION, num_warps=warps, **launch_options(),
        )  # fmt: skip
    full = grams.sum(2)  # fixed-order sum over the chunks: deterministic
    if diagonal and kb > 1:
        full = _mirror(full, block_r)
    full = full[:, :, :r, :r]
    return list(full.reshape(len(pairs), b, h, r, r).unbind(0))


def _check(kernel: str, *tensors: Tensor) -> None:
    if not streams_take(*tensors):
        raise unsupported(kernel, tensors[0])


def stream_grams(
    w: Tensor, g: Tensor, m: Tensor, beta: float, nesterov: bool,
    want: tuple[str, ...] = ("ww", "dd"), scale: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """``reference.phases.stream_grams``, fused: one read of ``W, G, m``, ``m_new`` written
    once, every wanted Gram accumulated in the same pass."""
    _check("stream", w, g, m)
    # F1 = m_new = G + beta m; F2 = D: m_new, or G + beta m_new (spec §3)
    a2, b2 = (1.0, beta) if nesterov else (0.0, 1.0)
    # The first pair writes m_new from the loads of D: D D^T goes first (always computed).
    order = ["dd", *(k for k in want if k != "dd")]
    pairs = [(FORMS[k[0]], FORMS[k[1]]) for k in order]
    m_new = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    out = _grams(w, g, m, (1.0, beta, a2, b2), pairs, m_new, scale)
    return m_new, {k: x for k, x in zip(order, out) if k in want}


def stream(
    w: Tensor, g: Tensor, m: Tensor, beta: float, nesterov: bool, scale: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.phases.stream``, fused: ``(m_new, W W^T, D D^T)``."""
    m_new, grams = stream_grams(w, g, m, beta, nesterov, scale=scale)
    return m_new, grams["ww"], grams["dd"]


def cross_grams(w: Tensor, u: Tensor) -> dict[str, Tensor]:
    """``reference.phases.cross_grams``, fused: ``U U^T`` and ``W U^T`` in one pass."""
    _check("cross_grams", w, u)
    uu, wu = _grams(w, u, None, (1.0, 0.0, 0.0, 1.0), [(2, 2), (0, 2)], None)
    return {"uu": uu, "wu": wu}


@triton.jit
def _combo(
    t_ptr, tw_ptr, w_ptr, g_ptr, m_ptr, h, rows, cols, cmask, beta, R, RP,
    swh, swr, swn, sgh, sgr, sgn, smh, smr, smn,
    HAS_TW: tl.constexpr, NESTEROV: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``(T D + T_W W)[rows, cols]`` for one head, over K chunks of the maps' columns."""
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, RP, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        dmask = (ks < R)[:, None] & cmask[None, :]
        t = tl.load(t_ptr + rows[:, None] * RP + ks[None, :])
        d = _load(m_ptr, h, ks, cols, smh, smr, smn, dmask)
        if NESTEROV:
            d = _load(g_ptr, h, ks, cols, sgh, sgr, sgn, dmask) + beta * d
        acc = tl.dot(t, d, acc, input_precision=PRECISION)
        if HAS_TW:
            tw = tl.load(tw_ptr + rows[:, None] * RP + ks[None, :])
            wv = _load(w_ptr, h, ks, cols, swh, swr, swn, dmask)
            acc = tl.dot(tw, wv, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _map_kernel(
    w_ptr, wo_ptr, g_ptr, m_ptr, fw, fo, fg, fm, t_ptr, tw_ptr, step_ptr, step_val, step_sb,
    gram_ptr, decay, beta, H, R, N, C, CHUNK, KB, NQ, GT, swh, swr, swn, soh, sor, son, sgh,
    sgr, sgn, smh, smr, smn, MODE: tl.constexpr, HAS_TW: tl.constexpr, HAS_W: tl.constexpr,
    STEP_PTR: tl.constexpr, NESTEROV: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """MODE 0: ``out = decay W - step X``; MODE 1: the partial Gram ``X X^T`` of a leg of one
    row block (a taller leg's restart forms X with MODE 0 and takes its Gram with the Gram
    kernel: ``restart_gram``); MODE 2: ``out = decay W - step X`` for a given ``X`` (read at
    ``m_ptr``: no maps). ``step``: entry ``b`` of a device tensor at ``step_ptr + b * step_sb``
    (``STEP_PTR``), else ``step_val``."""
    q, c, bh, b, h = _entry(tl.program_id(0), NQ, C, H)  # q: the row block
    w_ptr = _at(w_ptr, fw, b, ALIGNED)
    wo_ptr = _at(wo_ptr, fo, b, ALIGNED)
    g_ptr = _at(g_ptr, fg, b, ALIGNED)
    m_ptr = _at(m_ptr, fm, b, ALIGNED)
    rp = KB * BLOCK_R  # bh is int64: these scratch offsets pass 2^31 in a big batch
    t_ptr += (bh // GT) * rp * rp  # GT heads share a map (grouped roots: group_size)
    tw_ptr += bh * rp * rp
    ar = tl.arange(0, BLOCK_R)
    start = c * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    if MODE != 1:
        rows = q * BLOCK_R + ar
        rmask = rows < R
        if STEP_PTR:
            step = tl.load(step_ptr + b * step_sb)
        else:
            step = step_val
        for n0 in range(start, stop, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < stop
            if MODE == 2:  # X = D itself
                x = _load(m_ptr, h, rows, cols, smh, smr, smn, rmask[:, None] & cmask[None, :])
                if NESTEROV:
                    x = beta * x + _load(g_ptr, h, rows, cols, sgh, sgr, sgn,
                                         rmask[:, None] & cmask[None, :])  # fmt: skip
            else:
                x = _combo(t_ptr, tw_ptr, w_ptr, g_ptr, m_ptr, h, rows, cols, cmask, beta,
                           R, rp, swh, swr, swn, sgh, sgr, sgn, smh, smr, smn, HAS_TW, NESTEROV,
                           BLOCK_R, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
            mask = rmask[:, None] & cmask[None, :]
            out = -step * x
            if HAS_W:
                out += decay * _load(w_ptr, h, rows, cols, swh, swr, swn, mask)
            tl.store(wo_ptr + h * soh + rows[:, None] * sor + cols[None, :] * son,
                     out.to(wo_ptr.dtype.element_ty), mask=mask)  # fmt: skip
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < stop
            x = _combo(t_ptr, tw_ptr, w_ptr, g_ptr, m_ptr, h, ar, cols, cmask, beta, R, rp,
                       swh, swr, swn, sgh, sgr, sgn, smh, smr, smn, HAS_TW, NESTEROV, BLOCK_R,
                       BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
            acc = tl.dot(x, tl.trans(x), acc, input_precision=PRECISION)
        base = gram_ptr + (bh * C + c) * rp * rp
        tl.store(base + ar[:, None] * rp + ar[None, :], acc)


def _pad_maps(t: Tensor, b: int, h: int, r: int, rp: int) -> Tensor:
    """``(B, H, r, r)`` (or broadcastable) -> ``(B, H, rp, rp)`` fp32, zero-padded (``t``
    itself where it already is that)."""
    if t.shape == (b, h, rp, rp) and t.dtype == torch.float32 and t.is_contiguous():
        return t
    out = torch.zeros(b, h, rp, rp, dtype=torch.float32, device=t.device)
    out[..., :r, :r] = t
    return out


def _launch_maps(mode: int, w: Tensor, t: Tensor | None, t_w: Tensor | None, g: Tensor,
                 m: Tensor, beta: float, nesterov: bool, decay: float = 0.0,
                 step: Tensor | float = 0.0, out: Tensor | None = None) -> Tensor:  # fmt: skip
    b, h, r, n = m.shape
    block_r, kb = _row_blocks(r)
    assert mode != 1 or kb == 1, "a taller leg's restart is two passes (restart_gram)"
    phase = "restart" if mode == 1 else ("apply_tw" if t_w is not None else "apply")
    warps, block_n, block_k = tuning(phase, block_r)
    rp = kb * block_r
    blocks = kb
    chunk = _chunk(b, h * blocks, n, block_n)
    c = triton.cdiv(n, chunk)
    gt = group_size(t, h)  # GT heads share a map (grouped roots)
    ht = h // gt
    tp = m if t is None else _pad_maps(t, b, ht, r, rp)  # MODE 2 reads no maps
    twp = tp if t_w is None else _pad_maps(t_w, b, h, r, rp)
    # A tensor step (one per batch entry, or one for all: stride 0) is read on the device, a
    # number passed as one: neither is copied (nor, under a CUDA graph, uploaded) per launch.
    steps, step_val, step_sb = None, 0.0, 0
    if torch.is_tensor(step):
        steps, step_sb = _per_entry("step", step, b, m.device)
    else:
        step_val = float(step)
    grams = None
    if mode == 1:
        grams = torch.empty(b * h, c, rp, rp, dtype=torch.float32, device=m.device)
        out = m
    ops = [_operand(x) for x in (w, out, g, m)]
    with on_device(m):
        _map_kernel[(b * h * c * blocks,)](
            *(o[0] for o in ops), *(o[1] for o in ops), tp, twp, tp if steps is None else steps,
            step_val, step_sb,
            grams if grams is not None else tp, float(decay), float(beta), h, r, n, c, chunk, kb,
            blocks, gt,
            *(s for o in ops for s in o[3:]), MODE=mode, HAS_TW=t_w is not None,
            HAS_W=mode != 1 and decay != 0.0, STEP_PTR=steps is not None,
            NESTEROV=bool(nesterov), ALIGNED=all(o[2] for o in ops),
            BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=DOT_PRECISION,
            num_warps=warps, **launch_options(),
        )  # fmt: skip
    if mode == 1:
        return grams.sum(1)[:, :r, :r].reshape(b, h, r, r)
    return out


def restart_gram(
    t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool,
    w: Tensor | None = None, t_w: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``reference.phases.restart_gram``, fused: ``X X^T`` for ``X = T D (+ T_W W)``, without
    storing ``X`` for a leg of one row block. A taller leg (joint's groups, Muon's legs) forms
    X with the apply kernel and takes its Gram with the Gram kernel: fused, each block pair's
    program would re-form both its row blocks of X from every row of D (kb times the
    products, 2 kb times the reads: ``cost_model``), where two passes form each row once."""
    _check("restart", m_new, g, *(() if w is None else (w,)))
    block_r, kb = _row_blocks(m_new.shape[-2])
    if t_w is not None or kb > 1 or block_r > gram_row_cap():
        # Also the reprojected direction's restart (T D + T_W W): fused, its two products
        # per tile spill on sm_80 at dh 64 whatever the tiling; and a 128-row block on
        # mma.sync targets, whose fused 128 x 128 accumulator spills on sm_120 (32-456 bytes
        # at every warp count and tile tried, bench/results/compile_report.md), as the Gram
        # kernel's does (gram_row_cap).
        x = torch.empty(m_new.shape, dtype=torch.float32, device=m_new.device)
        w = m_new if w is None else w  # read only with t_w (decay 0: no W term)
        x = _launch_maps(0, w, t, t_w, g, m_new, beta, nesterov, 0.0, -1.0, x)
        return _grams(x, x, None, (1.0, 0.0, 0.0, 1.0), [(0, 0)], None)[0]
    return _launch_maps(1, m_new, t, None, g, m_new, beta, nesterov)


def apply_update(
    w: Tensor, t: Tensor, g: Tensor, m_new: Tensor, beta: float, nesterov: bool,
    decay: float, step: Tensor | float, t_w: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``reference.phases.apply_update``, fused: ``decay W - step (T D + T_W W)`` (fp32;
    ``t`` None: ``decay W - step D``)."""
    _check("apply", w, g, m_new)
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    mode = 2 if t is None else 0
    return _launch_maps(mode, w, t, t_w, g, m_new, beta, nesterov, decay, step, out)
