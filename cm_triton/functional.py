"""``cm_qk`` / ``cm_ov``: the release's functional API (spec §5).

Plumbing only: validate, lay the nn.Linear weights out as head blocks, run the pure step
(``reference.rule.pair_step``) out of place, then write weights and momentum back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cm_triton.dispatch import resolve_options, resolve_primitives
from cm_triton.options import CMOptions
from cm_triton.reference.phases import direction_scale
from cm_triton.reference.primitives import compute_dtype
from cm_triton.reference.rule import pair_step
from cm_triton.schedules import POLAR_EXPRESS_8

__all__ = ["cm_qk", "cm_ov", "row_heads", "col_heads_t", "all_finite"]


def all_finite(tensors: list[Tensor]) -> bool:
    """True when every entry of every tensor is finite: one ``_foreach_norm`` per device and
    one host sync in the common case.

    A 2-norm is finite only if every entry is (NaN and Inf propagate through it), so a finite
    norm settles it, ~20x faster than a max-abs or ``isfinite`` pass on the CPU; a non-finite
    one, which finite entries can also give by overflowing the sum of squares, is checked
    entry by entry.
    """
    if not tensors:
        return True
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for ts in by_device.values():
        if not bool(torch.stack(torch._foreach_norm(ts, 2)).isfinite().all()):
            if not all(bool(torch.isfinite(t).all()) for t in ts):
                return False
    return True


def row_heads(w: Tensor, head_dim: int) -> Tensor:
    """Row blocks of a q/k/v weight as a view: ``(H*dh, d) -> (H, dh, d)``."""
    return w.unflatten(0, (w.shape[0] // head_dim, head_dim))


def col_heads_t(w: Tensor, head_dim: int) -> Tensor:
    """Column blocks of an o weight, transposed, as a view: ``(d, H*dh) -> (H, dh, d)``."""
    return w.unflatten(1, (w.shape[1] // head_dim, head_dim)).permute(1, 2, 0)


def _ranges_overlap(a: Tensor, b: Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:
        lo = t.storage_offset()
        hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
        return lo * t.element_size(), hi * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _validate(
    named: dict[str, Tensor], head_dim: object, kind: str, joint: bool = False
) -> tuple[int, int, int]:
    """Check the six tensors of one pair (spec §6.8); return ``(Hq, Hkv, d)``.

    Meta tensors get the shape, dtype and head checks only (no values to check)."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    names = list(named)
    first = named[names[0]]
    for name in names[1:]:
        t = named[name]
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, but {names[0]} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, but {names[0]} is on {first.device}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    w_p, w_s = names[0], names[1]  # QK: q_w, k_w   OV: v_w, o_w
    if kind == "qk":
        q, k = named["q_w"], named["k_w"]
        heads = {"q_w": q.shape[0], "k_w": k.shape[0]}
        if joint and q.shape[1] != k.shape[1]:
            raise ValueError(
                f"method='joint' stacks q_w and k_w rows under one sign, so they must share "
                f"their input width: {q.shape[1]} != {k.shape[1]}"
            )
        d = min(q.shape[1], k.shape[1])
        hq_name, hkv_name = "q_w", "k_w"
    else:
        v, o = named["v_w"], named["o_w"]
        heads = {"v_w": v.shape[0], "o_w": o.shape[1]}
        if joint and o.shape[0] != v.shape[1]:
            raise ValueError(
                f"method='joint' stacks v_w rows and o_w columns under one sign, so o_w's "
                f"{o.shape[0]} rows must equal v_w's {v.shape[1]} columns"
            )
        d = min(v.shape[1], o.shape[0])
        hq_name, hkv_name = "o_w", "v_w"
    for name, n in heads.items():
        if n % head_dim:
            axis = "columns" if name == "o_w" else "rows"
            raise ValueError(f"head_dim={head_dim} does not divide the {n} {axis} of {name}")
    hq, hkv = heads[hq_name] // head_dim, heads[hkv_name] // head_dim
    if hq == 0 or hkv == 0 or d == 0:
        raise ValueError(f"{w_p} and {w_s} must be non-empty")
    if hq % hkv:
        raise ValueError(
            f"{hq_name} has {hq} heads, not a multiple of the {hkv} KV heads of {hkv_name}"
        )
    for base in (w_p, w_s):
        for prefix in ("grad", "m"):
            other = f"{base[0]}_grad" if prefix == "grad" else f"m_{base[0]}"
            if named[other].shape != named[base].shape:
                raise ValueError(
                    f"{other} has shape {tuple(named[other].shape)}, "
                    f"but {base} has {tuple(named[base].shape)}"
                )
    if first.is_meta:  # shape-only validation (the optimizer's construction): no values
        return hq, hkv, d
    grads = {n: t for n, t in named.items() if not n.startswith("m_") and not n.endswith("_w")}
    if not all_finite(list(grads.values())):
        bad = next(n for n, t in grads.items() if not torch.isfinite(t).all())
        raise ValueError(f"{bad} contains non-finite values (nan or inf)")
    written = [n for n in names if n.endswith("_w") or n.startswith("m_")]
    for name in written:
        t = named[name]
        if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
            raise ValueError(
                f"{name} has overlapping memory (a stride of 0); it is written in place"
            )
    for i, a in enumerate(written):
        for b in written[i + 1 :]:
            if _ranges_overlap(named[a], named[b]):
                raise ValueError(f"{a} and {b} share memory; both are written in place")
    return hq, hkv, d


