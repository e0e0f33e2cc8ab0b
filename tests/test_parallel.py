"""CompositionalMuon past one node: tensor parallel, HSDP and FSDP2 x TP, on gloo at world 2 and 4.

Each case builds a Llama-shaped GQA model, parallelises a copy the way PyTorch users do
(``parallelize_module`` with q/k/v and the MLP's first matrix ``ColwiseParallel``, o and the
MLP's second ``RowwiseParallel``; ``fully_shard`` on a 1-D or 2-D mesh), feeds both the same
gradients for 3 steps, and compares every parameter (``full_tensor()``) with the one-process
optimizer's, the plans each batch took, and the collectives, per plan.

Tolerances. Where every leg of a pair is local (QK and OV under TP: whole heads on a rank),
gathered (the one-process step on gathered tensors) or owner-computed (Muon), the arithmetic
is the one process's on the same contiguous heads: **bit for bit** (batched products on 3-D
contiguous stacks are batch-invariant on the CPU). Where o's rows (the model width) are split
(FSDP's dimension: HSDP, FSDP2 x TP) its Grams are sums in another order: each entry moves by
~W u (u = 6e-8), amplified by the inverse roots and 8 Newton-Schulz steps by the Grams'
condition (10-100 here) and carried over 3 steps: ``STEP_RTOL = 1e-4`` on the relative
Frobenius difference of each parameter's total change keeps a wide margin over the measured
~1e-6 while a missed reduction or a wrong head is O(1) (test_distributed.py derives the same).
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
from dist_harness import CollectiveCounter, get_pool
from test_distributed import Net as _Net
from torch import nn

from cm_triton import CompositionalMuon, param_groups

STEP_RTOL = 1e-4  # see the module docstring


def Net(**cfg) -> nn.Module:
    """test_distributed's Llama-shaped GQA model, 8 query and 4 KV heads unless ``cfg`` says."""
    return _Net(**({"hq": 8, "hkv": 4} | cfg))


TP_PLAN = {"q_proj": "col", "k_proj": "col", "v_proj": "col", "o_proj": "row", "fc1": "col",
           "fc2": "row"}  # fmt: skip


def _tp(block: nn.Module, mesh) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    styles = {"col": ColwiseParallel, "row": RowwiseParallel}
    plan = {name: styles[s]() for name, s in TP_PLAN.items() if hasattr(block, name)}
    parallelize_module(block, mesh, plan)


