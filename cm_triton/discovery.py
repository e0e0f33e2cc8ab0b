"""``param_groups(model)``: find attention in a model and build CompositionalMuon's groups.

Recognised attention (bias terms always go to AdamW):
- modules with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears (Llama, Mistral, Qwen and
  the demo's naming); head_dim from the module's ``head_dim`` attribute, else
  ``q_proj.out_features // num_heads`` (``num_heads`` or ``num_attention_heads``), else the
  ``head_dim`` argument; K/V heads from shapes, checked against ``num_key_value_heads``;
- ``torch.nn.MultiheadAttention``: the fused ``in_proj_weight`` with ``out_proj`` as one
  ``"mha"`` group (separate q/k/v weights when kdim/vdim differ: ``"qk"`` + ``"ov"``).
Other matrices go to Muon, except embeddings and modules named like an output head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cm_triton.optim import check_cm_keys

__all__ = ["param_groups"]

OUTPUT_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "embed_out")


def _head_dim(name: str, module: nn.Module, fallback: int | None) -> int:
    hd = getattr(module, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    for attr in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        n = getattr(module, attr, None)
        if isinstance(n, int) and n > 0:
            return module.q_proj.out_features // n
    if fallback is not None:
        return fallback
    raise ValueError(
        f"cannot read head_dim of attention module {name!r} ({type(module).__name__}): it has "
        f"no 'head_dim' or 'num_heads' attribute; pass param_groups(model, head_dim=...)"
    )


def _check_kv_heads(name: str, module: nn.Module, head_dim: int) -> None:
    n_kv = getattr(module, "num_key_value_heads", None)
    if isinstance(n_kv, int) and module.k_proj.out_features != n_kv * head_dim:
        raise ValueError(
            f"attention module {name!r}: k_proj has {module.k_proj.out_features} rows, but "
            f"num_key_value_heads={n_kv} x head_dim={head_dim} = {n_kv * head_dim}"
        )


def param_groups(
    model: nn.Module,
    *,
    head_dim: int | None = None,
    output_heads: tuple[str, ...] = OUTPUT_HEAD_NAMES,
    attention: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``CompositionalMuon``: every trainable parameter in exactly one group.

    ``options`` are CM flags applied to every attention group (``method="joint"``, ...).
    ``attention=False`` finds no attention: its matrices go to Muon (the plain-Muon baseline).
    """
    check_cm_keys(options)
    groups: list[dict[str, Any]] = []
    claimed: set[int] = set()

    def add_pairs(hd: int, *pairs: tuple[str, list]) -> None:
        # A pair with a frozen weight is not CM's to step: its trainable weights fall through
        # to Muon/AdamW below, so every trainable parameter still lands in exactly one group.
        for kind, params in pairs:
            if all(p.requires_grad for p in params):
                groups.append({"kind": kind, "params": params, "head_dim": hd, **options})
                claimed.update(id(p) for p in params)

    for name, module in model.named_modules() if attention else ():
        if isinstance(module, nn.MultiheadAttention):
            hd = module.head_dim
            if module.in_proj_weight is not None:
                add_pairs(hd, ("mha", [module.in_proj_weight, module.out_proj.weight]))
            else:
                if module.q_proj_weight.shape[1] != module.k_proj_weight.shape[1]:
                    raise ValueError(
                        f"attention module {name!r}: CM needs query and key of one width "
                        f"(kdim={module.kdim} != embed_dim={module.embed_dim})"
                    )
                qk = [module.q_proj_weight, module.k_proj_weight]
                ov = [module.v_proj_weight, module.out_proj.weight]
                add_pairs(hd, ("qk", qk), ("ov", ov))
        elif all(isinstance(getattr(module, n, None), nn.Linear)
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj")):  # fmt: skip
            hd = _head_dim(name, module, head_dim)
            _check_kv_heads(name, module, hd)
            q, k, v, o = (
                getattr(module, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")
            )
            add_pairs(hd, ("qk", [q, k]), ("ov", [v, o]))

    output_params: set[int] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) or leaf in output_heads:
            output_params.update(id(p) for p in module.parameters())
    muon, adamw = [], []
    for _, p in model.named_parameters():  # deduplicates tied weights
        if not p.requires_grad or id(p) in claimed:
            continue
        (muon if p.ndim >= 2 and id(p) not in output_params else adamw).append(p)
    if muon:
        groups.append({"kind": "muon", "params": muon})
    if adamw:
        groups.append({"kind": "adamw", "params": adamw})
    return groups
