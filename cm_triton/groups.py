"""What a param group of ``CompositionalMuon`` is: its kinds, its keys, and how its layout
and options are read (used by the optimizer, the plan, the distributed plans and the tests).

- ``"qk"`` / ``"ov"``: a pair ``[q_w, k_w]`` / ``[v_w, o_w]`` plus ``head_dim``;
- ``"mha"``: ``nn.MultiheadAttention``'s ``[in_proj_weight, out_proj.weight]`` plus
  ``head_dim``;
- ``"attention"``: any registered layout (``cm_triton.layouts``): ``"layout"``,
  ``"head_dim"``, ``"num_heads"``, ``"num_kv_heads"`` and, for layouts that need them,
  ``"layout_args"``;
- ``"muon"`` (``"shape"``: ``MUON_SHAPES``) and ``"adamw"``.
CM's flags (``CM_KEYS``) are per-group keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cm_triton.layouts import Layout, get_layout
from cm_triton.options import CMOptions

__all__ = [
    "ATTENTION_KINDS",
    "CM_KEYS",
    "MUON_SHAPES",
    "check_cm_keys",
    "group_layout",
    "group_options",
    "check_group",
    "head_views",
]

# How a Muon group's parameters are matrices (``"_t"``: stored (in, out), as GPT-2's Conv1D
# and GPT-OSS's experts; Muon's shape factor uses the mathematical (out, in) shape).
MUON_SHAPES = ("matrix", "matrix_t", "experts", "experts_t")
ATTENTION_KINDS = ("qk", "ov", "mha", "attention")
CM_KEYS = (
    "beta", "nesterov", "damping", "method", "isotropic", "hybrid", "whitening", "connection",
    "momentum_reproject", "per_mat_renorm", "ns_coefficients", "ns_dtype", "ns_method",
    "ns_restart", "inv_root", "backend", "gqa_budget",
)  # fmt: skip


def check_cm_keys(options: dict[str, Any]) -> None:
    """Raise TypeError naming any key of ``options`` that is not a CM flag."""
    unknown = set(options) - set(CM_KEYS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; CM options are {CM_KEYS}")


def _heads_of(n: int, head_dim: int, what: str) -> int:
    if n % head_dim:
        raise ValueError(f"head_dim={head_dim} does not divide the {n} {what}")
    return n // head_dim


def group_layout(group: dict) -> Layout:
    """The layout of an attention param group (kinds ``"qk"``, ``"ov"``, ``"mha"``,
    ``"attention"``); head counts come from the group keys or, for the first three, from
    the shapes and ``head_dim`` (``head_counts``)."""
    name, hq, hkv = head_counts(group)
    args = group.get("layout_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"'layout_args' must be a dict, got {args!r}")
    return get_layout(name, hq, hkv, group["head_dim"], **args)


def head_counts(group: dict) -> tuple[str, int, int]:
    """``(layout name, Hq, Hkv)`` of an attention param group, validated."""
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
    return name, hq, hkv


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


def head_views(group: dict) -> dict[str, Tensor]:
    """Views of one attention param group's heads: ``{"q": (Hq, dh, d), "k": ..., "v": ...,
    "o": (Hq, dh, d) (o's column blocks, transposed)}``, writable (e.g. for gauge checks);
    grouped layouts give ``(*heads, dh, d)`` with the head axes not yet flattened."""
    layout = group_layout(group)
    return {n: h.view(group["params"][h.param].detach()) for n, h in layout.entries()}