def parallelize(model: nn.Module, layout: str) -> nn.Module:
    """``"tp"`` (world-way), ``"hsdp"`` (2 replicas x world/2 shards), ``"fsdp_tp"`` (FSDP over
    2 x TP over world/2), ``"fsdp"`` (world-way)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if layout == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        for block in model.blocks:
            _tp(block, mesh)
        return model
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    names = ("replicate", "shard") if layout == "hsdp" else ("dp", "tp")
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=names)
    if layout == "hsdp":
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    for block in model.blocks:
        _tp(block, mesh["tp"])
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _like(q: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` placed as the parameter ``q`` is: torch's own split, not the package's."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(q, DTensor):
        return full.clone()
    shape, offset = compute_local_shape_and_global_offset(full.shape, q.device_mesh, q.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return DTensor.from_local(full[index].clone(), q.device_mesh, q.placements, run_check=False,
                              shape=full.shape, stride=full.stride())  # fmt: skip


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def case_parallel_step(layout: str, cfg: dict, flags: dict, opt_kw: dict, steps: int = 3):
    torch.manual_seed(0)
    ref = Net(**cfg)
    par = parallelize(copy.deepcopy(ref), layout)
    kw = dict(lr=0.05, adamw_lr=0.01, **opt_kw)
    opt_ref = CompositionalMuon(param_groups(ref, **flags), **kw)
    opt = CompositionalMuon(param_groups(par, **flags), **kw)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(steps):
        for p, q in zip(ref.parameters(), par.parameters()):
            full = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = full.clone(), _like(q, full)
        opt_ref.step()
        with CollectiveCounter() as cc:
            opt.step()
        c = opt.comm
        counts.append((dict(c.counts), dict(c.plans), dict(c.by_plan), cc.explicit, cc.implicit))
    diffs = {}
    for (name, p), q in zip(ref.named_parameters(), par.parameters()):
        want = (p.detach() - start[name]).double()
        got = (_full(q.detach()) - start[name]).double()
        diffs[name] = ((got - want).norm() / want.norm()).item()
    return diffs, counts


def _check(results, exact: tuple[str, ...], plans: dict, by_plan: dict):
    for diffs, counts in results:  # every rank
        for coll, plan, charged, explicit, implicit in counts:
            assert implicit == 0, "implicit DTensor redistribution inside step()"
            assert explicit == sum(coll.values()), (explicit, coll)
            assert plan == plans, plan
            assert charged == by_plan, charged
        for name, e in diffs.items():
            if any(k in name for k in exact) or "all" in exact:
                assert e == 0.0, (name, e)
            else:
                assert e < STEP_RTOL, (name, e)


FLAGS = {
    "defaults": {},
    "per_head_o_nesterov": {"hybrid": False, "nesterov": True},
    "joint_connection_reproject": {"method": "joint", "connection": "frobenius",
                                   "momentum_reproject": True},
    "per_mat_renorm": {"per_mat_renorm": True},
}  # fmt: skip
EXACT_SHARDED = ("q_proj", "k_proj", "fc1", "fc2", "emb", "head", "norm")


def expected(layout: str, flags: dict) -> tuple[tuple[str, ...], dict, dict]:
    """(parameters equal bit for bit, plans, collectives charged per plan) per step.

    QK: local wherever heads are whole (every layout here), **no collective**, but under
    per_mat_renorm (its norms span every head: gathered, one all_gather; under HSDP over the
    shard dimension only, ``heads_gather``). OV under TP: local (o's rows whole); the hybrid
    sign gathers the whole O direction (one all_gather). OV where o's width is split (HSDP,
    FSDP2 x TP): ``ov_sharded`` for the Gram-form flags, one all_reduce of the dh x dh Grams
    plus the sign's all_gather (hybrid) or the restart's all_reduce (per-head O); other flags
    gathered over FSDP's dimension (``heads_gather``: one all_gather; a TP rank's heads are
    whole there), then the hybrid sign over TP's (one more), bit for bit. Muon (fc1,
    fc2: two shapes): one all_to_all pair each. "agree": the all_reduce of every layer's
    largest gradient and momentum magnitude and the one of the finite flags."""
    renorm = flags.get("per_mat_renorm", False)
    fused = flags.get("method", "half_split") == "half_split" and "connection" not in flags
    hybrid = flags.get("hybrid", True)
    plans = {"muon_owner": 2}
    charged = {"agree": 2, "muon_owner": 4}
    if renorm:
        name = "heads_gather" if layout == "hsdp" else "gather"
        plans[name] = charged[name] = 2
        return ("all",), plans, charged
    plans["qk_local"] = 1
    if hybrid:
        plans["o_sign_gather"] = 1
    if layout == "tp":
        plans["ov_local"] = 1
        if hybrid:
            charged["ov_local"] = 1
        return ("all",), plans, charged
    if not fused:  # under HSDP the shard dimension holds every head: the sign is local too
        if layout == "hsdp":
            plans.pop("o_sign_gather", None)
        plans["heads_gather"] = 1
        charged["heads_gather"] = 2 if layout == "fsdp_tp" else 1  # + the sign over TP
        return ("all",), plans, charged
    plans["ov_sharded"] = 1
    charged["ov_sharded"] = 2
    return EXACT_SHARDED, plans, charged


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("layout", ["tp", "hsdp", "fsdp_tp"])
def test_parallel_step_matches_the_single_process_step(layout, flags):
    results = get_pool(4).run(case_parallel_step, layout, {}, FLAGS[flags], {})
    _check(results, *expected(layout, FLAGS[flags]))


def test_tensor_parallel_at_world_2():
    results = get_pool(2).run(case_parallel_step, "tp", {}, {}, {})
    _check(results, *expected("tp", {}))


def test_the_qk_pairs_need_no_collective_under_tensor_parallel():
    # Whole heads on every rank: the QK step is charged nothing, whatever the flags take.
    for flags in ({}, {"method": "joint", "connection": "frobenius"}, {"nesterov": True}):
        for _, counts in get_pool(4).run(case_parallel_step, "tp", {}, flags, {}, steps=1):
            ((_, plans, charged, _, _),) = counts
            assert plans["qk_local"] == 1 and "qk_local" not in charged, charged


def test_uneven_heads_under_tensor_parallel_are_gathered():
    # Hkv = 2 over 4 TP ranks: ColwiseParallel cuts each KV head in two; both pairs take the
    # gather plan (the one-process step on gathered tensors), bit for bit.
    results = get_pool(4).run(case_parallel_step, "tp", {"hq": 4, "hkv": 2}, {}, {}, steps=2)
    _check(results, ("all",), {"gather": 2, "muon_owner": 2},
           {"agree": 2, "gather": 2, "muon_owner": 4})  # fmt: skip


def case_refused() -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import Partial

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Partial()]))
    w.grad = torch.zeros_like(w)
    before = w.to_local().clone()
    opt = CompositionalMuon([{"kind": "muon", "params": [w]}], lr=0.1)
    try:
        opt.step()
    except NotImplementedError as e:
        assert torch.equal(w.to_local(), before)  # nothing modified
        return str(e)
    return "stepped"


def test_a_placement_no_plan_takes_is_refused_naming_it():
    for msg in get_pool(2).run(case_refused):
        assert "Partial" in msg and "(8, 8)" in msg, msg


# -- torch.distributed.checkpoint across mesh shapes ------------------------------------------
def _build(layout: str | None) -> tuple[nn.Module, CompositionalMuon]:
    torch.manual_seed(0)
    model = Net()
    if layout is not None:
        model = parallelize(model, layout)
    return model, CompositionalMuon(param_groups(model, connection="frobenius"), lr=0.05)


def _grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for q in model.parameters():
        q.grad = _like(q, torch.randn(q.shape, generator=gen))


def _snapshot(model: nn.Module, opt: CompositionalMuon) -> tuple[dict, dict]:
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    moms = {n: _full(opt.state[p]["momentum_buffer"]).clone() for n, p in model.named_parameters()
            if "momentum_buffer" in opt.state.get(p, {})}  # fmt: skip
    return params, moms


def case_dcp_save(layout: str, path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _build(layout)
    for seed in (1, 2):
        _grads(model, seed)
        opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    return _snapshot(model, opt)


def case_dcp_load(layout: str | None, path: str):
    """Load the checkpoint into ``layout`` (None: one process), then take one more step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _build(layout)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = _snapshot(model, opt)
    _grads(model, 3)
    opt.step()
    return loaded, _snapshot(model, opt)[0]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # the 1-rank load
