"""Attention layouts: where each factor's heads sit inside a model's parameters.

CM needs, per attention module, the heads of q, k, v (row blocks ``(H, dh, d)``) and of o
(its column blocks, transposed: ``(Hq, dh, d)``). Models store them in many ways: four
``nn.Linear``s, one fused ``[q; k; v]`` weight, per-head interleaving ``[q_h; k_h; v_h]``,
grouped ``[q_g1..q_gG; k_g; v_g]``, a gate beside each query head, transposed storage
(GPT-2's ``Conv1D``). A ``Layout`` says it declaratively, as strided *views* of the one
parameter: CM reads and writes fused weights in place, and each parameter keeps one
momentum buffer.

A ``Heads`` entry: the stored 2-D parameter's ``axis`` that runs over heads is viewed as
``shape`` (last entry ``dh``) and indexed by ``index`` (ints and slices), leaving
``(*heads, dh, width)``. Every index of every parameter's head axis must be covered exactly
once by the layout's factors and its ``muon`` extras (rows CM does not pair, stepped by Muon,
e.g. the output gates of Qwen3-Next's ``q_proj``); ``Layout.check`` enforces that.

Register your own with ``register_layout(name, factory)``; ``factory(hq, hkv, dh)`` returns a
``Layout``. Example, a model storing ``[k; q; v]`` in one weight::

    from cm_triton.layouts import Heads, Layout, register_layout

    def kqv(hq, hkv, dh):
        rows = (hkv + hq + hkv, dh)
        return Layout(
            q=Heads(0, 0, rows, (slice(hkv, hkv + hq),)),
            k=Heads(0, 0, rows, (slice(0, hkv),)),
            v=Heads(0, 0, rows, (slice(hkv + hq, None),)),
            o=Heads(1, 1, (hq, dh), ()),  # out_proj's columns
        )

    register_layout("kqv_fused", kqv)
    # then a param group: {"kind": "attention", "layout": "kqv_fused",
    #   "params": [fused.weight, out_proj.weight], "head_dim": dh, "num_heads": hq,
    #   "num_kv_heads": hkv}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Heads",
    "Pair",
    "Layout",
    "LAYOUTS",
    "register_layout",
    "get_layout",
]

Index = tuple  # of int | slice


@dataclass(frozen=True)
class Heads:
    """One factor's heads inside parameter ``param`` of a group (see the module docstring)."""

    param: int
    axis: int
    shape: tuple[int, ...]
    index: Index = ()

    def view(self, w: Tensor) -> Tensor:
        """``(..., R, C)`` stored parameter(s) -> ``(..., *heads, dh, width)``, a view."""
        lead = w.dim() - 2
        if self.axis == 1:
            w = w.transpose(-1, -2)
        w = w.unflatten(-2, self.shape)
        return w[(slice(None),) * lead + tuple(self.index)]

    def heads(self, w: Tensor) -> Tensor:
        """``(..., R, C) -> (..., H, dh, width)``: the heads in one axis (a copy only when a
        grouped layout's heads are not one stride apart)."""
        v = self.view(w)
        lead = w.dim() - 2
        return v.reshape(*v.shape[:lead], -1, *v.shape[-2:])

    def write(self, w: Tensor, value: Tensor) -> None:
        """Write ``value (..., H, dh, width)`` into ``w``'s heads in place."""
        v = self.view(w)
        v.copy_(value.reshape(v.shape))

    @property
    def whole(self) -> bool:
        """Whether this entry's heads are its parameter's whole head axis, in order."""
        return self.index == ()

    def unview(self, value: Tensor) -> Tensor:
        """The inverse of ``heads`` for a ``whole`` entry: ``(..., H, dh, width)`` -> the stored
        ``(..., R, C)`` form, a view of ``value`` (o's columns: a transposed one)."""
        x = value.flatten(-3, -2)
        return x.transpose(-1, -2) if self.axis == 1 else x


