"""``param_groups(model)``: find attention in a model and build CompositionalMuon's groups.

Attention is recognised by module structure and configuration, not by one naming convention
(recognisers below, tried in order; ``register_recognizer`` adds your own):

- ``torch.nn.MultiheadAttention``: fused ``in_proj_weight`` (``"mha"``), or separate q/k/v
  weights when kdim/vdim differ (widths may differ: the per-head Grams are dh x dh);
- separate q/k/v linears (``q_proj|query|q``, ``k_proj|key|k``, ``v_proj|value|v``) with the
  output projection as a child (``o_proj|out_proj|o|dense|proj``) or, as in BERT, the sibling
  ``output.dense``: one ``"qk"`` and one ``"ov"`` group. Qwen3-Next / Qwen3.5's gated
  ``q_proj`` (per head ``[query_h; gate_h]``) is one ``"attention"`` group, layout
  ``"gated_q"``, whose gate rows Muon steps; any other ``q_proj`` with gate-like extra rows is
  refused loudly;
- fused q/k/v of known families: GPT-2 ``c_attn`` (``Conv1D``, stored in x out), GPT-NeoX /
  Pythia and Falcon ``query_key_value`` (interleaved, grouped or blocked per Falcon's config),
  Phi-3 ``qkv_proj``, timm ``qkv`` and ``AttentionPoolLatent``'s ``q`` + ``kv``.

Head counts come from the module (``head_dim``, ``head_size``, ``num_heads``,
``num_key_value_heads``, ...) or the model's ``config``, and are checked against the shapes.
Everything that looks like attention but is not taken (DeepSeek's MLA, linear attention, an
unknown fused layout) is reported by a warning naming the module (``unrecognised="raise"``
makes it an error); what was recognised is logged (logger ``"cm_triton"``).

Other parameters: Muon for hidden matrices (``nn.Linear``/``Conv1D``/conv weights, bare 2-D
matrices, 3-D expert stacks as one sign per expert; Muon's shape factor from the
mathematical ``(out, in)`` shape), AdamW for embeddings and embedding-like tables
(``cls_token``, ``pos_embed``: bare parameters of ``(1, n, d)`` or named like a table),
output heads, norms and every bias.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from cm_triton.groups import check_cm_keys

__all__ = [
    "param_groups",
    "Found",
    "register_recognizer",
    "RECOGNIZERS",
    "UnhandledAttentionWarning",
]

log = logging.getLogger("cm_triton")

OUTPUT_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "embed_out", "score")
Q_NAMES, K_NAMES, V_NAMES = (
    ("q_proj", "query", "q"),
    ("k_proj", "key", "k"),
    ("v_proj", "value", "v"),
)
O_NAMES = ("o_proj", "out_proj", "o", "dense", "proj")
# Attention classes whose q_proj holds [query_h; gate_h] per head (transformers 5).
GATED_Q_CLASSES = ("Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention")
TABLE_NAME = re.compile(r"(embed|pos|token|cls|latent|register|mask|prompt|codebook|table)", re.I)
LOOKS_LIKE_ATTENTION = re.compile(r"(attn|attention)", re.I)


class UnhandledAttentionWarning(UserWarning):
    """A module looks like attention, but CM does not step it (its matrices go to Muon)."""


@dataclass
class Found:
    """A recognised attention module: its weights in ``layout`` order, and head counts."""

    kind: str  # "qk" + "ov" (two groups), "mha", or "attention" (one group with a layout)
    params: list[nn.Parameter]
    head_dim: int
    num_heads: int
    num_kv_heads: int
    layout: str | None = None
    layout_args: dict[str, Any] | None = None  # the layout's own sizes (MLA's)


class Refused(Exception):
    """A recogniser matched a module but cannot step it: the reason is reported."""


@dataclass
class Context:
    """What a recogniser may read: the module's name, its children and its ``config``."""

    name: str
    module: nn.Module
    modules: dict[str, nn.Module]
    config: Any
    head_dim: int | None = None  # param_groups(head_dim=...): the fallback

    def get(self, name: str) -> nn.Module | None:
        """The child ``name`` seen through adapter wrappers (PEFT's ``lora.Linear`` holds the
        original layer as ``base_layer``), or None."""
        m = getattr(self.module, name, None)
        return _unwrap(m) if isinstance(m, nn.Module) else None

    def child(self, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
        for n in names:
            m = self.get(n)
            if m is not None and _linear_like(m):
                return n, m
        return None


Recognizer = Callable[[Context], "Found | None"]


# -- helpers ------------------------------------------------------------------------------
def _unwrap(m: nn.Module) -> nn.Module:
    """The layer an adapter wraps (PEFT's LoRA/IA3/... layers keep it as ``base_layer``)."""
    while isinstance(getattr(m, "base_layer", None), nn.Module):
        m = m.base_layer
    return m


def _linear_like(m: nn.Module) -> bool:
    """nn.Linear (and subclasses), transformers' Conv1D (stored in x out)."""
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def _attr(objs: tuple[Any, ...], names: tuple[str, ...]) -> int | None:
    for obj in objs:
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _counts(
    ctx: Context, q_rows: int, k_rows: int, o_cols: int | None, fallback_dh: int | None
) -> tuple[int, int, int]:
    """``(head_dim, Hq, Hkv)`` of a module from its attributes, its config and the shapes."""
    objs = (ctx.module,) if ctx.config is None else (ctx.module, ctx.config)
    hq = _attr(objs, ("num_heads", "num_attention_heads", "n_heads", "n_head"))
    dh = _attr((ctx.module,), ("head_dim", "head_size", "attention_head_size",
                               "key_value_proj_dim"))  # fmt: skip
    if dh is None and ctx.config is not None:
        dh = _attr((ctx.config,), ("head_dim", "d_kv", "kv_channels"))
    if dh is None and hq is not None:
        dh = (o_cols if o_cols is not None else q_rows) // hq
    if dh is None:
        dh = fallback_dh
    if dh is None:
        raise ValueError(
            f"cannot read head_dim of attention module {ctx.name!r} "
            f"({type(ctx.module).__name__}): it has no 'head_dim' or 'num_heads' attribute and "
            f"no config with them; pass param_groups(model, head_dim=...)"
        )
    hq_shape = (o_cols if o_cols is not None else q_rows) // dh
    hkv = k_rows // dh
    n_kv = _attr(objs, ("num_key_value_heads", "num_kv_heads"))
    if n_kv is not None and n_kv != hkv and type(ctx.module).__name__ != "FalconAttention":
        raise ValueError(
            f"attention module {ctx.name!r}: its key weight has {k_rows} rows, but "
            f"num_key_value_heads={n_kv} x head_dim={dh} = {n_kv * dh}"
        )
    if hq is not None and ctx.config is None and hq != hq_shape:
        raise ValueError(
            f"attention module {ctx.name!r}: num_heads={hq} but its shapes give {hq_shape} "
            f"heads of {dh}"
        )
    return dh, hq_shape, hkv


def _found(kind: str, ctx: Context, parts: list[tuple[str, nn.Parameter]], counts, layout=None):
    """``parts``: ``(attribute path, parameter)`` in the layout's order (paths document it)."""
    dh, hq, hkv = counts
    return Found(kind, [p for _, p in parts], dh, hq, hkv, layout)


# -- recognisers --------------------------------------------------------------------------
def _multihead_attention(ctx: Context) -> Found | None:
    m = ctx.module
    if not isinstance(m, nn.MultiheadAttention):
        return None
    o = ("out_proj.weight", m.out_proj.weight)
    counts = (m.head_dim, m.num_heads, m.num_heads)
    if m.in_proj_weight is not None:
        return _found("mha", ctx, [("in_proj_weight", m.in_proj_weight), o], counts)
    parts = [(f"{r}_proj_weight", getattr(m, f"{r}_proj_weight")) for r in "qkv"] + [o]
    return _found("qk+ov", ctx, parts, counts)


def _separate(ctx: Context) -> Found | None:
    q, k, v = ctx.child(Q_NAMES), ctx.child(K_NAMES), ctx.child(V_NAMES)
    if q is None or k is None or v is None:
        return None
    o = ctx.child(O_NAMES)
    o_name = o[0] if o else None
    if o is None:  # BERT: attention.self.{query,key,value} + attention.output.dense
        parent = ctx.name.rsplit(".", 1)[0] if "." in ctx.name else ""
        sib = ctx.modules.get(f"{parent}.output.dense" if parent else "output.dense")
        if sib is None or not _linear_like(sib):
            raise Refused("q/k/v projections without an output projection")
        o, o_name = ("dense", sib), (f"{parent}.output.dense" if parent else "output.dense")
    if any(_is_conv1d(x[1]) for x in (q, k, v, o)):
        return None  # GPT-2 style handled by _gpt2
    q_rows, k_rows, o_cols = q[1].weight.shape[0], k[1].weight.shape[0], o[1].weight.shape[1]
    weight = [(f"{n}.weight", mod.weight) for n, mod in (q, k, v)]
    o_param = (f"{o_name}.weight", o[1].weight)
    if q_rows == 2 * o_cols:  # a gate beside each query head?
        if type(ctx.module).__name__ not in GATED_Q_CLASSES:
            raise Refused(
                f"{q[0]} has {q_rows} rows, twice the {o_cols} inputs of its output "
                f"projection (a gate beside the queries?): its layout is unknown to CM; "
                f"register a layout (cm_triton.layouts.register_layout) and a recogniser"
            )
        dh, hq, hkv = _counts(ctx, q_rows // 2, k_rows, o_cols, None)
        return _found("attention", ctx, [*weight, o_param], (dh, hq, hkv), "gated_q")
    counts = _counts(ctx, q_rows, k_rows, o_cols, ctx.head_dim)
    return _found("qk+ov", ctx, [*weight, o_param], counts)


def _gpt2(ctx: Context) -> Found | None:
    m = ctx.module
    c_attn, c_proj, q_attn = (ctx.get(n) or nn.Identity() for n in ("c_attn", "c_proj", "q_attn"))
    if not (_is_conv1d(c_attn) and _is_conv1d(c_proj)):
        return None
    c_attn, c_proj = c_attn.weight, c_proj.weight  # (d, n*E), (Hq*dh, d): in x out
    if getattr(m, "is_cross_attention", False) and _is_conv1d(q_attn):
        q = q_attn.weight
        counts = _counts(ctx, q.shape[1], c_attn.shape[1] // 2, c_proj.shape[0], None)
        parts = [("q_attn.weight", q), ("c_attn.weight", c_attn), ("c_proj.weight", c_proj)]
        return _found("attention", ctx, parts, counts, "q_kv_t")
    counts = _counts(ctx, c_attn.shape[1] // 3, c_attn.shape[1] // 3, c_proj.shape[0], None)
    parts = [("c_attn.weight", c_attn), ("c_proj.weight", c_proj)]
    return _found("attention", ctx, parts, counts, "qkv_blocks_t")


def _query_key_value(ctx: Context) -> Found | None:
    """GPT-NeoX / Pythia (per head [q; k; v]) and Falcon (three layouts by config)."""
    m, cls = ctx.module, type(ctx.module).__name__
    qkv, dense = ctx.get("query_key_value"), ctx.get("dense")
    if not (isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)):
        return None
    rows, o_cols = qkv.weight.shape[0], dense.weight.shape[1]
    parts = [("query_key_value.weight", qkv.weight), ("dense.weight", dense.weight)]
    if cls == "GPTNeoXAttention" or (cls == "FalconAttention" and not m.new_decoder_architecture
                                      and not m.multi_query):  # fmt: skip
        dh = _counts(ctx, rows // 3, rows // 3, o_cols, None)[0]
        return _found("attention", ctx, parts, (dh, o_cols // dh, o_cols // dh), "qkv_interleaved")
    if cls == "FalconAttention":
        dh, hq = m.head_dim, m.num_heads
        hkv = m.num_kv_heads if m.new_decoder_architecture else 1
        if rows != (hq + 2 * hkv) * dh:
            raise Refused(f"query_key_value has {rows} rows, not (Hq + 2 Hkv) x head_dim")
        layout = "qkv_grouped" if m.new_decoder_architecture else "qkv_blocks"
        return _found("attention", ctx, parts, (dh, hq, hkv), layout)
    raise Refused(f"fused query_key_value of {cls}: its head order is unknown to CM")


def _fused_blocks(ctx: Context) -> Found | None:
    """``[q; k; v]`` blocks in one weight: Phi-3 ``qkv_proj``, timm ``qkv``; and timm's
    ``AttentionPoolLatent`` (``q`` + ``kv`` = ``[k; v]``)."""
    m, cls = ctx.module, type(ctx.module).__name__
    mod = type(m).__module__
    if cls == "AttentionPoolLatent" and mod.startswith("timm."):
        q, kv, proj = (ctx.get(n).weight for n in ("q", "kv", "proj"))
        counts = _counts(ctx, q.shape[0], kv.shape[0] // 2, proj.shape[1], None)
        parts = [("q.weight", q), ("kv.weight", kv), ("proj.weight", proj)]
        return _found("attention", ctx, parts, counts, "q_kv")
    for fused, out, known in (("qkv_proj", "o_proj", cls == "Phi3Attention"),
                              ("qkv", "proj", mod.startswith("timm."))):  # fmt: skip
        w, o = ctx.get(fused), ctx.get(out)
        if not (isinstance(w, nn.Linear) and isinstance(o, nn.Linear)):
            continue
        if not known:
            raise Refused(f"fused {fused} of {cls}: its head order is unknown to CM")
        rows, o_cols = w.weight.shape[0], o.weight.shape[1]
        dh, hq, hkv = _counts(ctx, o_cols, (rows - o_cols) // 2, o_cols, None)
        if (hq + 2 * hkv) * dh != rows:
            raise Refused(f"{fused} has {rows} rows, not (Hq + 2 Hkv) x {dh}")
        parts = [(f"{fused}.weight", w.weight), (f"{out}.weight", o.weight)]
        return _found("attention", ctx, parts, (dh, hq, hkv), "qkv_blocks")
    return None


# How MLA's RoPE part is stepped: "mla" (a multi-query CM pair: every head's q_rope rows with
# the one shared k_pe block) or "mla_rope_muon" (those rows on Muon). Chosen by the measured
# comparison in bench/results/mla_rope.md (python bench/mla_rope.py).
MLA_LAYOUT = "mla"


def _mla(ctx: Context) -> Found | None:
    """DeepSeek-V2/V3 multi-head latent attention (transformers' ``DeepseekV{2,3}Attention``
    and models built like it): see ``layouts._mla`` for the pairs."""
    kv_b, kv_a = ctx.get("kv_b_proj"), ctx.get("kv_a_proj_with_mqa")
    if kv_b is None or kv_a is None:
        return None
    q_name = "q_b_proj" if ctx.get("q_b_proj") is not None else "q_proj"
    q, o = ctx.get(q_name), ctx.get("o_proj")
    if not all(isinstance(x, nn.Linear) for x in (q, kv_b, kv_a, o)):
        raise Refused("MLA without nn.Linear q_b_proj/q_proj, kv_b_proj, kv_a_proj_with_mqa and "
                      "o_proj")  # fmt: skip
    objs = (ctx.module,) if ctx.config is None else (ctx.module, ctx.config)
    sizes = {n: _attr(objs, (n,)) for n in ("qk_nope_head_dim", "qk_rope_head_dim",
                                           "v_head_dim", "kv_lora_rank")}  # fmt: skip
    hq = _attr(objs, ("num_heads", "num_attention_heads"))
    if hq is None or None in sizes.values():
        missing = [n for n, v in sizes.items() if v is None] + ([] if hq else ["num_heads"])
        raise Refused(f"MLA whose sizes cannot be read (no {', '.join(missing)})")
    nope, rope, dv, rank = (sizes[n] for n in sizes)
    want = {q_name: hq * (nope + rope), "kv_b_proj": hq * (nope + dv),
            "kv_a_proj_with_mqa": rank + rope}  # fmt: skip
    for name, rows in want.items():
        got = ctx.get(name).weight.shape[0]
        if got != rows:
            raise Refused(f"MLA's {name} has {got} rows, its config gives {rows}")
    if o.weight.shape[1] != hq * dv:
        raise Refused(f"MLA's o_proj has {o.weight.shape[1]} inputs, not {hq} x {dv}")
    parts = [(f"{q_name}.weight", q.weight), ("kv_b_proj.weight", kv_b.weight),
             ("o_proj.weight", o.weight)]  # fmt: skip
    if MLA_LAYOUT == "mla":
        parts.append(("kv_a_proj_with_mqa.weight", kv_a.weight))
    args = {"rope_dim": rope, "v_head_dim": dv, "kv_lora_rank": rank}
    found = _found("attention", ctx, parts, (nope, hq, hq), MLA_LAYOUT)
    found.layout_args = args
    return found


RECOGNIZERS: list[Recognizer] = [_mla, _multihead_attention, _gpt2, _query_key_value,
                                 _fused_blocks, _separate]  # fmt: skip


def register_recognizer(fn: Recognizer) -> None:
    """Try ``fn(ctx) -> Found | None`` before the built-in recognisers. ``ctx`` has
    ``name``, ``module``, ``modules`` (all modules by name) and ``config``; raise
    ``discovery.Refused(reason)`` to report a module CM cannot step."""
    RECOGNIZERS.insert(0, fn)


# -- routing of everything else ----------------------------------------------------------
def _output_head_ids(model: nn.Module, names: tuple[str, ...]) -> set[int]:
    ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            ids.update(id(p) for p in head.parameters())
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names:
            continue
        if _linear_like(module):
            ids.update(id(p) for p in module.parameters())
        elif leaf != "output":  # a container head (timm ClassifierHead): its linears
            for sub in module.modules():
                if _linear_like(sub):
                    ids.update(id(p) for p in sub.parameters())
    return ids


def _route(model: nn.Module, claimed: set[int], heads: set[int]) -> list[dict[str, Any]]:
    """Muon / AdamW groups for every trainable parameter not claimed by CM."""
    buckets: dict[str, list] = {"matrix": [], "matrix_t": [], "experts": [], "experts_t": [],
                                "adamw": []}  # fmt: skip
    seen: set[int] = set()
    for _, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p is None or not p.requires_grad or id(p) in seen or id(p) in claimed:
                continue
            seen.add(id(p))
            buckets[_bucket(module, pname, p, heads)].append(p)
    groups = []
    for b, ps in buckets.items():
        if not ps:
            continue
        if b == "adamw":
            groups.append({"kind": "adamw", "params": ps})
        else:
            groups.append({"kind": "muon", "params": ps, "shape": b})
    return groups


def _bucket(module: nn.Module, pname: str, p: nn.Parameter, heads: set[int]) -> str:
    if p.ndim < 2 or id(p) in heads or "bias" in pname.lower():
        return "adamw"
    if isinstance(module, nn.Embedding) or isinstance(module, nn.EmbeddingBag):
        return "adamw"
    if pname == "weight" and _linear_like(module):
        return "matrix_t" if _is_conv1d(module) else "matrix"
    if pname == "weight" and isinstance(module, nn.modules.conv._ConvNd):
        return "matrix"  # Muon on (out, in * kernel)
    # A bare parameter: a table, a matrix, or a stack of expert matrices.
    if TABLE_NAME.search(pname) or (p.ndim >= 3 and p.shape[0] == 1):
        return "adamw"
    if p.ndim == 2:
        return "matrix"
    transposed = getattr(module, "is_transposed", False) is True  # transformers' MoE experts
    return "experts_t" if transposed else "experts"


# -- the entry point ----------------------------------------------------------------------
def _config_of(name: str, modules: dict[str, nn.Module]) -> Any:
    """The ``config`` of the module or of its nearest ancestor (transformers models)."""
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        cfg = getattr(modules.get(".".join(parts[:i])), "config", None)
        if cfg is not None and not isinstance(cfg, (int, float, str, bool)):
            return cfg
    return None


def _unhandled(kind: str, name: str, module: nn.Module, reason: str, mode: str) -> None:
    msg = (f"{kind} {name!r} ({type(module).__name__}) looks like attention, but CM does not "
           f"step it: {reason}. Its matrices go to Muon.")  # fmt: skip
    if mode == "raise":
        raise ValueError(msg)
    if mode == "warn":
        warnings.warn(msg, UnhandledAttentionWarning, stacklevel=3)


def param_groups(
    model: nn.Module,
    *,
    head_dim: int | None = None,
    output_heads: tuple[str, ...] = OUTPUT_HEAD_NAMES,
    attention: bool = True,
    unrecognised: str = "warn",
    **options: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``CompositionalMuon``: every trainable parameter in exactly one group.

    ``options`` are CM flags applied to every attention group (``method="joint"``, ...).
    ``attention=False`` finds no attention: its matrices go to Muon (the plain-Muon baseline).
    ``unrecognised``: what to do with a module that looks like attention but is not taken:
    ``"warn"`` (``UnhandledAttentionWarning``), ``"raise"`` (ValueError) or ``"ignore"``.
    ``head_dim``: used only for modules whose head size cannot be read.
    """
    check_cm_keys(options)
    if unrecognised not in ("warn", "raise", "ignore"):
        raise ValueError(f"unrecognised must be 'warn', 'raise' or 'ignore', got {unrecognised!r}")
    modules = dict(model.named_modules())
    groups: list[dict[str, Any]] = []
    claimed: set[int] = set()
    recognised: list[str] = []
    seen: Counter = Counter()  # what CM steps, per (class, layout, sizes)
    frozen: Counter = Counter()  # attention whose weights are all frozen, per class

    def add(kind: str, params: list, found: Found, name: str, extra: dict) -> str | None:
        """Append the group and return its label, or log why it is not stepped."""
        trainable = [p.requires_grad for p in params]
        if not all(trainable):  # its trainable weights fall through to Muon/AdamW, so each
            if any(trainable):  # lands in exactly one group
                log.info("cm_triton: %s: part of its %s pair is frozen, so CM does not step "
                         "the pair; its trainable weights go to Muon", name,
                         extra.get("layout", kind))  # fmt: skip
            return None
        groups.append({"kind": kind, "params": params, "head_dim": found.head_dim,
                       "module": name, **extra, **options})  # fmt: skip
        claimed.update(id(p) for p in params)
        return extra.get("layout", kind)

    for name, module in modules.items() if attention else ():
        ctx = Context(name, module, modules, _config_of(name, modules), head_dim)
        found = None
        for recognise in RECOGNIZERS:
            try:
                found = recognise(ctx)
            except Refused as e:
                _unhandled("module", name, module, str(e), unrecognised)
                recognised.append(name)  # reported: not reported again as a look-alike
                break
            if found is not None:
                break
        if found is None or any(id(p) in claimed for p in found.params):
            continue
        recognised.append(name)
        if found.kind == "qk+ov":
            q, k, v, o = found.params
            stepped = [add("qk", [q, k], found, name, {}), add("ov", [v, o], found, name, {})]
        elif found.kind == "mha":
            stepped = [add("mha", found.params, found, name, {})]
        else:
            counts = {"layout": found.layout, "num_heads": found.num_heads,
                      "num_kv_heads": found.num_kv_heads}  # fmt: skip
            if found.layout_args:
                counts["layout_args"] = dict(found.layout_args)
            stepped = [add("attention", found.params, found, name, counts)]
        label = "+".join(s for s in stepped if s)
        if label:
            seen[(type(module).__name__, label, found.head_dim, found.num_heads,
                  found.num_kv_heads)] += 1  # fmt: skip
        elif not any(p.requires_grad for p in found.params):
            frozen[type(module).__name__] += 1

    if attention:
        _report_lookalikes(modules, recognised, claimed, unrecognised)
    for (cls, layout, dh, hq, hkv), n in seen.items():
        log.info("cm_triton: %d x %s: layout %s, head_dim %d, %d query / %d KV heads",
                 n, cls, layout, dh, hq, hkv)  # fmt: skip
    for cls, n in frozen.items():
        log.info("cm_triton: %d x %s: attention found, its weights are frozen: nothing to step",
                 n, cls)  # fmt: skip
    _log_adapters(modules)
    groups += _route(model, claimed, _output_head_ids(model, output_heads))
    return groups


def _log_adapters(modules: dict[str, nn.Module]) -> None:
    """Say where adapters' trainable matrices (PEFT's ``lora_A``/``lora_B``) go, and why."""
    n_layers, n_mats = 0, 0
    for module in modules.values():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, nn.Module):
            continue
        own = {id(p) for p in base.parameters()}
        mats = [p for p in module.parameters() if id(p) not in own and p.requires_grad
                and p.ndim >= 2]  # fmt: skip
        n_layers, n_mats = n_layers + bool(mats), n_mats + len(mats)
    if n_mats:
        log.info("cm_triton: %d adapter matrices (e.g. LoRA's lora_A/lora_B) of %d wrapped "
                 "layers go to Muon: they are low-rank factors of one layer's update, not "
                 "attention heads that CM pairs", n_mats, n_layers)  # fmt: skip


def _report_lookalikes(
    modules: dict[str, nn.Module], recognised: list[str], claimed: set[int], mode: str
) -> None:
    """Warn for modules named like attention that hold matrices CM did not take."""
    for name, module in modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if not (LOOKS_LIKE_ATTENTION.search(type(module).__name__) or
                LOOKS_LIKE_ATTENTION.search(leaf)):  # fmt: skip
            continue
        if any(r == name or r.startswith(name + ".") or name.startswith(r + ".")
               for r in recognised if r or name):  # fmt: skip
            continue
        mats = [p for p in module.parameters() if p.ndim >= 2 and p.requires_grad]
        if mats and not any(id(p) in claimed for p in mats):
            _unhandled("module", name, module, "no recogniser matches its layout", mode)