@pytest.mark.parametrize("saved, other", [("fsdp_tp", "fsdp"), ("fsdp", "fsdp_tp"),
                                          ("tp", "hsdp")])  # fmt: skip
def test_dcp_reshards_across_mesh_shapes(saved, other):
    # Saved on one mesh, loaded on another and in one process: weights and momentum equal
    # bit for bit, and the next step from each equal within STEP_RTOL (the layouts' OV plans
    # sum the O Grams in different orders; see the module docstring).
    with tempfile.TemporaryDirectory() as path:
        params, moms = get_pool(4).run(case_dcp_save, saved, path)[0]
        runs = [get_pool(4).run(case_dcp_load, other, path)[0], case_dcp_load(None, path)]
    assert len(moms) == 12  # 2 layers x (q, k, v, o, fc1, fc2): every CM and Muon buffer
    for (p_loaded, m_loaded), _ in runs:
        assert p_loaded.keys() == params.keys() and m_loaded.keys() == moms.keys()
        for n in params:
            assert torch.equal(p_loaded[n], params[n]), n
        for n in moms:
            assert torch.equal(m_loaded[n], moms[n]), n
    (_, stepped), (_, want) = runs
    for n, w in want.items():
        change = (w - params[n]).double()
        err = ((stepped[n] - params[n]).double() - change).norm() / change.norm()
        assert err < STEP_RTOL, (n, err.item())


def test_fsdp_cutting_a_tensor_parallel_rank_s_heads_gathers_within_it():
    # Hkv = 2 over TP 2 x FSDP 2: each TP rank holds one KV head, which FSDP cuts in two.
    # Both pairs are gathered over FSDP's dimension only (the TP rank's heads are whole
    # there), the hybrid O sign across TP's; bit for bit.
    results = get_pool(4).run(case_parallel_step, "fsdp_tp", {"hq": 4, "hkv": 2}, {}, {},
                              steps=2)  # fmt: skip
    _check(results, ("all",), {"heads_gather": 2, "o_sign_gather": 1, "muon_owner": 2},
           {"agree": 2, "heads_gather": 3, "muon_owner": 4})  # fmt: skip


def case_sent(layout: str) -> dict:
    torch.manual_seed(0)
    model = parallelize(Net(), layout)
    opt = CompositionalMuon(param_groups(model), lr=0.05)
    for q in model.parameters():
        q.grad = _like(q, torch.randn(q.shape))
    opt.step()
    return dict(opt.comm.sent)