@dataclass(frozen=True)
class Pair:
    """One CM pair of a layout: ``kind`` ``"qk"`` or ``"ov"`` (the rule's hybrid O sign
    applies to ``"ov"`` only), ``p`` the per-query factor (q, or o's transposed columns) and
    ``s`` the shared one (k or v); ``name`` labels its entries (``"qk"``, ``"ov"``, ``"qk_rope"``).
    """

    name: str
    kind: str
    p: Heads
    s: Heads


@dataclass(frozen=True)
class Layout:
    """Where q, k, v and o heads sit in a group's parameters, plus Muon-stepped extras.

    ``extra``: further QK pairs beyond ``q``/``k`` (MLA's RoPE part: every head's ``q_rope``
    rows with the one ``k_pe`` block that all heads share, a multi-query pair).
    """

    q: Heads | None = None
    k: Heads | None = None
    v: Heads | None = None
    o: Heads | None = None
    muon: tuple[Heads, ...] = field(default=())
    extra: tuple[Pair, ...] = field(default=())

    @property
    def pairs(self) -> tuple[Pair, ...]:
        """The CM pairs this layout holds: ``"qk"`` and/or ``"ov"``, then ``extra``."""
        out: tuple[Pair, ...] = ()
        if self.q is not None and self.k is not None:
            out += (Pair("qk", "qk", self.q, self.k),)
        if self.v is not None and self.o is not None:
            out += (Pair("ov", "ov", self.o, self.v),)
        return out + self.extra

    def entries(self) -> list[tuple[str, Heads]]:
        named = [(n, getattr(self, n)) for n in ("q", "k", "v", "o")]
        for pair in self.extra:
            p_role, s_role = ("q", "k") if pair.kind == "qk" else ("o", "v")
            named += [(f"{pair.name}.{p_role}", pair.p), (f"{pair.name}.{s_role}", pair.s)]
        named += [(f"muon[{i}]", h) for i, h in enumerate(self.muon)]
        return [(n, h) for n, h in named if h is not None]

    def check(self, shapes: Sequence[torch.Size], name: str = "layout") -> None:
        """Raise ValueError unless every parameter's head axis is covered exactly once."""
        if not self.pairs:
            raise ValueError(f"{name}: a layout needs q and k, or v and o")
        cover = [None] * len(shapes)
        for role, h in self.entries():
            if not 0 <= h.param < len(shapes):
                raise ValueError(f"{name}: {role} names parameter {h.param} of {len(shapes)}")
            shape = shapes[h.param]
            if len(shape) != 2 or h.axis not in (0, 1):
                raise ValueError(f"{name}: {role} needs a 2-D parameter, got {tuple(shape)}")
            n = shape[h.axis]
            if cover[h.param] is None:
                cover[h.param] = torch.zeros(n, dtype=torch.int64)
            try:
                cover[h.param].unflatten(0, h.shape)[tuple(h.index)] += 1
            except (RuntimeError, IndexError) as e:
                raise ValueError(
                    f"{name}: {role} views axis {h.axis} of parameter {h.param} "
                    f"({tuple(shape)}) as {h.shape}: {e}"
                ) from None
        for i, c in enumerate(cover):
            if c is None:
                raise ValueError(f"{name}: parameter {i} {tuple(shapes[i])} holds no heads")
            if not bool((c == 1).all()):
                what = "twice" if bool((c > 1).any()) else "by nothing"
                raise ValueError(f"{name}: part of parameter {i}'s head axis is covered {what}")


LayoutFactory = Callable[..., Layout]
LAYOUTS: dict[str, LayoutFactory] = {}


