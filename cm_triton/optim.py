"""``CompositionalMuon``: one ``torch.optim.Optimizer`` for a whole model.

Plumbing only: it keeps state and routes each param group to the math it names.

- ``"qk"`` / ``"ov"``: a pair ``[q_w, k_w]`` / ``[v_w, o_w]`` plus ``head_dim``; stepped by
  ``cm_qk`` / ``cm_ov`` (every CM flag is a per-group option).
- ``"mha"``: one fused ``nn.MultiheadAttention`` ``[in_proj_weight, out_proj.weight]`` plus
  ``head_dim``; the Q/K/V blocks are row views of the fused weight, gradient and momentum
  (torch refuses one parameter in two groups, so QK and OV share this one).
- ``"muon"``: other hidden matrices; Muon with the same ``msign`` and Muon's shape factor
  ``sqrt(max(1, rows/cols))``, nesterov momentum.
- ``"adamw"``: everything else (embeddings, output head, norms, biases).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from cm_triton.dispatch import resolve_ns_dtype, resolve_primitives
from cm_triton.functional import all_finite, check_pair_shapes, cm_ov, cm_qk
from cm_triton.options import CMOptions
from cm_triton.schedules import POLAR_EXPRESS_8

__all__ = ["CompositionalMuon", "KINDS"]

KINDS = ("qk", "ov", "mha", "muon", "adamw")
CM_KEYS = (
    "beta", "nesterov", "damping", "method", "isotropic", "hybrid", "whitening", "connection",
    "momentum_reproject", "per_mat_renorm", "ns_coefficients", "ns_dtype", "inv_root", "backend",
)  # fmt: skip
NONFINITE = ("raise", "skip")
# Gradient names of an attention group's two weights, as cm_qk / cm_ov call them.
GRAD_NAMES = {"qk": ("q_grad", "k_grad"), "ov": ("v_grad", "o_grad"),
              "mha": ("in_proj_weight's gradient", "out_proj.weight's gradient")}  # fmt: skip


class CompositionalMuon(torch.optim.Optimizer):
    """Compositional Muon on attention pairs, Muon on other matrices, AdamW on the rest.

    Args:
        params: param groups, each a dict with ``"kind"`` in ``KINDS`` and ``"params"``
            (``cm_triton.param_groups(model)`` builds them); ``"qk"``, ``"ov"`` and ``"mha"``
            groups also carry ``"head_dim"``.
        lr: step size eta of the CM and Muon groups.
        adamw_lr: learning rate of the AdamW groups (a group's own ``"lr"`` wins).
        weight_decay: decoupled weight decay, every group.
        momentum: Muon's momentum (nesterov) for ``"muon"`` groups.
        betas, eps: AdamW's.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a pair or matrix whose gradient has a
            NaN/Inf is left untouched and counted in its state as ``"nonfinite_skips"``.
        **cm_options: defaults for CM flags (``method``, ``connection``, ``damping``, ...);
            ``beta`` is CM's momentum.
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
        **cm_options: Any,
    ) -> None:
        check_cm_keys(cm_options)
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        kind = param_group.get("kind")
        if kind not in KINDS:
            raise ValueError(f"param group 'kind' must be one of {KINDS}, got {kind!r}")
        if kind == "adamw" and "lr" not in param_group:
            param_group["lr"] = self.defaults["adamw_lr"]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if kind in ("qk", "ov", "mha"):
            if len(group["params"]) != 2:
                raise ValueError(
                    f"a {kind!r} group holds exactly 2 weights, got {len(group['params'])}"
                )
            a, b = group["params"]  # check_pair_shapes validates head_dim with everything else
            if kind == "mha":
                if a.shape[0] % 3:
                    raise ValueError(f"an 'mha' in_proj_weight has {a.shape[0]} rows, not 3 x E")
                q, k, v = a.split(a.shape[0] // 3)
                check_pair_shapes("qk", q, k, group.get("head_dim"))
                check_pair_shapes("ov", v, b, group.get("head_dim"))
            else:
                check_pair_shapes(kind, a, b, group.get("head_dim"))
        CMOptions(eta=group["lr"], weight_decay=group["weight_decay"], **_cm_kwargs(group))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._raise_on_nonfinite()
        for group in self.param_groups:
            kind = group["kind"]
            if kind in ("qk", "ov", "mha"):
                self._step_attention(group)
            elif kind == "muon":
                prims = resolve_primitives(group.get("backend", "auto"), group["params"][0].device)
                ns_dtype = resolve_ns_dtype(group.get("ns_dtype"), group["params"][0].device)
                for p in group["params"]:
                    if p.grad is not None and self._finite_or_skip(group, [p]):
                        self._step_muon(group, p, prims, ns_dtype)
            else:
                for p in group["params"]:
                    if p.grad is not None and self._finite_or_skip(group, [p]):
                        _adamw_step(self.state[p], p, p.grad, group)
        return loss

    # -- plumbing -------------------------------------------------------------------------
    def _raise_on_nonfinite(self) -> None:
        """``nonfinite="raise"``: check every gradient before any parameter moves, so a step
        that raises leaves the whole model and all state as they were."""
        for i, group in enumerate(self.param_groups):
            if group["nonfinite"] != "raise":
                continue
            names = GRAD_NAMES.get(group["kind"])
            if all_finite([p.grad for p in group["params"] if p.grad is not None]):
                continue
            for j, p in enumerate(group["params"]):
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    what = names[j] if names else f"the gradient of parameter {j} {tuple(p.shape)}"
                    raise ValueError(
                        f"param group {i} ({group['kind']!r}): {what} contains non-finite values "
                        f"(nan or inf); nothing was modified"
                    )

    def _finite_or_skip(self, group: dict, params: list[Tensor]) -> bool:
        """``nonfinite="skip"``: count and skip a pair or matrix with a non-finite gradient."""
        if group["nonfinite"] == "raise" or all_finite([p.grad for p in params]):
            return True
        state = self.state[params[0]]
        state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
        return False

    def _buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _step_attention(self, group: dict) -> None:
        a, b = group["params"]
        if a.grad is None or b.grad is None:  # a pair is stepped whole or not at all
            return
        if not self._finite_or_skip(group, [a, b]):
            return
        kw = dict(head_dim=group["head_dim"], eta=group["lr"], weight_decay=group["weight_decay"])
        kw.update(_cm_kwargs(group))
        qk_kw = {k_: v_ for k_, v_ in kw.items() if k_ != "hybrid"}  # hybrid is OV's flag
        ma, mb = self._buffer(a), self._buffer(b)
        if group["kind"] == "qk":
            cm_qk(a, b, a.grad, b.grad, ma, mb, **qk_kw)
        elif group["kind"] == "ov":
            cm_ov(a, b, a.grad, b.grad, ma, mb, **kw)
        else:  # fused nn.MultiheadAttention: rows [q; k; v] of in_proj_weight
            e = a.shape[0] // 3
            q, k, v = a.split(e)
            gq, gk, gv = a.grad.split(e)
            mq, mk, mv = ma.split(e)
            cm_qk(q, k, gq, gk, mq, mk, **qk_kw)
            cm_ov(v, b, gv, b.grad, mv, mb, **kw)

    def _step_muon(self, group: dict, p: Tensor, prims, ns_dtype: torch.dtype | None) -> None:
        buf = self._buffer(p)
        g = p.grad
        buf.mul_(group["momentum"]).add_(g)
        update = g.add(buf, alpha=group["momentum"])  # nesterov
        mat = update.reshape(update.shape[0], -1)
        coeffs = group.get("ns_coefficients", POLAR_EXPRESS_8)
        o = prims.msign(mat[None], coeffs, ns_dtype)[0]
        scale = max(1.0, mat.shape[0] / mat.shape[1]) ** 0.5
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o.view_as(p).to(p.dtype), alpha=-group["lr"] * scale)


def check_cm_keys(options: dict[str, Any]) -> None:
    """Raise TypeError naming any key of ``options`` that is not a CM flag."""
    unknown = set(options) - set(CM_KEYS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; CM options are {CM_KEYS}")


def _cm_kwargs(group: dict) -> dict:
    return {k: group[k] for k in CM_KEYS if k in group}


def _adamw_step(state: dict, p: Tensor, g: Tensor, group: dict) -> None:
    """Decoupled AdamW (Loshchilov & Hutter), bias-corrected; moments in ``state``."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    b1, b2 = group["betas"]
    state["step"] += 1
    t = state["step"].item()
    state["exp_avg"].lerp_(g, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))
