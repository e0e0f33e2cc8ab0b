"""CompositionalMuon's step: a plan built once, then gather, compute, check, commit (no math).

``build_plan`` reads the param groups once per structure (the groups, their parameters'
shapes, dtypes and devices, which have gradients, the options, and which groups share a
learning rate) and makes a ``Plan``: batches of equal layout, shapes and options, each with
its options resolved for the device and its primitives chosen. ``run_step`` runs a plan:

- gather: on the kernels' backend (one process, plain tensors) the weights and gradients are
  read where they live: a ``tables.LayerRows`` per parameter position, which the kernels read
  through a table of offsets (a phase they do not take sees the stack, formed then); otherwise
  one ``torch.stack`` per position. The momentum of plain-tensor parameters *is* a stack: each
  ``state[p]["momentum_buffer"]`` is a view of the batch's momentum stack, so it is neither
  stacked nor copied back;
- compute: the rule once on ``(L, H, dh, d)`` head views of the stacks (or a distributed plan);
- check: per batch member, whether its gradients and results are finite, on the device.
  ``nonfinite="skip"`` keeps a member's old weights and momentum where they are not (a
  ``torch.where``) and counts it in a device tensor: no host read. ``"raise"`` reads one flag
  for the whole step, before anything is written;
- commit: one ``torch._foreach_copy_`` per weight position; the new momentum stacks become the
  state (views again). AdamW runs on ``torch._foreach_*`` ops with its step counts on the
  device.

So the number of ops a step dispatches grows with the number of *distinct shapes*, not with
the number of layers (``tests/test_batching.py``), and a step's copies are the stacks of the
weights and gradients (none on the kernels' backend) and the weights' write-back
(``tests/test_step_costs.py`` counts them).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cm_triton.dispatch import resolve_options, resolve_primitives
from cm_triton.groups import ATTENTION_KINDS, CM_KEYS, group_layout, group_options
from cm_triton.layouts import Heads, Layout
from cm_triton.options import CMOptions
from cm_triton.placement import placement_key
from cm_triton.reference.adamw import adamw_update
from cm_triton.reference.muon import muon_update
from cm_triton.reference.phases import direction_scale
from cm_triton.reference.primitives import compute_dtype
from cm_triton.reference.rule import Primitives, pair_step
from cm_triton.schedules import MUON_COEFFICIENTS
from cm_triton.tables import LayerRows, OffsetTable, layer_rows

__all__ = [
    "Plan",
    "build_plan",
    "plan_key",
    "run_step",
    "compute_attention",
    "compute_muon",
    "local",
]


# -- the plan ------------------------------------------------------------------------------
def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that writes through), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _is_plain(t: Tensor) -> bool:
    return not callable(getattr(t, "to_local", None))


@dataclass
class Batch:
    """Equal-shaped work stepped together: attention groups of one layout, shapes and options
    (``members``: the groups), or one Muon group's matrices of one shape (``members``:
    ``(group, parameter)``)."""

    kind: str  # "attention" | "muon"
    members: list[Any]
    params: list[list[Tensor]]  # per position, per member: params[i][l]
    base: CMOptions  # resolved for the device; eta and weight_decay as at planning
    prims: Primitives
    layout: Layout | None
    nonfinite: str
    columns: list[bool] = field(default_factory=list)  # per position: heads are its columns
    momentum: list[Tensor] | None = None  # plain tensors: the momentum stacks (state views)
    m_amax: list[Tensor] | None = None  # per position (L,): the momentum's largest magnitude
    skips: Tensor | None = None  # (L,) int64 on the device: skipped steps, state views
    # The kernels' layer offsets of each operand read in place: (position, "w" | "g") -> table
    tables: dict[tuple[int, str], OffsetTable] = field(default_factory=dict)
    _opts: tuple = ()  # (lr, wd, options) of the last step

    def table(self, position: int, operand: str) -> OffsetTable:
        """The plan's offsets table of one operand (made on first use, then kept)."""
        return self.tables.setdefault((position, operand), OffsetTable())

    @property
    def group(self) -> dict:
        """The group whose keys (lr, momentum, shape, ...) hold for the whole batch."""
        return self.members[0] if self.kind == "attention" else self.members[0][0]

    @property
    def counters(self) -> list[Tensor]:
        """Each member's parameter that counts its skipped steps."""
        if self.kind == "attention":
            return [g["params"][0] for g in self.members]
        return [p for _, p in self.members]

    def options(self) -> CMOptions:
        """The batch's options with the group's current lr and weight decay (schedulers
        change them between steps): replaced only when they changed."""
        lr, wd = self.group["lr"], self.group["weight_decay"]
        if self._opts[:2] != (lr, wd):
            self._opts = (lr, wd, dataclasses.replace(self.base, eta=lr, weight_decay=wd))
        return self._opts[2]


