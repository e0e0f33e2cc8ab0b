"""Model-wide batching of CompositionalMuon's step (plumbing, no math).

Param groups of equal layout, shapes, dtype, device and options are stepped as one batch:
their parameters, gradients and momentum buffers are stacked (one op per parameter position),
the rule runs once on ``(L, H, dh, d)`` head views of the stacks, and the results are written
back with ``torch._foreach_copy_``. So the number of ops a step dispatches grows with the
number of *distinct shapes*, not with the number of layers (that is what a GPU's launch
overhead sees; ``tests/test_batching.py`` counts them). Muon matrices of equal shape share one
batched sign (3-D parameters are batches of matrices); AdamW runs on ``torch._foreach_*`` ops.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cm_triton.dispatch import resolve_options, resolve_primitives
from cm_triton.functional import all_finite
from cm_triton.layouts import Heads, Layout, get_layout
from cm_triton.options import CMOptions
from cm_triton.reference.muon import muon_direction, muon_shape_factor
from cm_triton.reference.rule import pair_step

# How a Muon group's parameters are matrices (``"_t"``: stored (in, out), as GPT-2's Conv1D
# and GPT-OSS's experts; Muon's shape factor uses the mathematical (out, in) shape).
MUON_SHAPES = ("matrix", "matrix_t", "experts", "experts_t")

__all__ = [
    "ATTENTION_KINDS",
    "CM_KEYS",
    "MUON_SHAPES",
    "group_layout",
    "group_options",
    "check_group",
    "Step",
]

ATTENTION_KINDS = ("qk", "ov", "mha", "attention")
CM_KEYS = (
    "beta", "nesterov", "damping", "method", "isotropic", "hybrid", "whitening", "connection",
    "momentum_reproject", "per_mat_renorm", "ns_coefficients", "ns_dtype", "ns_method",
    "ns_restart", "inv_root", "backend",
)  # fmt: skip


# -- reading a group ----------------------------------------------------------------------
def _heads_of(n: int, head_dim: int, what: str) -> int:
    if n % head_dim:
        raise ValueError(f"head_dim={head_dim} does not divide the {n} {what}")
    return n // head_dim


def group_layout(group: dict) -> Layout:
    """The layout of an attention param group (kinds ``"qk"``, ``"ov"``, ``"mha"``,
    ``"attention"``); head counts come from the group keys or, for the first three, from
    the shapes and ``head_dim``."""
    kind, dh, params = group["kind"], group.get("head_dim"), group["params"]
    if isinstance(dh, bool) or not isinstance(dh, int) or dh <= 0:
        raise ValueError(f"head_dim must be a positive int, got {dh!r}")
    if kind == "qk":
        hq = _heads_of(params[0].shape[0], dh, "rows of q_w")
        hkv = _heads_of(params[1].shape[0], dh, "rows of k_w")
        name = "qk"
    elif kind == "ov":
        hkv = _heads_of(params[0].shape[0], dh, "rows of v_w")
        hq = _heads_of(params[1].shape[-1], dh, "columns of o_w")
        name = "ov"
    elif kind == "mha":
        e = params[0].shape[0]
        if e % 3:
            raise ValueError(f"an 'mha' in_proj_weight has {e} rows, not 3 x E")
        hq = hkv = _heads_of(e // 3, dh, "rows of each of in_proj_weight's q, k, v")
        name = "qkv_blocks"
    else:
        name = group.get("layout")
        hq, hkv = group.get("num_heads"), group.get("num_kv_heads")
        for key, n in (("num_heads", hq), ("num_kv_heads", hkv)):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"an 'attention' group needs a positive int {key!r}, got {n!r}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of the {hkv} KV heads")
    args = group.get("layout_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"'layout_args' must be a dict, got {args!r}")
    return get_layout(name, hq, hkv, dh, **args)


def group_options(group: dict, **override: Any) -> CMOptions:
    """The CM options of a group (its lr is eta), validated."""
    kw = {k: group[k] for k in CM_KEYS if k in group}
    return CMOptions(eta=group["lr"], weight_decay=group["weight_decay"], **(kw | override))


def check_group(group: dict, where: str) -> None:
    """Shape-check an attention group without values (at optimizer construction)."""
    try:
        layout = group_layout(group)
        opts = group_options(group)
        shapes = [p.shape for p in group["params"]]
        layout.check(shapes, "layout")
        metas = [torch.empty(s, device="meta") for s in shapes]
        for pair in layout.pairs:
            p, s = pair.p.heads(metas[pair.p.param]), pair.s.heads(metas[pair.s.param])
            if p.shape[-2] != s.shape[-2]:
                raise ValueError(f"{pair.name}: head sizes differ ({p.shape[-2]} vs {s.shape[-2]})")
            if p.shape[-3] % s.shape[-3]:
                raise ValueError(
                    f"{pair.name}: {p.shape[-3]} query heads are not a multiple of the "
                    f"{s.shape[-3]} shared heads"
                )
            if opts.method == "joint" and p.shape[-1] != s.shape[-1]:
                raise ValueError(
                    f"{pair.name}: method='joint' stacks both factors' rows under one sign, so "
                    f"their widths must match ({p.shape[-1]} vs {s.shape[-1]})"
                )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# -- the batched step ---------------------------------------------------------------------
def _stack(ts: list[Tensor]) -> Tensor:
    return torch.stack(ts)


def _quick_finite(stack: Tensor) -> Tensor:
    """``(L, ...) -> (L,)``: True where a finite 2-norm proves every entry finite (NaN and Inf
    propagate through it; ~20x cheaper than a max-abs pass on the CPU). False may also be an
    overflow of finite entries: ``_exact_finite`` settles those."""
    return torch.linalg.vector_norm(stack.flatten(1), 2, dim=1).isfinite()


def _exact_finite(stack: Tensor) -> Tensor:
    return torch.isfinite(stack).flatten(1).all(1)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that writes through), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@dataclass
class _Batch:
    """Groups (or matrices) stepped together, with their stacked (local) gradients."""

    key: tuple
    members: list[Any]  # attention: param groups; muon: (group, parameter)
    grads: list[Tensor] = field(default_factory=list)  # one (L, ...) stack per position
    finite: Tensor | None = None  # (L,) after the finite check

    @property
    def params(self) -> list[list[Tensor]]:
        """Parameters per position: ``params[i][l]``."""
        if self.key[0] == "attention":
            return [list(ps) for ps in zip(*(g["params"] for g in self.members))]
        return [[p for _, p in self.members]]


def compute_attention(
    layout: Layout, weights: list[Tensor], grads: list[Tensor], moms: list[Tensor],
    group: dict, opts: CMOptions, prims,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """The rule on stacked parameters: ``weights[i] (L, *shape_i)`` (and grads, momentum) ->
    new weight and momentum stacks, each pair read and written through ``layout``'s views."""
    cdtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    new_w = [w.clone() for w in weights]
    new_m = [m.clone() for m in moms]

    def read(role: Heads, stacks: list[Tensor]) -> Tensor:
        return role.heads(stacks[role.param]).to(cdtype)

    for pair in layout.pairs:
        pr, sr = pair.p, pair.s
        out = pair_step(
            read(pr, weights), read(sr, weights), read(pr, grads), read(sr, grads),
            read(pr, moms), read(sr, moms), opts, pair.kind == "ov" and opts.hybrid, prims,
        )  # fmt: skip
        for role, stacks, value in ((pr, new_w, out[0]), (sr, new_w, out[1]),
                                    (pr, new_m, out[2]), (sr, new_m, out[3])):  # fmt: skip
            role.write(stacks[role.param], value)
    for extra in layout.muon:
        w, g, m = (extra.heads(x[extra.param]) for x in (weights, grads, moms))
        w_new, m_new = _muon_rows(w, g, m, group, opts, prims)
        extra.write(new_w[extra.param], w_new)
        extra.write(new_m[extra.param], m_new)
    return new_w, new_m