def register_layout(name: str, factory: LayoutFactory) -> None:
    """Make ``factory(hq, hkv, dh, **layout_args) -> Layout`` available to groups as
    ``"layout": name`` (``layout_args``: the group's ``"layout_args"`` dict, for layouts whose
    sizes three numbers do not fix, as MLA's)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"layout name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"layout factory for {name!r} must be callable")
    LAYOUTS[name] = factory


def get_layout(name: str, hq: int, hkv: int, dh: int, **layout_args: object) -> Layout:
    """The registered layout ``name`` for ``hq`` query heads, ``hkv`` KV heads of size ``dh``
    (and the layout's own ``layout_args``)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown attention layout {name!r}; registered: {sorted(LAYOUTS)}")
    try:
        return LAYOUTS[name](hq, hkv, dh, **layout_args)
    except TypeError as e:
        raise ValueError(f"layout {name!r}: bad 'layout_args' {layout_args!r}: {e}") from None


# -- built-in layouts -------------------------------------------------------------------
ALL = slice(None)


def _separate(hq: int, hkv: int, dh: int) -> Layout:
    """``[q_w, k_w, v_w, o_w]``: four nn.Linear weights (Llama, BERT, T5, OPT, ...)."""
    return Layout(q=Heads(0, 0, (hq, dh)), k=Heads(1, 0, (hkv, dh)), v=Heads(2, 0, (hkv, dh)),
                  o=Heads(3, 1, (hq, dh)))  # fmt: skip


def _qk(hq: int, hkv: int, dh: int) -> Layout:
    return Layout(q=Heads(0, 0, (hq, dh)), k=Heads(1, 0, (hkv, dh)))


def _ov(hq: int, hkv: int, dh: int) -> Layout:
    return Layout(v=Heads(0, 0, (hkv, dh)), o=Heads(1, 1, (hq, dh)))


def _blocks(axis: int, o_axis: int) -> LayoutFactory:
    def factory(hq: int, hkv: int, dh: int) -> Layout:
        rows = (hq + 2 * hkv, dh)
        return Layout(
            q=Heads(0, axis, rows, (slice(0, hq),)),
            k=Heads(0, axis, rows, (slice(hq, hq + hkv),)),
            v=Heads(0, axis, rows, (slice(hq + hkv, None),)),
            o=Heads(1, o_axis, (hq, dh)),
        )

    factory.__doc__ = "``[W_qkv, o]`` with ``[q; k; v]`` blocks along the fused axis."
    return factory


def _q_kv(axis: int, o_axis: int) -> LayoutFactory:
    def factory(hq: int, hkv: int, dh: int) -> Layout:
        kv = (2 * hkv, dh)
        return Layout(
            q=Heads(0, axis, (hq, dh)),
            k=Heads(1, axis, kv, (slice(0, hkv),)),
            v=Heads(1, axis, kv, (slice(hkv, None),)),
            o=Heads(2, o_axis, (hq, dh)),
        )

    factory.__doc__ = "``[q_w, W_kv, o]`` with ``[k; v]`` blocks in the fused weight."
    return factory


def _interleaved(hq: int, hkv: int, dh: int) -> Layout:
    """GPT-NeoX / Pythia ``query_key_value``: per head ``[q_h; k_h; v_h]`` (MHA only)."""
    if hq != hkv:
        raise ValueError(f"per-head interleaved q/k/v needs Hq == Hkv, got {hq} and {hkv}")
    rows = (hq, 3, dh)
    return Layout(q=Heads(0, 0, rows, (ALL, 0)), k=Heads(0, 0, rows, (ALL, 1)),
                  v=Heads(0, 0, rows, (ALL, 2)), o=Heads(1, 1, (hq, dh)))  # fmt: skip


def _grouped(hq: int, hkv: int, dh: int) -> Layout:
    """Falcon's fused GQA: per KV group ``[q_g1 .. q_gG; k_g; v_g]``."""
    g = hq // hkv
    rows = (hkv, g + 2, dh)
    return Layout(q=Heads(0, 0, rows, (ALL, slice(0, g))), k=Heads(0, 0, rows, (ALL, g)),
                  v=Heads(0, 0, rows, (ALL, g + 1)), o=Heads(1, 1, (hq, dh)))  # fmt: skip


def _gated(hq: int, hkv: int, dh: int) -> Layout:
    """Qwen3-Next / Qwen3.5 ``q_proj``: per head ``[query_h; gate_h]``; the gate rows feed a
    sigmoid on the attention output, not the scores: Muon steps them."""
    rows = (hq, 2, dh)
    return Layout(q=Heads(0, 0, rows, (ALL, 0)), k=Heads(1, 0, (hkv, dh)),
                  v=Heads(2, 0, (hkv, dh)), o=Heads(3, 1, (hq, dh)),
                  muon=(Heads(0, 0, rows, (ALL, 1)),))  # fmt: skip


def _mla(rope: str) -> LayoutFactory:
    def factory(hq: int, hkv: int, dh: int, *, rope_dim: int, v_head_dim: int,
                kv_lora_rank: int) -> Layout:  # fmt: skip
        if hq != hkv:
            raise ValueError(f"MLA expands a key and a value per query head: Hq == Hkv, got "
                             f"{hq} and {hkv}")  # fmt: skip
        q_rows, kv_rows = (hq, dh + rope_dim), (hq, dh + v_head_dim)
        q_rope = Heads(0, 0, q_rows, (ALL, slice(dh, None)))
        latent_rows = (1, kv_lora_rank + rope_dim)  # kv_a_proj_with_mqa: [latent; k_pe]
        k_pe = Heads(3, 0, latent_rows, (ALL, slice(kv_lora_rank, None)))
        base = dict(
            q=Heads(0, 0, q_rows, (ALL, slice(0, dh))),
            k=Heads(1, 0, kv_rows, (ALL, slice(0, dh))),
            v=Heads(1, 0, kv_rows, (ALL, slice(dh, None))),
            o=Heads(2, 1, (hq, v_head_dim)),
        )
        if rope == "muon":  # kv_a_proj_with_mqa is then an ordinary Muon matrix, not here
            return Layout(**base, muon=(q_rope,))
        latent = Heads(3, 0, latent_rows, (ALL, slice(0, kv_lora_rank)))
        return Layout(**base, muon=(latent,), extra=(Pair("qk_rope", "qk", q_rope, k_pe),))

    factory.__doc__ = (
        "DeepSeek-V2/V3 multi-head latent attention, ``[q, kv_b_proj, o_proj"
        + ("" if rope == "muon" else ", kv_a_proj_with_mqa")
        + "]`` (q: ``q_b_proj`` or ``q_proj``). Per head h, q's rows are ``[q_nope,h; q_rope,h]`` "
        "and kv_b_proj's ``[k_nope,h; v_h]`` (input: the kv latent). The logits' no-RoPE part "
        "``q_nope,h^T k_nope,h`` is the ``qk`` pair (``head_dim`` = qk_nope_head_dim; the "
        "factors' widths differ: the q latent and the kv latent), ``v_h`` with o's column block "
        "h the ``ov`` pair. "
        + ("The RoPE rows ``q_rope,h`` go to Muon (one matrix)."
           if rope == "muon" else
           "The RoPE part pairs every ``q_rope,h`` with the one ``k_pe`` block of "
           "kv_a_proj_with_mqa (a multi-query pair, ``extra``); the latent rows of "
           "kv_a_proj_with_mqa (a down-projection) go to Muon.")
    )  # fmt: skip
    return factory


for _name, _factory in {
    "qk": _qk,
    "ov": _ov,
    "separate": _separate,
    "qkv_blocks": _blocks(0, 1),  # nn.MultiheadAttention in_proj, Phi-3 qkv_proj, timm qkv
    "qkv_blocks_t": _blocks(1, 0),  # GPT-2 Conv1D: c_attn (d, 3d), c_proj (Hq*dh, d)
    "q_kv": _q_kv(0, 1),  # timm AttentionPoolLatent: q, kv, proj
    "q_kv_t": _q_kv(1, 0),  # GPT-2 cross-attention: q_attn, c_attn (k; v), c_proj (Conv1D)
    "qkv_interleaved": _interleaved,
    "qkv_grouped": _grouped,
    "gated_q": _gated,
    "mla": _mla("cm"),  # DeepSeek-V2/V3: the RoPE part a multi-query CM pair
    "mla_rope_muon": _mla("muon"),  # ... or the RoPE rows on Muon
}.items():
    register_layout(_name, _factory)