@dataclass
class Plan:
    """What a step runs: built by ``build_plan``, rebuilt when ``plan_key`` changes."""

    key: tuple
    batches: list[Batch]
    adamw: list[tuple[dict, list[Tensor]]]  # per AdamW group and (device, dtype): its params
    raises: bool  # some group has nonfinite="raise": the step reads one flag
    in_place: bool = False  # capturable: momentum written into its stacks, never replaced


# Which CM keys fix a batch (all but the per-step ones, read at every step).
_PLAN_KEYS = CM_KEYS + ("nonfinite", "momentum", "shape", "layout",
                                          "head_dim", "num_heads", "num_kv_heads")  # fmt: skip


def plan_key(groups: list[dict]) -> tuple:
    """What a plan depends on: per group its kind, options and parameters (shape, dtype,
    device, whether it has a gradient), and which groups share (lr, weight_decay)."""
    rates: dict[tuple, int] = {}
    key = []
    for g in groups:
        rate = rates.setdefault((g["lr"], g["weight_decay"]), len(rates))
        opts = tuple(g.get(k) for k in _PLAN_KEYS) + (g.get("layout_args"),)
        params = tuple((p.shape, p.dtype, p.device, p.grad is None, placement_key(p))
                       for p in g["params"])  # fmt: skip
        key.append((g["kind"], rate, opts, params))
    return tuple(key)


def _resolve(group: dict, device: torch.device) -> tuple[CMOptions, Primitives]:
    opts = resolve_options(group_options(group), device)
    return opts, resolve_primitives(opts.backend, device)


def build_plan(groups: list[dict], state: dict, in_place: bool = False) -> Plan:
    """Batch the groups' work (see the module doc). Momentum stacks are adopted from the
    state where it has buffers (after a load), else made at the first commit. ``in_place``:
    every later commit writes the momentum into those stacks (their addresses never change,
    as a CUDA graph's replay needs) instead of making the new stacks the state."""
    key = plan_key(groups)
    by_key: dict[tuple, Batch] = {}
    rates = {id(g): i for i, g in enumerate(groups)}
    for g in groups:
        params = g["params"]
        if g["kind"] in ATTENTION_KINDS:
            if any(p.grad is None for p in params):  # a group is stepped whole or not at all
                continue
            opts, prims = _resolve(g, params[0].device)
            shape_key = tuple(g.get(k) for k in ("kind", "layout", "head_dim", "num_heads",
                                                  "num_kv_heads"))  # fmt: skip
            shape_key += tuple(sorted((g.get("layout_args") or {}).items()))
            rate = (g["lr"], g["weight_decay"])
            bkey = ("attention", shape_key, tuple(p.shape for p in params), params[0].dtype,
                    params[0].device, dataclasses.replace(opts, eta=0.0, weight_decay=0.0),
                    rate, g["nonfinite"], tuple(placement_key(p) for p in params))  # fmt: skip
            if bkey not in by_key:
                by_key[bkey] = Batch("attention", [], [[] for _ in params], opts, prims,
                                     group_layout(g), g["nonfinite"])  # fmt: skip
            b = by_key[bkey]
            b.members.append(g)
            for i, p in enumerate(params):
                b.params[i].append(p)
        elif g["kind"] == "muon":
            for p in params:
                if p.grad is None:
                    continue
                bkey = ("muon", rates[id(g)], tuple(p.shape), p.dtype, p.device,
                        placement_key(p))  # fmt: skip
                if bkey not in by_key:
                    opts, prims = _resolve(g, p.device)
                    by_key[bkey] = Batch("muon", [], [[]], opts, prims, None, g["nonfinite"])
                by_key[bkey].members.append((g, p))
                by_key[bkey].params[0].append(p)
    batches = list(by_key.values())
    for b in batches:
        b.columns = _column_positions(b)
        _adopt_state(b, state)
    adamw = []  # which parameters have gradients is part of the key: grouped once here
    for g in groups:
        if g["kind"] == "adamw":
            by_dev: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in g["params"]:
                if p.grad is not None:
                    by_dev[(p.device, p.dtype)].append(p)
            adamw += [(g, ps) for ps in by_dev.values()]
    raises = any(g["nonfinite"] == "raise" for g in groups)
    return Plan(key, batches, adamw, raises, in_place)


