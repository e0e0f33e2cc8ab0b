"""Multi-head latent attention (DeepSeek-V2/V3): the ``"mla"`` layout steps exactly its pairs.

Per head h, q's rows are ``[q_nope,h; q_rope,h]`` and kv_b_proj's ``[k_nope,h; v_h]``; the
RoPE key ``k_pe`` is one block of kv_a_proj_with_mqa that all heads share. The layout steps
the no-RoPE QK pair and the OV pair per head, the RoPE part as a multi-query QK pair, and the
latent rows of kv_a_proj_with_mqa with Muon. The tests: one MLA group's step equals the same
pairs built as separate ``"qk"``/``"ov"``/``"muon"`` groups from copies of those rows; a wrong
reading of the rows breaks the gauge check; the optimizer trains the real models sharded
with FSDP2 as in one process.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from dist_harness import get_pool
from real_models import FAMILIES, apply_gauge, forward
from torch import nn

from cm_triton import CompositionalMuon, discovery, param_groups
from cm_triton.layouts import Layout, get_layout, register_layout

H, NOPE, ROPE, DV, RANK, WQ, D = 4, 8, 4, 8, 16, 32, 24


def _mla_params(gen: torch.Generator) -> list[nn.Parameter]:
    shapes = [(H * (NOPE + ROPE), WQ), (H * (NOPE + DV), RANK), (D, H * DV), (RANK + ROPE, D)]
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]


def _split(q, kv_b, o, kv_a):
    """The MLA tensors' pieces as separate contiguous matrices (any tensors of MLA's shapes)."""
    qh, kvh = q.view(H, NOPE + ROPE, -1), kv_b.view(H, NOPE + DV, -1)
    return dict(
        q_nope=qh[:, :NOPE].reshape(H * NOPE, -1), k_nope=kvh[:, :NOPE].reshape(H * NOPE, -1),
        q_rope=qh[:, NOPE:].reshape(H * ROPE, -1), k_pe=kv_a[RANK:],
        v=kvh[:, NOPE:].reshape(H * DV, -1), o=o, latent=kv_a[:RANK],
    )  # fmt: skip


FLAGS = {"defaults": {}, "per_head_o_nesterov": {"hybrid": False, "nesterov": True},
         "frobenius_isotropic": {"connection": "frobenius", "isotropic": True}}  # fmt: skip


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_an_mla_group_steps_exactly_its_three_pairs_and_the_latent(flags):
    gen = torch.Generator().manual_seed(0)
    mla = [_mla_params(gen) for _ in range(2)]  # two layers: one batch
    sep = [{k: nn.Parameter(v.detach().clone()) for k, v in _split(*ps).items()} for ps in mla]
    groups = [{"kind": "attention", "layout": "mla", "params": ps, "head_dim": NOPE,
               "num_heads": H, "num_kv_heads": H,
               "layout_args": {"rope_dim": ROPE, "v_head_dim": DV, "kv_lora_rank": RANK}}
              for ps in mla]  # fmt: skip
    twins = []
    for s in sep:
        twins += [{"kind": "qk", "params": [s["q_nope"], s["k_nope"]], "head_dim": NOPE},
                  {"kind": "qk", "params": [s["q_rope"], s["k_pe"]], "head_dim": ROPE},
                  {"kind": "ov", "params": [s["v"], s["o"]], "head_dim": NOPE},
                  {"kind": "muon", "params": [s["latent"]]}]  # fmt: skip
    opt_mla = CompositionalMuon(groups, lr=0.05, **flags)
    opt_sep = CompositionalMuon(twins, lr=0.05, **flags)
    for _ in range(3):
        for ps, s in zip(mla, sep):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            for k, g in _split(*(p.grad for p in ps)).items():
                s[k].grad = g.clone()
        opt_mla.step()
        opt_sep.step()
    # fp64; the two runs compute the same products on the same values, stored contiguously
    # or as strided views: only the summation order inside a matmul may differ, ~1e-16
    # relative per product, a few hundred products deep: 1e-12 leaves a wide margin, while a
    # misread row is O(1).
    for ps, s in zip(mla, sep):
        for k, got in _split(*(p.detach() for p in ps)).items():
            want = s[k].detach()
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), k


def _kv_swapped(hq, hkv, dh, *, rope_dim, v_head_dim, kv_lora_rank):
    """A deliberately wrong MLA reading: keys taken from the value rows and vice versa."""
    right = get_layout("mla", hq, hkv, dh, rope_dim=rope_dim, v_head_dim=v_head_dim,
                       kv_lora_rank=kv_lora_rank)  # fmt: skip
    return Layout(q=right.q, k=right.v, v=right.k, o=right.o, muon=right.muon, extra=right.extra)


def _gauge_change(name: str, layout: str | None = None) -> tuple[float, float]:
    fam = FAMILIES[name]
    torch.manual_seed(0)
    model = fam.build().double().eval()
    groups = param_groups(model, unrecognised="raise")
    if layout is not None:
        groups = [dict(g, layout=layout) if g.get("layout") == "mla" else g for g in groups]
    ids = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))}
    before = forward(model, ids)
    apply_gauge(model, groups, fam)
    return (forward(model, ids) - before).abs().max().item(), before.abs().max().item()


def test_a_wrong_mla_reading_breaks_the_gauge():
    # The check can fail: with k and v rows swapped (equal sizes in the tiny config) the
    # gauge no longer leaves the composed maps alone.
    register_layout("mla_kv_swapped_test", _kv_swapped)
    diff, scale = _gauge_change("deepseek_v3", "mla_kv_swapped_test")
    assert diff > 1e-3 * scale
    diff, scale = _gauge_change("deepseek_v3")
    assert diff <= 1e-10 * max(scale, 1.0)  # the bound of test_real_models' gauge check


def test_the_rope_part_as_muon_is_the_other_layout(monkeypatch):
    monkeypatch.setattr(discovery, "MLA_LAYOUT", "mla_rope_muon")
    torch.manual_seed(0)
    model = FAMILIES["deepseek_v2"].build()
    groups = param_groups(model, unrecognised="raise")
    attn = model.model.layers[0].self_attn
    kind = {id(p): (g["kind"], g.get("layout")) for g in groups for p in g["params"]}
    assert kind[id(attn.q_b_proj.weight)] == ("attention", "mla_rope_muon")
    assert kind[id(attn.kv_a_proj_with_mqa.weight)] == ("muon", None)
    opt = CompositionalMuon(groups, lr=0.01)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_mla_groups_name_the_problem():
    gen = torch.Generator().manual_seed(0)
    ps = _mla_params(gen)
    before = [p.detach().clone() for p in ps]
    args = {"rope_dim": ROPE, "v_head_dim": DV, "kv_lora_rank": RANK}
    group = {"kind": "attention", "layout": "mla", "params": ps, "head_dim": NOPE,
             "num_heads": H, "num_kv_heads": H, "layout_args": args}  # fmt: skip
    CompositionalMuon([dict(group)])
    for change, match in (({"layout_args": {}}, "bad 'layout_args'"),
                          ({"layout_args": [1]}, "'layout_args' must be a dict"),
                          ({"layout_args": args | {"rope_dim": 5}}, "views axis 0"),
                          ({"num_kv_heads": 2}, "Hq == Hkv"),
                          ({"method": "joint"}, r"qk: method='joint'.*\(32 vs 16\)")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CompositionalMuon([dict(group, **change)])
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


# -- FSDP2 --------------------------------------------------------------------------------
def case_mla_fsdp2(name: str) -> float:
    """The same gradients on a tiny DeepSeek model and its FSDP2-sharded copy: the largest
    difference of any parameter after two steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    ref = FAMILIES[name].build()
    sharded = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLA is understood: nothing to warn about
        opt_ref = CompositionalMuon(param_groups(ref), lr=0.02)
        opt = CompositionalMuon(param_groups(sharded), lr=0.02)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p, q in zip(ref.parameters(), sharded.parameters()):
            full = torch.randn(p.shape, generator=gen)
            p.grad = full.clone()
            q.grad = DTensor.from_local(full[_rows(full.shape[0])].clone(), mesh, q.placements)
        opt_ref.step()
        opt.step()
    assert opt.comm.plans["gather"] == 1  # the last step's plans: one batch, both MLA layers
    return max((p - q.full_tensor()).abs().max().item()
               for p, q in zip(ref.parameters(), sharded.parameters()))  # fmt: skip


