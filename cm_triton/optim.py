"""``CompositionalMuon``: one ``torch.optim.Optimizer`` for a whole model.

Plumbing only: it validates groups, keeps state and hands each step to ``engine.Step``, which
batches equal-shaped work across layers.

- ``"qk"`` / ``"ov"``: a pair ``[q_w, k_w]`` / ``[v_w, o_w]`` plus ``head_dim``.
- ``"mha"``: ``nn.MultiheadAttention``'s ``[in_proj_weight, out_proj.weight]`` plus
  ``head_dim``; the Q/K/V blocks are row views of the fused weight.
- ``"attention"``: any registered layout (``cm_triton.layouts``): ``"layout"``,
  ``"head_dim"``, ``"num_heads"``, ``"num_kv_heads"``; fused weights are stepped through views.
- ``"muon"``: other hidden matrices; Muon with the same ``msign``, nesterov momentum and the
  shape factor ``sqrt(max(1, out/in))``. The group's ``"shape"`` says how its parameters are
  matrices: ``"matrix"`` (default; conv weights flattened to ``(out, -1)``), ``"matrix_t"``
  (stored ``(in, out)``, GPT-2's ``Conv1D``), ``"experts"`` / ``"experts_t"`` (3-D stacks,
  one sign per expert).
- ``"adamw"``: everything else (embeddings, output head, norms, biases).

Every CM flag is a per-group option; every trainable parameter sits in exactly one group, and
each has one momentum buffer (``state[p]["momentum_buffer"]``, the parameter's shape).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from cm_triton import distributed, engine
from cm_triton.groups import (
    ATTENTION_KINDS,
    MUON_SHAPES,
    check_cm_keys,
    check_group,
    group_options,
)
from cm_triton.schedules import MUON_COEFFICIENTS

__all__ = ["CompositionalMuon", "KINDS"]

KINDS = (*ATTENTION_KINDS, "muon", "adamw")
NONFINITE = ("raise", "skip")
# Gradient names of the fixed-shape attention kinds, as cm_qk / cm_ov call them.
GRAD_NAMES = {"qk": ("q_grad", "k_grad"), "ov": ("v_grad", "o_grad"),
              "mha": ("in_proj_weight's gradient", "out_proj.weight's gradient")}  # fmt: skip


class CompositionalMuon(torch.optim.Optimizer):
    """Compositional Muon on attention pairs, Muon on other matrices, AdamW on the rest.

    Args:
        params: param groups, each a dict with ``"kind"`` in ``KINDS`` and ``"params"``
            (``cm_triton.param_groups(model)`` builds them); attention groups also carry
            ``"head_dim"`` (and, for ``"attention"``, ``"layout"``, ``"num_heads"``,
            ``"num_kv_heads"``).
        lr: step size eta of the CM and Muon groups.
        adamw_lr: learning rate of the AdamW groups (a group's own ``"lr"`` wins).
        weight_decay: decoupled weight decay, every group.
        momentum: Muon's momentum (nesterov) for ``"muon"`` groups and layout extras.
        betas, eps: AdamW's.
        nonfinite: ``"raise"`` (default): a NaN/Inf gradient anywhere raises before anything
            moves; ``"skip"``: a group (attention) or matrix (Muon) with one is left untouched
            and counted in its first parameter's state as ``"nonfinite_skips"``.
        process_group: the process group (or 1-D DeviceMesh) that shards the parameters;
            read from the DTensor parameters (FSDP2) when None. Plain-tensor parameters (a
            single process) need none; under DDP, giving it splits the step (``replicated``).
        o_sign: with sharded parameters, how the hybrid rule's one sign over a width-sharded
            o_w is computed: ``"gather"``, ``"sharded"`` or ``"auto"`` (a cost estimate; see
            ``cm_triton.distributed``).
        replicated: with ``process_group`` and plain (replicated, DDP) parameters:
            ``"split"`` (default): each rank steps its share of every batch's layers and one
            all_gather per batch brings the new weights; ``"every_rank"``: every rank computes
            the whole step, no collective. No effect without a process group.
        capturable: a step a CUDA graph can capture (as ``torch.optim``'s flag): every
            group must use ``nonfinite="skip"`` (a step then reads nothing back), and the
            momentum is written into the same stacks each step (one copy of it more) so
            that its addresses never change. Make the first step eagerly, keep the
            gradients' storage (``zero_grad(set_to_none=False)``), and capture again after
            changing the lr (it is a constant of the captured graph).
        **cm_options: defaults for CM flags (``method``, ``connection``, ``damping``,
            ``ns_method``, ...); ``beta`` is CM's momentum.

    A step is planned once per structure of the groups (``cm_triton.engine``), stacks
    equal-shaped groups across layers and runs each batch once, so its op count does not grow
    with depth. With ``nonfinite="raise"`` it reads one flag on the host; a step whose result
    would be non-finite (an undamped singular partner) then raises ``FloatingPointError`` and
    changes nothing. With ``"skip"`` it reads nothing back: such a group keeps its weights.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        *,
        adamw_lr: float = 3e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        nonfinite: str = "raise",
        process_group: Any = None,
        o_sign: str = "auto",
        replicated: str = "split",
        capturable: bool = False,
        **cm_options: Any,
    ) -> None:
        check_cm_keys(cm_options)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if not isinstance(capturable, bool):
            raise ValueError(f"capturable must be a bool, got {capturable!r}")
        for name, value, high in (("adamw_lr", adamw_lr, math.inf), ("momentum", momentum, 1.0),
                                  ("eps", eps, math.inf)):  # fmt: skip
            if not (isinstance(value, (int, float)) and 0 <= value < high):
                raise ValueError(f"{name} must be a finite number in [0, {high}), got {value!r}")
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, betas=tuple(betas), eps=eps,
            adamw_lr=adamw_lr, nonfinite=nonfinite, **cm_options,
        )  # fmt: skip
        super().__init__(list(params), defaults)
        if o_sign not in distributed.O_SIGN_STRATEGIES:
            raise ValueError(
                f"o_sign must be one of {distributed.O_SIGN_STRATEGIES}, got {o_sign!r}"
            )
        self.o_sign = o_sign
        distributed.check_replicated(replicated)
        self.replicated = replicated
        self.comm = process_group  # resolved to a communicator when the step is planned
        self._plan: engine.Plan | None = None
        self.capturable = capturable
        if capturable:
            self._check_capturable()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._plan = None  # the next step plans anew
        kind = param_group.get("kind")
        if kind not in KINDS:
            raise ValueError(f"param group 'kind' must be one of {KINDS}, got {kind!r}")
        if kind == "adamw" and "lr" not in param_group:
            param_group["lr"] = self.defaults["adamw_lr"]
        if kind == "muon" and "ns_coefficients" not in param_group | self.defaults:
            param_group["ns_coefficients"] = MUON_COEFFICIENTS
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1} ({kind!r})"
        if kind in ATTENTION_KINDS:
            if kind != "attention" and len(group["params"]) != 2:
                raise ValueError(f"{where}: holds exactly 2 weights, got {len(group['params'])}")
            check_group(group, where)
        elif kind == "muon":
            shape = group.setdefault("shape", "matrix")
            if shape not in MUON_SHAPES:
                raise ValueError(f"{where}: 'shape' must be one of {MUON_SHAPES}, got {shape!r}")
            for p in group["params"]:
                need = 3 if shape.startswith("experts") else 2
                if p.dim() < 2 or (p.dim() != need and shape != "matrix"):
                    raise ValueError(
                        f"{where}: Muon 'shape' {shape!r} needs {need}-D parameters, got "
                        f"{tuple(p.shape)}"
                    )
        group_options(group)  # validates every CM flag of the group

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key = engine.plan_key(self.param_groups)
        if self._plan is None or self._plan.key != key:  # planned once per structure
            self.comm = distributed.comm_for(self.param_groups, self.comm, self.o_sign,
                                               self.replicated)  # fmt: skip
            if self.capturable and self._plan is None:
                self._check_capturable()
            self._plan = engine.build_plan(self.param_groups, self.state, self.capturable)
        if self.comm is not None:
            self.comm.begin_step()
        engine.run_step(self._plan, self.state, self.comm, self._cannot_step)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, after checking that the checkpoint fits
        these param groups: the same kinds and structure keys per group, and every state
        tensor of each parameter's shape. A mismatch raises ValueError naming the group and
        parameter, and nothing is loaded. The next step plans anew (its momentum stacks are
        made from the loaded buffers)."""
        check_state_dict(self.param_groups, state_dict)
        super().load_state_dict(state_dict)
        self._plan = None

    # -- plumbing -------------------------------------------------------------------------
    def _check_capturable(self) -> None:
        """A captured step may not read anything back: every group must use "skip"."""
        for i, g in enumerate(self.param_groups):
            if g["nonfinite"] != "skip":
                raise ValueError(
                    f"capturable=True needs nonfinite='skip' in every group (a 'raise' step "
                    f"reads one flag on the host, which a CUDA graph cannot); param group {i} "
                    f"({g['kind']!r}) has nonfinite={g['nonfinite']!r}"
                )

    def _cannot_step(self, why: str, groups: list[dict]) -> None:
        """A "raise" group cannot step (``engine.run_step``): nothing was modified. Names
        the groups whose step was not finite and the cause found: an undamped partner (a zero
        or rank-deficient head has no inverse root), or none this package knows of."""
        if why == "gradients":
            self._raise_nonfinite()
        where = [next(i for i, g in enumerate(self.param_groups) if g is group)
                 for group in groups]  # fmt: skip
        names = ", ".join(f"param group {i} ({self.param_groups[i]['kind']!r})" for i in where)
        undamped = [i for i in where if self.param_groups[i]["kind"] in ATTENTION_KINDS
                    and group_options(self.param_groups[i]).damping == 0]  # fmt: skip
        if undamped:
            cause = ("with damping=0.0 a zero or rank-deficient partner head has no inverse "
                     "root; use damping > 0")  # fmt: skip
        else:
            cause = ("the gradients are finite and the partners damped (every direction is "
                     "scaled by a power of two before its Grams, so no finite gradient "
                     "overflows them): no cause this package knows of; please report it with "
                     "the shapes and options")  # fmt: skip
        raise FloatingPointError(
            f"CompositionalMuon produced a non-finite step ({names or 'on another rank'}), "
            f"so nothing was modified: {cause}"
        )

    def _raise_nonfinite(self) -> None:
        """``nonfinite="raise"``: name the group and parameter with a non-finite gradient
        (on this rank, or on another one), before anything has moved."""
        for i, group in enumerate(self.param_groups):
            if group["nonfinite"] != "raise":
                continue
            names = GRAD_NAMES.get(group["kind"])
            for j, p in enumerate(group["params"]):
                if p.grad is not None and not bool(torch.isfinite(engine.local(p.grad)).all()):
                    what = names[j] if names else f"the gradient of parameter {j}"
                    raise ValueError(
                        f"param group {i} ({group['kind']!r}): {what} {tuple(p.shape)} contains "
                        f"non-finite values (nan or inf); nothing was modified"
                    )
        raise ValueError(
            "a gradient of another rank contains non-finite values (nan or inf); nothing "
            "was modified"
        )


# Keys that fix how a group's parameters are read: a checkpoint must agree on them.
STRUCTURE_KEYS = ("kind", "head_dim", "layout", "num_heads", "num_kv_heads", "layout_args",
                  "shape")  # fmt: skip


def check_state_dict(groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Raise ValueError unless ``state_dict`` (``Optimizer.state_dict()``'s form) fits
    ``groups``: as many groups, of the same sizes and structure keys, and every tensor in a
    parameter's state either a scalar or of the parameter's shape."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("state_dict must be an optimizer state_dict with 'state' and "
                         "'param_groups'")  # fmt: skip
    saved = state_dict["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(f"state_dict has {len(saved)} param groups, this optimizer "
                         f"{len(groups)}")  # fmt: skip
    by_index: dict[Any, tuple[int, int, Tensor]] = {}
    for i, (group, old) in enumerate(zip(groups, saved)):
        where = f"param group {i} ({group.get('kind')!r})"
        if len(old["params"]) != len(group["params"]):
            raise ValueError(f"{where}: the state_dict's group has {len(old['params'])} "
                             f"parameters, this one {len(group['params'])}")  # fmt: skip
        for key in STRUCTURE_KEYS:
            if old.get(key) != group.get(key):
                raise ValueError(f"{where}: the state_dict's {key!r} is {old.get(key)!r}, "
                                 f"this group's {group.get(key)!r}")  # fmt: skip
        for j, (index, p) in enumerate(zip(old["params"], group["params"])):
            by_index[index] = (i, j, p)
    for index, entries in state_dict["state"].items():
        if index not in by_index:
            raise ValueError(f"state_dict holds state for parameter index {index!r}, which no "
                             f"param group lists")  # fmt: skip
        i, j, p = by_index[index]
        for name, value in entries.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(
                    f"param group {i} ({groups[i].get('kind')!r}), parameter {j} "
                    f"{tuple(p.shape)}: the state_dict's {name!r} has shape "
                    f"{tuple(value.shape)}; nothing was loaded"
                )