def _column_positions(b: Batch) -> list[bool]:
    """Per position, whether its heads are the parameter's columns (o_w of separate
    linears): such stacks are gathered transposed, so that the heads are contiguous for the
    batched products (a strided view would be copied by every matmul)."""
    if b.layout is None:
        return [False] * len(b.params)
    axes = [{h.axis for _, h in b.layout.entries() if h.param == i} for i in range(len(b.params))]
    return [a == {1} for a in axes]


def _stack(ts: list[Tensor], columns: bool) -> Tensor:
    """``(L, R, C)`` from L ``(R, C)`` tensors; ``columns``: stored as ``(L, C, R)`` (its
    ``.mT``). Either way one copy of the tensors, and a number of ops that does not grow
    with L (no per-tensor transposes)."""
    if not columns:
        return torch.stack(ts)
    r, c = ts[0].shape[-2:]
    out = torch.empty((len(ts), c, r), dtype=ts[0].dtype, device=ts[0].device).mT
    torch._foreach_copy_(list(out.unbind(0)), ts)
    return out


def _adopt_state(b: Batch, state: dict) -> None:
    """Plain tensors: momentum stacks from the state's buffers, if every member has one (a
    new plan after a load, or after the groups changed); skip counts likewise."""
    params = b.params
    if not all(_is_plain(p) for ps in params for p in ps):
        return
    skips = [state.get(p, {}).get("nonfinite_skips", 0) for p in b.counters]
    b.skips = torch.tensor([int(s) for s in skips], dtype=torch.int64, device=params[0][0].device)
    if all("momentum_buffer" in state.get(p, {}) for ps in params for p in ps):
        b.momentum = [_stack([state[p]["momentum_buffer"] for p in ps], c)
                      for ps, c in zip(params, b.columns)]  # fmt: skip
        _point_state(b, state)


def _point_state(b: Batch, state: dict) -> None:
    """Make every member's state hold views of the batch's momentum stacks and skip counts."""
    for ps, stack in zip(b.params, b.momentum):
        for p, view in zip(ps, stack.unbind(0)):
            st = state[p]
            st["momentum_buffer"] = view
            st.setdefault("nonfinite_skips", 0)
    for p, view in zip(b.counters, b.skips.unbind(0)):
        state[p]["nonfinite_skips"] = view