def _rows(n: int) -> slice:
    world, rank = dist.get_world_size(), dist.get_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return slice(start, min(start + chunk, n))


@pytest.mark.parametrize("world", [2, 4])
def test_mla_on_fsdp2_steps_as_one_process(world):
    # MLA groups take the gather plan (their layout has Muon rows): the single-process step
    # on gathered tensors, so the result is bit for bit; Muon and AdamW plans are exact too.
    for diff in get_pool(world).run(case_mla_fsdp2, "deepseek_v3"):
        assert diff == 0.0


# -- tensor parallel, FSDP2 x TP ------------------------------------------------------------
def case_mla_parallel(layout: str) -> tuple[float, dict]:
    """A tiny DeepSeek-V2-Lite (MLA: q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) with its
    attention tensor-parallel (q_proj and kv_b_proj by heads, o_proj by columns) and, for
    ``"fsdp_tp"``, FSDP2 over it: the largest difference from one process after two steps."""
    from test_parallel import _full, _like
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    ref = FAMILIES["deepseek_v2_lite"].build()
    par = copy.deepcopy(ref)
    world = dist.get_world_size()
    shape, names = ((world,), ("tp",)) if layout == "tp" else ((2, world // 2), ("dp", "tp"))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    plan = {"q_proj": ColwiseParallel(), "kv_b_proj": ColwiseParallel(),
            "o_proj": RowwiseParallel()}  # fmt: skip
    for layer in par.model.layers:
        parallelize_module(layer.self_attn, mesh["tp"], plan)
        if layout == "fsdp_tp":
            fully_shard(layer, mesh=mesh["dp"])
    if layout == "fsdp_tp":
        fully_shard(par, mesh=mesh["dp"])
    opt_ref = CompositionalMuon(param_groups(ref), lr=0.02)
    opt = CompositionalMuon(param_groups(par), lr=0.02)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p, q in zip(ref.parameters(), par.parameters()):
            full = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = full.clone(), _like(q, full)
        opt_ref.step()
        opt.step()
    diff = max((p - _full(q)).abs().max().item()
               for p, q in zip(ref.parameters(), par.parameters()))  # fmt: skip
    return diff, dict(opt.comm.plans)


@pytest.mark.parametrize("layout", ["tp", "fsdp_tp"])
def test_mla_under_tensor_parallel_steps_as_one_process(layout):
    # The MLA group's layout reads whole matrices (its latent rows are Muon's): gathered,
    # the one-process step on the gathered tensors, bit for bit.
    for diff, plans in get_pool(4).run(case_mla_parallel, layout):
        assert plans.get("gather") == 1, plans
        assert diff == 0.0