def test_bytes_per_step_on_each_mesh():
    f32 = 4
    # TP over 4: the hybrid O sign's all_gather sends this rank's rows of the O direction,
    # 2 layers x (8 heads / 4) x 8 rows x width 32, to 3 ranks. Muon: fc1 (64 x 32, by rows)
    # and fc2 (32 x 64, by columns): blocks of 512 numbers; each of the 4 matrices goes to
    # its owner from 3 ranks and comes back to 3: 4 x 6 blocks over all ranks.
    sent = get_pool(4).run(case_sent, "tp")
    for s in sent:
        assert s["all_gather"] == 3 * 2 * 2 * 8 * 32 * f32, s
    assert sum(s["all_to_all"] for s in sent) == 4 * 6 * 512 * f32
    # HSDP 2 x 2: fc1's blocks are 32 x 32 and fc2's 16 x 64 (1024 numbers), held twice (two
    # replicas); only the first holder of each sends (flat ranks 0 and 1). fc1's two matrices
    # are owned by ranks 0 and 1 (one block comes in, the owner has the other), fc2's by 2
    # and 3 (both come in); each result goes back to the 3 other ranks: 2 x (1 + 3) + 2 x (2
    # + 3) = 18 blocks, where every rank sending would take 24.
    sent = get_pool(4).run(case_sent, "hsdp")
    assert sum(s["all_to_all"] for s in sent) == 18 * 1024 * f32
    # FSDP2 x TP 2 x 2: the hybrid sign gathers each rank's block of the O direction, 2 layers
    # x (its TP rank's 4 heads x 8 rows) x (its FSDP half of the width, 16), to 3 ranks; Muon's
    # blocks are 16 x 32 (fc1) and 16 x 32 (fc2), four distinct: as under TP.
    sent = get_pool(4).run(case_sent, "fsdp_tp")
    for s in sent:
        assert s["all_gather"] == 3 * 2 * 4 * 8 * 16 * f32, s
    assert sum(s["all_to_all"] for s in sent) == 4 * 6 * 512 * f32


class Fused(nn.Module):
    """torchtitan's attention: a fused ``wqkv`` storing ``[q_1 .. q_G; k; v]`` per KV group
    (CM's ``"qkv_grouped"``) and ``wo``; or four projections in one group (``"separate"``)."""

    def __init__(self, layout: str, d=32, hq=8, hkv=4, dh=8) -> None:
        super().__init__()
        g = hq // hkv
        self.layout, self.dims = layout, (hq, hkv, dh)
        if layout == "qkv_grouped":
            self.wqkv = nn.Linear(d, hkv * (g + 2) * dh, bias=False)
        else:
            self.q_proj = nn.Linear(d, hq * dh, bias=False)
            self.k_proj = nn.Linear(d, hkv * dh, bias=False)
            self.v_proj = nn.Linear(d, hkv * dh, bias=False)
        self.wo = nn.Linear(hq * dh, d, bias=False)

    def groups(self, **flags) -> list[dict]:
        hq, hkv, dh = self.dims
        params = (
            [self.wqkv.weight]
            if self.layout == "qkv_grouped"
            else [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        ) + [self.wo.weight]
        return [{"kind": "attention", "layout": self.layout, "params": params, "head_dim": dh,
                 "num_heads": hq, "num_kv_heads": hkv, **flags}]  # fmt: skip

    def forward(self, x):  # pragma: no cover
        return x


def case_fused_tp(layout: str, flags: dict):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    ref = Fused(layout)
    par = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    cols = ["wqkv"] if layout == "qkv_grouped" else ["q_proj", "k_proj", "v_proj"]
    plan = {n: ColwiseParallel() for n in cols} | {"wo": RowwiseParallel()}
    parallelize_module(par, mesh, plan)
    opt_ref = CompositionalMuon(ref.groups(**flags), lr=0.05)
    opt = CompositionalMuon(par.groups(**flags), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(ref.parameters(), par.parameters()):
            full = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = full.clone(), _like(q, full)
        opt_ref.step()
        opt.step()
    same = all(torch.equal(p.detach(), _full(q.detach()))
               for p, q in zip(ref.parameters(), par.parameters()))  # fmt: skip
    return same, dict(opt.comm.plans), dict(opt.comm.by_plan)


@pytest.mark.parametrize(
    "flags", [{}, {"hybrid": False, "method": "joint"}], ids=["defaults", "joint"]
)
@pytest.mark.parametrize("layout", ["qkv_grouped", "separate"])
def test_fused_and_four_projection_groups_stay_local_under_tensor_parallel(layout, flags):
    # Whole KV groups on each TP rank in every parameter of the group: the one-process step
    # of those heads, bit for bit; only the hybrid O sign communicates (one all_gather).
    hybrid = flags.get("hybrid", True)
    for same, plans, charged in get_pool(4).run(case_fused_tp, layout, flags):
        assert same
        assert plans == {"heads_local": 1, **({"o_sign_gather": 1} if hybrid else {})}, plans
        assert charged.get("heads_local", 0) == (1 if hybrid else 0), charged