def compute_muon(w: Tensor, g: Tensor, m: Tensor, group: dict, opts: CMOptions, prims):
    """Muon on stacked parameters ``(L, *shape)`` -> ``(new w, new m)``, by the group's
    ``"shape"``: ``"matrix"``: one matrix ``(out, in * rest)`` per parameter (a conv weight is
    flattened); ``"experts"``: a 3-D parameter is a batch of matrices, one sign each."""
    shape = group.get("shape", "matrix")
    mats = (lambda x: x.flatten(2)) if shape.startswith("matrix") else (lambda x: x)
    w_new, m_new = _muon_math(mats(w), mats(g), mats(m), group, opts, prims,
                              shape.endswith("_t"))  # fmt: skip
    return w_new.view(w.shape), m_new.view(m.shape)


class Step:
    """One ``CompositionalMuon.step()``: gather, check, compute, write back.

    ``buffer(p)`` returns the momentum buffer of ``p`` (created on first use); ``state`` is
    the optimizer's per-parameter state. With DTensor parameters (FSDP2), ``comm`` is the
    mesh's communicator (``cm_triton.distributed``): every decision is then agreed on by all
    ranks, and each batch is computed by a distributed plan.
    """

    def __init__(self, state: dict, buffer: Callable[[Tensor], Tensor], comm=None) -> None:
        self.state = state
        self.buffer = buffer
        self.comm = comm

    # gathering --------------------------------------------------------------------------
    def attention_batches(self, groups: Iterable[dict]) -> list[_Batch]:
        batches: dict[tuple, _Batch] = {}
        for group in groups:
            params = group["params"]
            if any(p.grad is None for p in params):  # a group is stepped whole or not at all
                continue
            opts = resolve_options(group_options(group), params[0].device)
            shape_key = tuple(group.get(k) for k in ("kind", "layout", "head_dim", "num_heads",
                                                      "num_kv_heads"))  # fmt: skip
            shape_key += tuple(sorted((group.get("layout_args") or {}).items()))
            key = ("attention", shape_key, tuple(p.shape for p in params), params[0].dtype,
                   params[0].device, opts, group["nonfinite"])  # fmt: skip
            batches.setdefault(key, _Batch(key, [])).members.append(group)
        out = list(batches.values())
        for b in out:
            b.grads = [_stack([local(p.grad) for p in ps]) for ps in b.params]
        return out

    def muon_batches(self, groups: Iterable[dict]) -> list[_Batch]:
        batches: dict[tuple, _Batch] = {}
        for group in groups:
            gopts = {k: group.get(k) for k in ("ns_coefficients", "ns_dtype", "ns_method",
                                                "ns_restart", "backend")}  # fmt: skip
            okey = (
                group["lr"],
                group["weight_decay"],
                group["momentum"],
                group["nonfinite"],
                group.get("shape", "matrix"),
                tuple(sorted(gopts.items(), key=str)),
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                key = ("muon", tuple(p.shape), p.dtype, p.device, okey)
                batches.setdefault(key, _Batch(key, [])).members.append((group, p))
        out = list(batches.values())
        for b in out:
            b.grads = [_stack([local(p.grad) for _, p in b.members])]
        return out

    # checks -----------------------------------------------------------------------------
    def agree(self, flags: Tensor) -> Tensor:
        """All ranks' logical AND of ``flags`` (a bool vector): one collective, or none."""
        return flags if self.comm is None else self.comm.all_true(flags)

    def check_finite(self, batches: list[_Batch], others: list[Tensor]) -> bool:
        """Fill each batch's ``finite`` flags (agreed by all ranks) and return whether every
        gradient (``others`` too) is finite: one host sync, one collective when sharded."""
        flags = [torch.stack([_quick_finite(g) for g in b.grads]).all(0) for b in batches]
        quick = [f.cpu() for f in flags]  # one sync per device in the common case
        if not all(bool(f.all()) for f in quick):
            quick = [torch.stack([_exact_finite(g) for g in b.grads]).all(0).cpu() for b in batches]
        flags = quick + [torch.tensor([all_finite([local(t) for t in others])])]
        agreed = self.agree(torch.cat(flags))
        for b, f in zip(batches, agreed[:-1].split([len(f) for f in flags[:-1]])):
            b.finite = f
        return bool(agreed.all())

    def results_finite(self, values: list[Tensor]) -> bool:
        """Whether every new value is finite, agreed by all ranks."""
        return bool(self.agree(torch.tensor([all_finite(values)])).all())

    def _count_skip(self, p: Tensor) -> None:
        st = self.state[p]
        st["nonfinite_skips"] = st.get("nonfinite_skips", 0) + 1

    def _keep_finite(self, b: _Batch, first_param: Callable[[Any], Tensor]) -> _Batch | None:
        """ "skip" mode: drop the members with a non-finite gradient and count them."""
        if b.finite is None or bool(b.finite.all()):
            return b
        keep = b.finite.nonzero().flatten().tolist()
        for i in set(range(len(b.members))) - set(keep):
            self._count_skip(first_param(b.members[i]))
        if not keep:
            return None
        idx = torch.tensor(keep, device=b.grads[0].device)
        grads = [g.index_select(0, idx) for g in b.grads]
        return _Batch(b.key, [b.members[i] for i in keep], grads)

    # computing --------------------------------------------------------------------------
    def _stacks(self, b: _Batch) -> tuple[list, list, list[Tensor], list[Tensor]]:
        """Local weight and momentum targets per position, and their stacks."""
        w_loc = [[local(p) for p in ps] for ps in b.params]
        m_loc = [[local(self.buffer(p)) for p in ps] for ps in b.params]
        return w_loc, m_loc, [_stack(x) for x in w_loc], [_stack(x) for x in m_loc]

    def run_attention(self, b: _Batch) -> list[tuple[list[Tensor], Tensor]]:
        """Compute one attention batch; return ``(targets, new stacked values)`` to commit."""
        b = self._keep_finite(b, lambda g: g["params"][0])
        if b is None:
            return []
        group0 = b.members[0]
        w_loc, m_loc, weights, moms = self._stacks(b)
        opts = resolve_options(group_options(group0), weights[0].device)
        prims = resolve_primitives(opts.backend, weights[0].device)
        if self.comm is None:
            new_w, new_m = compute_attention(group_layout(group0), weights, b.grads, moms,
                                             group0, opts, prims)  # fmt: skip
        else:
            new_w, new_m = self.comm.attention(b, weights, b.grads, moms, opts, prims)
        return list(zip(w_loc, new_w)) + list(zip(m_loc, new_m))

    def run_muon(self, b: _Batch) -> list[tuple[list[Tensor], Tensor]]:
        b = self._keep_finite(b, lambda m: m[1])
        if b is None:
            return []
        group = b.members[0][0]
        (w_loc,), (m_loc,), (w,), (m,) = self._stacks(b)
        prims = resolve_primitives(group.get("backend", "auto"), w.device)
        opts = resolve_options(group_options(group), w.device)
        if self.comm is None:
            w_new, m_new = compute_muon(w, b.grads[0], m, group, opts, prims)
        else:
            w_new, m_new = self.comm.muon(b, w, b.grads[0], m, group, opts, prims)
        return [(w_loc, w_new), (m_loc, m_new)]


def _muon_math(w, g, m, group, opts, prims, transposed: bool):
    """Muon on ``(B, ..., rows, cols)`` stacks (a 3-D parameter is a batch of matrices):
    nesterov momentum, one msign per matrix, Muon's shape factor of the mathematical
    ``(out, in)`` shape (``transposed``: stored ``(in, out)``, as GPT-2's ``Conv1D``)."""
    mom = group["momentum"]
    m_new = m * mom + g
    update = g + mom * m_new
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    flat = update.to(cdt).reshape(-1, *update.shape[-2:])
    o = muon_direction(flat, opts.ns_coefficients, opts.ns_dtype, opts.ns_method,
                       opts.ns_restart, prims.msign).view(update.shape)  # fmt: skip
    rows, cols = update.shape[-2:]
    scale = muon_shape_factor(cols, rows) if transposed else muon_shape_factor(rows, cols)
    lr, wd = group["lr"], group["weight_decay"]
    return (w * (1 - lr * wd) - (lr * scale) * o).to(w.dtype), m_new


def _muon_rows(w, g, m, group, opts, prims):
    """Muon extras of an attention layout (e.g. gate rows): ``(L, H, dh, d)`` heads -> one
    ``(H*dh, d)`` matrix per batch entry."""
    shape = w.shape

    def flat(x: Tensor) -> Tensor:
        return x.reshape(shape[0], -1, shape[-1])

    w_new, m_new = _muon_math(flat(w), flat(g), flat(m), group, opts, prims, False)
    return w_new.view(shape), m_new.view(shape)


def commit(writes: list[tuple[list[Tensor], Tensor]]) -> None:
    """Write each new stack into its targets: one ``_foreach_copy_`` per stack."""
    for targets, value in writes:
        torch._foreach_copy_(targets, list(value.to(targets[0].dtype).unbind(0)))


def adamw_step(state: dict, group: dict, params: list[Tensor]) -> None:
    """Decoupled AdamW (Loshchilov & Hutter), bias-corrected, on ``torch._foreach_*`` ops;
    moments and the step count in ``state`` (per parameter, as ``torch.optim.AdamW``)."""
    by_dev: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        by_dev[(p.device, p.dtype)].append(p)
    b1, b2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    for dtensors in by_dev.values():
        for p in dtensors:
            st = state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["nonfinite_skips"] = 0
        params = [local(p) for p in dtensors]  # AdamW is elementwise: shards step alone
        grads = [local(p.grad) for p in dtensors]
        steps = [state[p]["step"] for p in dtensors]
        avg = [local(state[p]["exp_avg"]) for p in dtensors]
        sq = [local(state[p]["exp_avg_sq"]) for p in dtensors]
        torch._foreach_add_(steps, 1)
        t = torch.stack(steps).tolist()
        torch._foreach_lerp_(avg, grads, 1 - b1)
        torch._foreach_mul_(sq, b2)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - b2)
        denom = torch._foreach_div(sq, [1 - b2**ti for ti in t])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, avg, denom, [-lr / (1 - b1**ti) for ti in t])
