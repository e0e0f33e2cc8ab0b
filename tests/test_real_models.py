"""Real models (transformers 5, timm, torch.nn), built tiny from configs: param_groups finds
every attention layout, pairs its heads correctly (a gauge check in float64, through the
groups' own head views), warns about what it does not take, and the optimizer trains them.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import pytest
import torch
from helpers import optional
from real_models import FAMILIES, apply_gauge, forward, gauge_diff

from cm_triton import CompositionalMuon, param_groups
from cm_triton.discovery import UnhandledAttentionWarning

optional("transformers")
optional("timm")

ATTENTION = ("qk", "ov", "mha", "attention")


def _groups(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = param_groups(model, **kw)
    unhandled = [str(w.message) for w in caught
                 if issubclass(w.category, UnhandledAttentionWarning)]  # fmt: skip
    return groups, unhandled


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    name = request.param
    fam = FAMILIES[name]
    torch.manual_seed(0)
    return name, fam, fam.build()


def test_param_groups_find_every_layout_and_nothing_is_silent(family, caplog):
    name, fam, model = family
    with caplog.at_level(logging.INFO, logger="cm_triton"):
        groups, unhandled = _groups(model)
    # every trainable parameter in exactly one group
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    found = Counter((g["kind"], g.get("layout")) for g in groups if g["kind"] in ATTENTION)
    assert found == Counter(fam.attention), name
    # what CM does not take is reported, naming the module; nothing else is
    assert len(unhandled) == len([m for m in unhandled if any(u in m for u in fam.unhandled)])
    for u in fam.unhandled:
        assert any(f".{u}'" in m for m in unhandled), (u, unhandled)
    if fam.attention:
        assert "cm_triton:" in caplog.text and "head_dim" in caplog.text
    if fam.unhandled:
        with pytest.raises(ValueError, match="looks like attention"):
            param_groups(model, unrecognised="raise")


def test_gauge_through_the_head_views_leaves_the_model_unchanged(family):
    # (Q_h, K_g) -> (A^T Q_h, A^-1 K_g) and (V_g, O_h) -> (B V_g, O_h B^-1), one A, B per KV
    # group, applied through the groups' head views. In float64 the output then changes only
    # by rounding: ~1e-16 relative per op, a few hundred ops deep -> ~1e-14 of the output's
    # magnitude; a wrong head_dim, head count, group or layout changes it by O(1) (checked by
    # test_a_wrong_layout_breaks_the_gauge). Bound: 1e-10 relative.
    name, fam, _ = family
    if not fam.attention:
        pytest.skip(f"{name}: no attention CM can step")
    diff, scale = gauge_diff(name)
    assert diff <= 1e-10 * max(scale, 1.0), (name, diff, scale)


def test_a_wrong_layout_breaks_the_gauge():
    # The check can fail: read GPT-NeoX's per-head interleaved q/k/v as [q; k; v] blocks.
    fam = FAMILIES["gpt_neox"]
    torch.manual_seed(0)
    model = fam.build().double().eval()
    groups, _ = _groups(model)
    wrong = [dict(g, layout="qkv_blocks") if g["kind"] == "attention" else g for g in groups]
    inputs = fam.inputs(model)
    before = forward(model, inputs)
    apply_gauge(model, wrong, fam)
    assert (forward(model, inputs) - before).abs().max() > 1e-3


def _loss(fam, model, target_seed=0):
    out = forward(model, fam.inputs(model))
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(target_seed))
    return (out.float() - target).square().mean()


def test_twenty_steps_train(family):
    name, fam, model = family
    model.train()
    groups, _ = _groups(model)
    opt = CompositionalMuon(groups, lr=0.01, adamw_lr=3e-3)
    losses = []
    for _ in range(20):
        loss = _loss(fam, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], (name, losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _group_of(groups, p):
    return next(g for g in groups if any(q is p for q in g["params"]))


def test_routing_of_everything_that_is_not_attention():
    def build(name):
        torch.manual_seed(0)
        model = FAMILIES[name].build()
        return model, _groups(model)[0]

    model, groups = build("mixtral")  # 3-D expert stacks (E, out, in): one Muon sign each
    experts = model.model.layers[0].mlp.experts
    assert _group_of(groups, experts.gate_up_proj).get("shape") == "experts"
    assert _group_of(groups, model.lm_head.weight)["kind"] == "adamw"
    model, groups = build("gpt_oss")  # stored (E, in, out); 2-D expert biases to AdamW
    experts = model.model.layers[0].mlp.experts
    assert _group_of(groups, experts.gate_up_proj).get("shape") == "experts_t"
    assert _group_of(groups, experts.gate_up_proj_bias)["kind"] == "adamw"
    assert _group_of(groups, model.model.layers[0].self_attn.sinks)["kind"] == "adamw"
    model, groups = build("bert")  # "output" in a name is not an output head
    layer = model.bert.encoder.layer[0]
    assert _group_of(groups, layer.attention.output.dense.weight)["kind"] == "ov"
    assert _group_of(groups, layer.output.dense.weight)["kind"] == "muon"
    model, groups = build("gpt2")  # Conv1D stored (in, out)
    assert _group_of(groups, model.transformer.h[0].mlp.c_fc.weight).get("shape") == "matrix_t"
    model, groups = build("timm_vit")  # (1, n, d) tables are embeddings, not matrices
    for p in (model.cls_token, model.pos_embed, model.reg_token, model.head.weight):
        assert _group_of(groups, p)["kind"] == "adamw"