def _run(
    kind: str,
    named: dict[str, Tensor],
    head_dim: int,
    options: dict,
) -> None:
    opts = CMOptions(**options)
    _validate(named, head_dim, kind, opts.method == "joint")
    device = named[next(iter(named))].device
    prims = resolve_primitives(opts.backend, device)
    opts = resolve_options(opts, device)
    if kind == "qk":
        p_names, s_names, p_view = ("q_w", "q_grad", "m_q"), ("k_w", "k_grad", "m_k"), row_heads
    else:
        p_names, s_names, p_view = ("o_w", "o_grad", "m_o"), ("v_w", "v_grad", "m_v"), col_heads_t
    p_views = [p_view(named[n], head_dim) for n in p_names]
    s_views = [row_heads(named[n], head_dim) for n in s_names]
    dtype = compute_dtype(named[p_names[0]].dtype)
    # A batch of one pair, each factor's heads contiguous (o's columns are a strided view):
    # the optimizer gathers them so, and a batched product rounds by its operands' layout.
    p, gp, mp = (t.to(dtype).contiguous()[None] for t in p_views)
    s, gs, ms = (t.to(dtype).contiguous()[None] for t in s_views)
    with torch.no_grad():
        # The direction's power of two (its fp32 Grams then never overflow or underflow)
        amax = torch._foreach_norm([gp, gs, mp, ms], math.inf)
        scale = direction_scale(*(a.reshape(1) for a in amax))
        new = pair_step(p, s, gp, gs, mp, ms, opts, kind == "ov" and opts.hybrid, prims, scale)
        new = [t[0] for t in new]
        # Commit only a finite result: finite inputs can still give an undefined step when a
        # partner Gram is singular and nothing damps it (C^{-1} does not exist).
        if not all_finite(list(new)):
            raise FloatingPointError(
                f"cm_{kind} produced a non-finite step, so nothing was modified: with "
                f"damping={opts.damping} a zero or rank-deficient partner head has no inverse "
                f"root; use damping > 0"
            )
        # Commit: cast once to the caller's dtype, in place (views write through).
        for view, value in zip((p_views[0], s_views[0], p_views[2], s_views[2]), new):
            view.copy_(value)


def cm_qk(
    q_w: Tensor,
    k_w: Tensor,
    q_grad: Tensor,
    k_grad: Tensor,
    m_q: Tensor,
    m_k: Tensor,
    *,
    head_dim: int,
    eta: float,
    beta: float = 0.95,
    nesterov: bool = False,
    damping: float = 1e-2,
    weight_decay: float = 0.0,
    method: str = "half_split",
    isotropic: bool = False,
    whitening: str = "both",
    connection: str = "none",
    momentum_reproject: bool = False,
    per_mat_renorm: bool = False,
    ns_coefficients=POLAR_EXPRESS_8,
    ns_dtype: torch.dtype | None = None,
    ns_method: str | None = None,
    ns_restart: int = 3,
    inv_root: str = "auto",
    backend: str = "auto",
    gqa_budget: str = "group",
) -> None:
    """Compositional Muon step on a query/key pair, in place (spec §4.1).

    ``q_w (Hq*dh, d)``, ``k_w (Hkv*dh, d)`` (nn.Linear layout, bias-free); gradients and
    momentum buffers have the weights' shapes. ``Hkv = k_w.shape[0] // head_dim``;
    ``Hq`` must be a multiple of it (GQA). Updates ``q_w, k_w, m_q, m_k``; returns None.
    """
    options = {k: v for k, v in locals().items() if k not in _TENSOR_ARGS | {"head_dim"}}
    named = {"q_w": q_w, "k_w": k_w, "q_grad": q_grad, "k_grad": k_grad, "m_q": m_q, "m_k": m_k}
    _run("qk", named, head_dim, options)


def cm_ov(
    v_w: Tensor,
    o_w: Tensor,
    v_grad: Tensor,
    o_grad: Tensor,
    m_v: Tensor,
    m_o: Tensor,
    *,
    head_dim: int,
    eta: float,
    beta: float = 0.95,
    nesterov: bool = False,
    damping: float = 1e-2,
    weight_decay: float = 0.0,
    method: str = "half_split",
    isotropic: bool = False,
    hybrid: bool = True,
    whitening: str = "both",
    connection: str = "none",
    momentum_reproject: bool = False,
    per_mat_renorm: bool = False,
    ns_coefficients=POLAR_EXPRESS_8,
    ns_dtype: torch.dtype | None = None,
    ns_method: str | None = None,
    ns_restart: int = 3,
    inv_root: str = "auto",
    backend: str = "auto",
    gqa_budget: str = "group",
) -> None:
    """Compositional Muon step on a value/output pair, in place (spec §4.2).

    ``v_w (Hkv*dh, d)``, ``o_w (d, Hq*dh)`` (nn.Linear layout, bias-free); gradients and
    momentum buffers have the weights' shapes. ``hybrid=True``: one sign over all of ``o_w``.
    Updates ``v_w, o_w, m_v, m_o``; returns None.
    """
    options = {k: v for k, v in locals().items() if k not in _TENSOR_ARGS | {"head_dim"}}
    named = {"v_w": v_w, "o_w": o_w, "v_grad": v_grad, "o_grad": o_grad, "m_v": m_v, "m_o": m_o}
    _run("ov", named, head_dim, options)


_TENSOR_ARGS = {"q_w", "k_w", "q_grad", "k_grad", "m_q", "m_k"} | {
    "v_w",
    "o_w",
    "v_grad",
    "o_grad",
    "m_v",
    "m_o",
}