# -- computing a batch ----------------------------------------------------------------------
def _assemble(parts: list[tuple[Heads, Tensor]], like: Tensor) -> Tensor:
    """One position's new stack from its heads' values: a view of the one value when a single
    entry covers the whole head axis (q, k, v, o of separate linears), else written into a
    new tensor."""
    if len(parts) == 1 and parts[0][0].whole:
        h, value = parts[0]
        return h.unview(value).view(like.shape)
    out = torch.empty_like(like)
    for h, value in parts:
        h.write(out, value)
    return out


def compute_attention(
    layout: Layout, weights: list[Tensor], grads: list[Tensor], moms: list[Tensor],
    group: dict, opts: CMOptions, prims, amax: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """The rule on stacked parameters: ``weights[i] (L, *shape_i)`` (and grads, momentum) ->
    new weight and momentum stacks, each pair read and written through ``layout``'s views.
    ``amax[i] (L,)``: the largest magnitude of position i's gradient and momentum, from which
    each pair's direction is scaled by a power of two (``phases.direction_scale``; None: not
    scaled). Nothing is written in place."""
    cdtype = compute_dtype(weights[0].dtype)
    new_w: dict[int, list] = defaultdict(list)
    new_m: dict[int, list] = defaultdict(list)

    def read(role: Heads, stacks: list[Tensor]) -> Tensor:
        # Contiguous heads whatever the stacks' layout (a batched product rounds by its
        # operands' layout): the same bits from the optimizer's column-gathered stacks (no
        # copy here) as from a distributed plan's gathered ones.
        return role.heads(stacks[role.param]).to(cdtype).contiguous()

    def scale(*params: int) -> Tensor | None:
        return None if amax is None else direction_scale(*(amax[i] for i in params))

    for pair in layout.pairs:
        pr, sr = pair.p, pair.s
        out = pair_step(
            read(pr, weights), read(sr, weights), read(pr, grads), read(sr, grads),
            read(pr, moms), read(sr, moms), opts, pair.kind == "ov" and opts.hybrid, prims,
            scale(pr.param, sr.param),
        )  # fmt: skip
        for role, parts, value in ((pr, new_w, out[0]), (sr, new_w, out[1]),
                                   (pr, new_m, out[2]), (sr, new_m, out[3])):  # fmt: skip
            parts[role.param].append((role, value))
    for extra in layout.muon:
        w, g, m = (extra.heads(x[extra.param]) for x in (weights, grads, moms))
        w_new, m_new = _muon_rows(w, g, m, group, opts, prims, scale(extra.param))
        new_w[extra.param].append((extra, w_new))
        new_m[extra.param].append((extra, m_new))
    return ([_assemble(new_w[i], w) for i, w in enumerate(weights)],
            [_assemble(new_m[i], m) for i, m in enumerate(moms)])  # fmt: skip


def compute_muon(w: Tensor, g: Tensor, m: Tensor, group: dict, opts: CMOptions, prims,
                 amax: Tensor | None = None):  # fmt: skip
    """Muon on stacked parameters ``(L, *shape)`` -> ``(new w, new m)``, by the group's
    ``"shape"``: ``"matrix"``: one matrix ``(out, in * rest)`` per parameter (a conv weight is
    flattened); ``"experts"``: a 3-D parameter is a batch of matrices, one sign each.
    ``amax (L,)``: each entry's largest gradient or momentum magnitude (its update's power of
    two, ``phases.direction_scale``; None: not scaled)."""
    shape = group.get("shape", "matrix")
    mats = (lambda x: x.flatten(2)) if shape.startswith("matrix") else (lambda x: x)
    scale = None if amax is None else direction_scale(amax)
    w_new, m_new = _muon(mats(w), mats(g), mats(m), group, opts, prims, shape.endswith("_t"),
                         scale)  # fmt: skip
    return w_new.view(w.shape), m_new.view(m.shape)


def _muon(w, g, m, group, opts: CMOptions, prims, transposed: bool, scale=None):
    # On the kernels' backend a Gram-form matrix steps through the CM legs' stream and apply
    # passes (reading the layers in place); the reference keeps Muon's own sign, which the
    # distributed owner plan shares bit for bit.
    return muon_update(w, g, m, lr=group["lr"], weight_decay=group["weight_decay"],
                       momentum=group["momentum"], coefficients=opts.ns_coefficients,
                       dtype=opts.ns_dtype, method=opts.ns_method, restart=opts.ns_restart,
                       transposed=transposed, msign_fn=prims.msign,
                       ops=prims.phases if prims.in_place else None, scale=scale)  # fmt: skip


def _muon_rows(w, g, m, group, opts, prims, scale=None):
    """Muon extras of an attention layout (e.g. gate rows, MLA's latent rows): ``(L, H, dh,
    d)`` heads -> one ``(H*dh, d)`` matrix per batch entry, on the Muon groups' schedule
    unless the group names one for all its parts."""
    shape = w.shape
    if "ns_coefficients" not in group:
        opts = dataclasses.replace(opts, ns_coefficients=MUON_COEFFICIENTS)

    def flat(x: Tensor) -> Tensor:
        return x.reshape(shape[0], -1, shape[-1])

    w_new, m_new = _muon(flat(w), flat(g), flat(m), group, opts, prims, False, scale)
    return w_new.view(shape), m_new.view(shape)


# -- running a step ------------------------------------------------------------------------
def _quick_finite(stack: Tensor) -> Tensor:
    """``(L, ...) -> (L,)``: True where a finite 2-norm proves every entry finite (NaN and Inf
    propagate through it; ~20x cheaper than a max-abs pass on the CPU). False may also be an
    overflow of finite entries: ``_exact_finite`` settles those."""
    if isinstance(stack, LayerRows):  # each layer where it lives
        return torch.stack(torch._foreach_norm(stack.layers, 2)).isfinite()
    dims = tuple(range(1, stack.dim()))  # not flatten(1): a strided stack would be copied
    return torch.linalg.vector_norm(stack, 2, dim=dims).isfinite()


def _exact_finite(stack: Tensor) -> Tensor:
    return torch.isfinite(stack).flatten(1).all(1)


def _amax(stack: Tensor) -> Tensor:
    """``(L, ...) -> (L,)`` float32: each entry's largest magnitude (inf or NaN where an entry
    is not finite): the direction's power of two (``phases.direction_scale``) and an exact
    finiteness check in one pass (a 2-norm can overflow on finite entries)."""
    cdtype = compute_dtype(stack.dtype)  # exact: a maximum of stored values
    if isinstance(stack, LayerRows):  # each layer where it lives
        return torch.stack(torch._foreach_norm(stack.layers, math.inf)).to(cdtype)
    dims = tuple(range(1, stack.dim()))  # not flatten(1): a strided stack would be copied
    return torch.linalg.vector_norm(stack, math.inf, dim=dims).to(cdtype)


@dataclass
class _Gathered:
    batch: Batch
    weights: list[Tensor]
    grads: list[Tensor]
    moms: list[Tensor]
    amax: list[Tensor]  # per position (L,): the largest |gradient| or |momentum| entry
    m_amax: list[Tensor]  # per position (L,): the momentum's largest magnitude
    grads_ok: Tensor  # (L,) every gradient of the member finite


@dataclass
class _Computed:
    batch: Batch
    weights: list[Tensor]
    moms: list[Tensor]
    grads: list[Tensor]
    new_w: list[Tensor]
    new_m: list[Tensor]
    m_amax: list[Tensor]  # per position (L,): the new momentum's largest magnitude
    old_m_amax: list[Tensor]  # the momentum's before the step
    finite: Tensor  # (L,) gradients and results of each member


def _momentum_stacks(b: Batch, state: dict) -> list[Tensor]:
    if b.momentum is not None:
        return b.momentum
    out = []
    for ps, columns in zip(b.params, b.columns):
        bufs = [state.get(p, {}).get("momentum_buffer") for p in ps]
        if all(x is None for x in bufs):  # the first step: zeros, made state at commit
            shape = (len(ps), *local(ps[0]).shape)
            z = torch.zeros(shape[:1] + shape[1:][::-1] if columns else shape,
                            dtype=ps[0].dtype, device=ps[0].device)  # fmt: skip
            out.append(z.mT if columns else z)
        else:
            out.append(_stack([local(x) if x is not None else torch.zeros_like(local(p))
                               for x, p in zip(bufs, ps)], columns))  # fmt: skip
    return out


def _gather(ts: list[Tensor], columns: bool, table: OffsetTable | None) -> Tensor:
    """``(L, R, C)`` of L tensors: read where they live (``tables.LayerRows``, the kernels'
    pointer table, its offsets in ``table``) when a table is given and they allow it, else one
    ``_stack``."""
    if table is not None:
        cdtype = compute_dtype(ts[0].dtype)
        rows = layer_rows(ts, cdtype, table)
        if rows is not None:
            return rows
    return _stack(ts, columns)


def _reads_in_place(b: Batch, comm) -> bool:
    """Whether a batch's weights and gradients are read where they live: the kernels' backend,
    one process, plain tensors, and not under ``torch.compile`` (which traces stacks)."""
    return (b.prims.in_place and comm is None and b.skips is not None
            and not torch.compiler.is_compiling())  # fmt: skip


def _gather_batch(b: Batch, state: dict, comm) -> _Gathered:
    in_place = _reads_in_place(b, comm)

    def table(i: int, operand: str) -> OffsetTable | None:
        return b.table(i, operand) if in_place else None

    grads = [_gather([local(p.grad) for p in ps], c, table(i, "g"))
             for i, (ps, c) in enumerate(zip(b.params, b.columns))]  # fmt: skip
    weights = [_gather([local(p) for p in ps], c, table(i, "w"))
               for i, (ps, c) in enumerate(zip(b.params, b.columns))]  # fmt: skip
    moms = _momentum_stacks(b, state)
    g_amax = [_amax(x) for x in grads]
    m_amax = b.m_amax if b.m_amax is not None else [_amax(m) for m in moms]
    amax = [torch.maximum(g, m) for g, m in zip(g_amax, m_amax)]
    grads_ok = torch.stack([x.isfinite() for x in g_amax]).all(0)
    return _Gathered(b, weights, grads, moms, amax, m_amax, grads_ok)


def _agree_scales(gathered: list[_Gathered], comm) -> None:
    """Sharded parameters (DTensors): each rank saw its shard's magnitudes; one all_reduce
    (max) gives every rank the whole parameter's, so every plan scales as one process would.
    Replicated ones (DDP) already agree."""
    sharded = [g for g in gathered if g.batch.skips is None]
    if comm is None or not sharded:
        return
    sizes = [len(x) for g in sharded for x in g.amax]
    every = comm.all_max(torch.cat([x for g in sharded for x in g.amax])).split(sizes)
    i = 0
    for g in sharded:
        g.amax = list(every[i : i + len(g.amax)])
        i += len(g.amax)


def _compute(g: _Gathered, comm) -> _Computed:
    b, weights, grads, moms = g.batch, g.weights, g.grads, g.moms
    opts = b.options()
    if b.kind == "attention":
        group0 = b.members[0]
        if comm is None:
            new_w, new_m = compute_attention(b.layout, weights, grads, moms, group0, opts,
                                             b.prims, g.amax)  # fmt: skip
        else:
            new_w, new_m = comm.attention(b, weights, grads, moms, opts, b.prims, g.amax)
    else:
        args = (weights[0], grads[0], moms[0], b.group, opts, b.prims, g.amax[0])
        w1, m1 = compute_muon(*args) if comm is None else comm.muon(b, *args)
        new_w, new_m = [w1], [m1]
    m_amax = [_amax(x) for x in new_m]
    flags = [g.grads_ok, *(_quick_finite(x) for x in new_w), *(x.isfinite() for x in m_amax)]
    return _Computed(b, weights, moms, grads, new_w, new_m, m_amax, g.m_amax,
                     torch.stack(flags).all(0))  # fmt: skip


def _exactly_finite(c: _Computed) -> tuple[bool, bool]:
    """(gradients, results) of a batch whose quick check failed, entry by entry."""
    grads = all(bool(_exact_finite(g).all()) for g in c.grads)
    results = all(bool(_exact_finite(x).all()) for x in c.new_w)
    results = results and all(bool(x.isfinite().all()) for x in c.m_amax)
    return grads, results


def _adamw_finite(plan: Plan) -> list[Tensor]:
    """Per AdamW group and device, each parameter's gradient finite: ``(N,)`` flags."""
    out = []
    for _, ps in plan.adamw:
        norms = torch._foreach_norm([local(p.grad) for p in ps], 2)
        out.append(torch.stack(norms).isfinite())
    return out


def run_step(plan: Plan, state: dict, comm=None, on_raise=None) -> None:
    """Run one step of ``plan`` (see the module doc). ``on_raise(kind, groups)`` is called
    with ``"gradients"`` or ``"results"`` (and, for results, the param groups whose step was
    not finite on this rank) when a ``"raise"`` group cannot step; it must raise."""
    gathered = [_gather_batch(b, state, comm) for b in plan.batches]
    _agree_scales(gathered, comm)
    computed = [_compute(g, comm) for g in gathered]
    adam_flags = _adamw_finite(plan)
    flags = [c.finite for c in computed] + adam_flags
    if comm is not None and flags:  # every rank decides the same
        sizes = [len(f) for f in flags]
        flags = list(comm.all_true(torch.cat(flags)).split(sizes))
    for c, f in zip(computed, flags):
        c.finite = f
    adam_flags = flags[len(computed) :]
    if plan.raises:
        must = [f for c, f in zip(computed, flags) if c.batch.nonfinite == "raise"]
        must += [f for (g, _), f in zip(plan.adamw, adam_flags)
                 if g["nonfinite"] == "raise"]  # fmt: skip
        if must and not bool(torch.cat(must).all()):  # the step's one host read
            _settle(computed, plan, adam_flags, comm, on_raise)
    for c in computed:
        _commit(c, state, plan.in_place)
    for (group, ps), ok in zip(plan.adamw, adam_flags):
        _adamw(group, ps, state, ok if group["nonfinite"] == "skip" else None)


def _settle(computed, plan, adam_flags, comm, on_raise) -> None:
    """The quick check failed somewhere: decide exactly (finite entries can overflow a norm),
    and raise through ``on_raise`` if a "raise" group really cannot step."""
    grads_ok, results_ok = True, True
    failed: list[dict] = []  # groups whose results were not finite (this rank's)
    for c in computed:
        if c.batch.nonfinite == "raise" and not bool(c.finite.all()):
            g, r = _exactly_finite(c)
            grads_ok, results_ok = grads_ok and g, results_ok and r
            if g and not r:
                b = c.batch
                failed += b.members if b.kind == "attention" else [b.group]
    for (group, ps), f in zip(plan.adamw, adam_flags):
        if group["nonfinite"] == "raise" and not bool(f.all()):
            exact = all(bool(torch.isfinite(local(p.grad)).all()) for p in ps)
            grads_ok = grads_ok and exact
    ok = torch.tensor([grads_ok, results_ok])
    if comm is not None:
        ok = comm.all_true(ok)
    if not bool(ok[0]):
        on_raise("gradients", [])
    if not bool(ok[1]):
        on_raise("results", failed)


def _commit(c: _Computed, state: dict, in_place: bool) -> None:
    """Write a batch's results: weights through one ``_foreach_copy_`` per position, the
    momentum stacks as the state (plain tensors; ``in_place``: copied into the state's
    stacks) or copied into the buffers (DTensors)."""
    b = c.batch
    new_w, new_m = c.new_w, c.new_m
    if b.nonfinite == "skip":
        keep = c.finite

        def where(new: Tensor, old: Tensor) -> Tensor:
            return torch.where(keep.view(-1, *[1] * (new.dim() - 1)), new, old.to(new.dtype))

        new_w = [where(n, o) for n, o in zip(new_w, c.weights)]
        new_m = [where(n, o) for n, o in zip(new_m, c.moms)]
    for ps, value in zip(b.params, new_w):
        torch._foreach_copy_([local(p) for p in ps], list(value.to(ps[0].dtype).unbind(0)))
    # The next step's momentum magnitudes: those of the momentum as stored (rounding to the
    # parameter's dtype is monotone, so the rounded maximum is the stored one's maximum: a
    # resumed run, which reads the stored buffers, scales the same).
    amax = [a.to(ps[0].dtype).to(a.dtype) for a, ps in zip(c.m_amax, b.params)]
    if b.nonfinite == "skip":
        amax = [torch.where(c.finite, a, old) for a, old in zip(amax, c.old_m_amax)]
    b.m_amax = amax
    plain = b.skips is not None
    if plain:
        if in_place and b.momentum is not None:
            for stack, value in zip(b.momentum, new_m):
                stack.copy_(value)
        else:
            b.momentum = [m.to(ps[0].dtype) for m, ps in zip(new_m, b.params)]
        if b.nonfinite == "skip":
            b.skips.add_(~c.finite)
        _point_state(b, state)
        return
    for ps, value in zip(b.params, new_m):
        for p in ps:
            st = state[p]
            if "momentum_buffer" not in st:  # like p: a DTensor with p's placements
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["nonfinite_skips"] = 0  # every key exists from the first step (DCP)
        torch._foreach_copy_([local(state[p]["momentum_buffer"]) for p in ps],
                             list(value.to(ps[0].dtype).unbind(0)))  # fmt: skip
    if b.nonfinite == "skip":
        for p, ok in zip(b.counters, c.finite.tolist()):
            if not ok:
                state[p]["nonfinite_skips"] = state[p]["nonfinite_skips"] + 1


def _adamw(group: dict, ps: list[Tensor], state: dict, keep: Tensor | None) -> None:
    """AdamW on one device's parameters of a group (state made on first use; step counts on
    the device). ``keep`` ("skip" mode): ``(N,)`` flags; a parameter whose gradient is not
    finite keeps its value, moments and step count, and counts the skip."""
    for p in ps:
        st = state[p]
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=local(p).device)
        elif st["step"].device != local(p).device:  # a checkpoint's CPU step counts
            st["step"] = st["step"].to(local(p).device)
    names = ("exp_avg", "exp_avg_sq", "step")
    params = [local(p) for p in ps]
    tensors = [[local(state[p][n]) for p in ps] for n in names]
    if keep is not None:  # copies to restore from (x * 1 is exact: torch 2.11 has no
        old = [torch._foreach_mul(x, 1.0) for x in (params, *tensors)]  # _foreach_clone)
    adamw_update(params, [local(p.grad) for p in ps], *tensors, lr=group["lr"],
                 betas=group["betas"], eps=group["eps"],
                 weight_decay=group["weight_decay"])  # fmt: skip
    if keep is None:
        return
    for i, p in enumerate(ps):  # per parameter: AdamW's parameters differ in shape
        ok = keep[i]
        for new, prev in zip((params, *tensors), old):
            new[i].copy_(torch.where(ok, new[i], prev[i]))
        st = state[p]
        if not torch.is_tensor(st["nonfinite_skips"]):
            st["nonfinite_skips"] = torch.tensor(st["nonfinite_skips"], device=local(p).device)
        st["nonfinite_skips"].add_(~ok)
