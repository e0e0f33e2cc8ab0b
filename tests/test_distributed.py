"""CompositionalMuon on FSDP2 (DTensor) and DDP, on the CPU with gloo, at world sizes 2 and 4.

DDP (plain replicated parameters, ``process_group=``): the step split over ranks, compared with
the single-process optimizer bit for bit (parameters and momentum), collectives and bytes
counted exactly; the opt-out (``replicated="every_rank"``, or no process group) communicates
nothing. See the DDP section below.

Workers are forked once per world size (``dist_harness``) and run every case. Each case
builds a model, a sharded copy (``fully_shard``) and the single-process optimizer as the
reference, feeds both the same gradients, and compares: bit for bit where the plan is local
(QK with whole heads per rank, expert stacks), gathered (the single-process step on gathered
tensors) or owner-computed (Muon); within a derived tolerance where a reduction order changes
(OV: O Grams summed over ranks). Collectives per step are counted and asserted, and no
implicit DTensor redistribution may happen inside ``step()``.

Tolerance (OV). The O Grams are sums over the model width, now in a different order: each
entry moves by ~W u (u = 6e-8), and the inverse roots and 8 Newton-Schulz steps amplify that
by the Grams' condition (10-100 here), as in the fp32 kernel tolerance (test_kernels.py). The
steps are compared in relative Frobenius norm; measured worst ~1e-6; 1e-4 keeps the margin,
while a wrong formula or a missed reduction is O(1).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from dist_harness import CollectiveCounter, WorkerError, get_pool, step_flops
from torch import nn

from cm_triton import CompositionalMuon, param_groups

STEP_RTOL = 1e-4  # see the module docstring


class Block(nn.Module):
    def __init__(self, d: int, hq: int, hkv: int, dh: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = hq, hkv, dh
        self.q_proj = nn.Linear(d, hq * dh, bias=False)
        self.k_proj = nn.Linear(d, hkv * dh, bias=False)
        self.v_proj = nn.Linear(d, hkv * dh, bias=False)
        self.o_proj = nn.Linear(hq * dh, d, bias=False)
        self.fc1 = nn.Linear(d, 2 * d, bias=False)
        self.fc2 = nn.Linear(2 * d, d, bias=False)
        self.norm = nn.RMSNorm(d)


class Net(nn.Module):
    def __init__(self, hq=4, hkv=2, dh=8, d=32, n_layer=2, mha=False) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, d)
        self.blocks = nn.ModuleList(Block(d, hq, hkv, dh) for _ in range(n_layer))
        if mha:  # fused in_proj: no head-aligned plan applies, the gather fallback does
            self.mha = nn.MultiheadAttention(d, 4, bias=False)
        self.head = nn.Linear(d, 16, bias=False)


def _rows(n: int, world: int, rank: int) -> slice:
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return slice(start, min(start + chunk, n))


def _shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _set_grads(ref: nn.Module, sharded: nn.Module, gen: torch.Generator, mesh, bad=None):
    """The same full gradient on both models (the sharded one gets its rows); ``bad =
    (name, rank)`` plants a NaN in that rank's shard of that gradient."""
    from torch.distributed.tensor import DTensor, Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    for (name, p), q in zip(ref.named_parameters(), sharded.parameters()):
        full = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = full.clone()
        shard = full[_rows(full.shape[0], world, rank)].clone()
        if bad == (name, rank):
            shard.view(-1)[0] = float("nan")
        q.grad = DTensor.from_local(shard, mesh, [Shard(0)], run_check=False, shape=full.shape,
                                    stride=full.stride())  # fmt: skip


def _compare(ref: nn.Module, sharded: nn.Module, before: dict) -> dict[str, float]:
    """Relative Frobenius difference of each parameter's step (this rank's rows)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out = {}
    for (name, p), q in zip(ref.named_parameters(), sharded.parameters()):
        rows = _rows(p.shape[0], world, rank)
        want = (p.detach() - before[name])[rows].double()
        got = (q.to_local().detach() - before[name][rows]).double()
        if want.numel() == 0:
            out[name] = 0.0
            continue
        den = want.norm().item()
        out[name] = (got - want).norm().item() / den if den > 0 else (got - want).norm().item()
    return out


def case_fsdp_step(cfg: dict, flags: dict, opt_kw: dict, steps: int = 2, dtype=torch.float32):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    ref = Net(**cfg).to(dtype)
    sharded = _shard(copy.deepcopy(ref), mesh)
    kw = dict(lr=0.05, adamw_lr=0.01, **opt_kw)
    opt_ref = CompositionalMuon(param_groups(ref, **flags), **kw)
    opt = CompositionalMuon(param_groups(sharded, **flags), **kw)
    gen = torch.Generator().manual_seed(1)
    diffs, counts = [], []
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        _set_grads(ref, sharded, gen, mesh)
        opt_ref.step()
        with CollectiveCounter() as cc:
            opt.step()
        diffs.append(_compare(ref, sharded, before))
        counts.append((dict(opt.comm.counts), dict(opt.comm.plans), cc.explicit, cc.implicit))
    return diffs, counts


def _check(results, exact: tuple[str, ...], collectives: dict, plans: dict):
    for diffs, counts in results:  # every rank
        for step_diffs, (coll, plan, explicit, implicit) in zip(diffs, counts):
            assert implicit == 0, "implicit DTensor redistribution inside step()"
            assert coll == collectives and explicit == sum(collectives.values()), coll
            assert plan == plans, plan
            for name, e in step_diffs.items():
                if any(k in name for k in exact):
                    assert e == 0.0, (name, e)
                else:
                    assert e < STEP_RTOL, (name, e)


# (world, model config, flags, optimizer kwargs) -> exact parameters, collectives, plans
LOCAL_QK = ("q_proj", "k_proj", "fc1", "fc2", "emb", "head", "norm")
CASES = {
    # Hq = 8, Hkv = 4: whole heads per rank at 2 and 4 ranks. Collectives per step: the OV
    # Gram all_reduce, one agreement on every finite flag (gradients and results, all
    # batches) and one before the step on every layer's largest gradient and momentum
    # magnitude (the direction's power of two, engine._agree_scales); one all_gather (O
    # sign); an all_to_all pair per Muon shape (fc1, fc2).
    "gqa_aligned": (
        {"hq": 8, "hkv": 4},
        {},
        {},
        LOCAL_QK,
        {"all_reduce": 3, "all_gather": 1, "all_to_all": 4},
        {"qk_local": 1, "ov_sharded": 1, "o_sign_gather": 1, "muon_owner": 2},
    ),
    "mha_per_head_o": (  # hybrid=False: the O legs' Gram restart is a second all_reduce
        {"hq": 4, "hkv": 4},
        {"hybrid": False},
        {},
        LOCAL_QK,
        {"all_reduce": 4, "all_to_all": 4},
        {"qk_local": 1, "ov_sharded": 1, "muon_owner": 2},
    ),
    "o_sign_sharded": (  # Newton-Schulz on the sharded width: its norm + 8 Grams all-reduced
        {"hq": 8, "hkv": 4, "dh": 4},
        {},
        {"o_sign": "sharded"},
        LOCAL_QK,
        {"all_reduce": 12, "all_to_all": 4},
        {"qk_local": 1, "ov_sharded": 1, "o_sign_sharded": 1, "muon_owner": 2},
    ),
    "joint_and_connection": (  # QK stays local; OV with a connection is gathered
        {"hq": 8, "hkv": 4},
        {"method": "joint", "connection": "frobenius"},
        {},
        LOCAL_QK + ("v_proj", "o_proj"),
        {"all_reduce": 2, "all_gather": 1, "all_to_all": 4},
        {"qk_local": 1, "gather": 1, "muon_owner": 2},
    ),
    "renorm_gathered": (  # per_mat_renorm needs norms over every head: both pairs gathered
        {"hq": 8, "hkv": 4},
        {"per_mat_renorm": True},
        {},
        LOCAL_QK + ("v_proj", "o_proj"),
        {"all_reduce": 2, "all_gather": 2, "all_to_all": 4},
        {"gather": 2, "muon_owner": 2},
    ),
    "fused_mha": (  # nn.MultiheadAttention's in_proj: gathered (bit for bit)
        {"hq": 8, "hkv": 4, "mha": True},
        {},
        {},
        LOCAL_QK + ("mha",),
        {"all_reduce": 3, "all_gather": 2, "all_to_all": 4},
        {"qk_local": 1, "ov_sharded": 1, "o_sign_gather": 1, "gather": 1, "muon_owner": 2},
    ),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_step_matches_the_single_process_step(world, name):
    cfg, flags, opt_kw, exact, collectives, plans = CASES[name]
    results = get_pool(world).run(case_fsdp_step, cfg, flags, opt_kw)
    _check(results, exact, collectives, plans)


def test_unaligned_heads_fall_back_to_gathering():
    # Hkv = 2 over 4 ranks: a KV head is split across ranks; both pairs are gathered, and the
    # step is the single-process one bit for bit.
    results = get_pool(4).run(case_fsdp_step, {"hq": 4, "hkv": 2}, {}, {})
    _check(
        results,
        LOCAL_QK + ("v_proj", "o_proj"),
        {"all_reduce": 2, "all_gather": 2, "all_to_all": 4},
        {"gather": 2, "muon_owner": 2},
    )


@pytest.mark.parametrize("world", [2, 4])
def test_bf16_weights(world):
    # bf16 weights: each side computes in fp32 and rounds once; the OV steps may land one bf16
    # ulp (2^-8 relative) apart, the others agree bit for bit.
    results = get_pool(world).run(case_fsdp_step, {"hq": 8, "hkv": 4}, {}, {}, steps=1,
                                  dtype=torch.bfloat16)  # fmt: skip
    for diffs, _ in results:
        for name, e in diffs[0].items():
            bound = 0.0 if any(k in name for k in LOCAL_QK) else 2**-7
            assert e <= bound, (name, e)


def case_nonfinite(mode: str):
    """A NaN in one rank's shard of one gradient: every rank must decide the same."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    ref = Net(hq=8, hkv=4)
    sharded = _shard(copy.deepcopy(ref), mesh)
    opt = CompositionalMuon(param_groups(sharded), lr=0.05, nonfinite=mode)
    _set_grads(ref, sharded, torch.Generator().manual_seed(1), mesh,
               bad=("blocks.1.k_proj.weight", dist.get_world_size() - 1))  # fmt: skip
    before = [p.to_local().clone() for p in sharded.parameters()]
    try:
        opt.step()
        outcome = "stepped"
    except ValueError as e:
        outcome = f"raised: {e}"
    after = [p.to_local() for p in sharded.parameters()]
    moved = [not torch.equal(a, b) for a, b in zip(before, after)]
    skips = [opt.state[p].get("nonfinite_skips") for p in sharded.blocks[1].parameters()]
    return outcome, moved, skips


def test_a_nonfinite_gradient_on_one_rank_is_decided_by_all():
    results = get_pool(4).run(case_nonfinite, "raise")
    for outcome, moved, _ in results:
        assert outcome.startswith("raised") and "nothing was modified" in outcome
        assert not any(moved)
    results = get_pool(4).run(case_nonfinite, "skip")
    outcomes = {r[0] for r in results}
    assert outcomes == {"stepped"}
    assert len({tuple(r[1]) for r in results}) == 1  # the same parameters moved everywhere
    assert all(r[2][0] == 1 for r in results)  # block 1's QK pair skipped, counted once


# -- DDP: replicated parameters, the step split over ranks -------------------------------
# With ``process_group=`` and plain (DDP) parameters, each rank steps its contiguous chunk
# (ceil(L / W) entries) of every batch's L stacked layers and one all_gather per batch brings
# the new weights; the momentum (elementwise) is computed on every rank. Collectives per step:
# one all_gather per batch and one all_reduce agreeing on every finite flag of the step.
# Every case compares parameters AND momentum buffers with the single-process optimizer bit for
# bit (torch.equal), on every rank.


class GatedBlock(nn.Module):  # Qwen3-Next's q_proj: [query_h; gate_h] rows, gates by Muon
    def __init__(self, d: int = 32, hq: int = 4, hkv: int = 2, dh: int = 8) -> None:
        super().__init__()
        self.q = nn.Linear(d, 2 * hq * dh, bias=False)
        self.k = nn.Linear(d, hkv * dh, bias=False)
        self.v = nn.Linear(d, hkv * dh, bias=False)
        self.o = nn.Linear(hq * dh, d, bias=False)


def _ddp_model(cfg: dict) -> tuple[nn.Module, Callable[[nn.Module], list[dict]]]:
    """A model and its param groups: ``Net(**cfg)``, or ``cfg["gated"]`` gated attention
    blocks (layout ``"gated_q"``: its Muon rows keep Muon's momentum)."""
    if "gated" not in cfg:
        return Net(**cfg), param_groups

    def groups(model: nn.Module, **flags) -> list[dict]:
        blocks = model.module if hasattr(model, "module") else model
        return [{"kind": "attention", "layout": "gated_q", "head_dim": 8, "num_heads": 4,
                 "num_kv_heads": 2, "params": [b.q.weight, b.k.weight, b.v.weight, b.o.weight],
                 **flags} for b in blocks]  # fmt: skip

    return nn.ModuleList(GatedBlock() for _ in range(cfg["gated"])), groups


def case_ddp(cfg: dict, flags: dict, opt_kw: dict, group: bool = True, steps: int = 2,
             nan: str | None = None):  # fmt: skip
    """A DDP-wrapped copy and the single-process optimizer, fed the same gradients (what DDP's
    all_reduce leaves: identical on every rank); ``nan`` names a gradient given a NaN."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref, groups = _ddp_model(cfg)
    ddp = DDP(copy.deepcopy(ref))
    kw = dict(lr=0.05, adamw_lr=0.01, **opt_kw)
    every = kw.pop("replicated", "split")
    opt_ref = CompositionalMuon(groups(ref, **flags), **kw)
    opt = CompositionalMuon(groups(ddp, **flags), replicated=every,
                            process_group=dist.group.WORLD if group else None, **kw)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        for (name, p), q in zip(ref.named_parameters(), ddp.module.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            if name == nan:
                p.grad.view(-1)[0] = float("nan")
            q.grad = p.grad.clone()
        opt_ref.step()
        with CollectiveCounter() as cc:
            opt.step()
        differ = []
        for (name, p), q in zip(ref.named_parameters(), ddp.module.parameters()):
            m_ref, m = (o.state[x].get("momentum_buffer") for o, x in ((opt_ref, p), (opt, q)))
            if not torch.equal(p, q):
                differ.append(name)
            if (m_ref is None) != (m is None) or (m is not None and not torch.equal(m_ref, m)):
                differ.append(f"momentum of {name}")
        comm = opt.comm
        out.append({
            "differ": differ,
            "explicit": cc.explicit,
            "implicit": cc.implicit,
            "comm": None if comm is None else (dict(comm.counts), dict(comm.plans),
                                               dict(comm.sent)),  # fmt: skip
            "skips": [opt.state[p].get("nonfinite_skips") for p in ddp.module.parameters()],
            "skips_ref": [opt_ref.state[p].get("nonfinite_skips") for p in ref.parameters()],
        })  # fmt: skip
    return out


def _split_expected(cfg: dict, flags: dict, world: int):
    """Collectives, plans and bytes sent per rank of one split step of ``_ddp_model(cfg)``
    (fp32): batch b of L_b entries of n_b numbers each sends (W - 1) ceil(L_b / W) n_b 4 bytes
    in its all_gather (the momentum too with momentum_reproject); the finite check all-reduces
    one int32 flag per entry and one per AdamW parameter (2 (W - 1) / W of them, ring)."""
    if "gated" in cfg:
        d, hq, hkv, dh = 32, 4, 2, 8
        n = cfg["gated"]
        attention = {"gated": (n, (2 * hq * dh + 2 * hkv * dh + hq * dh) * d)}
        muon = {}
    else:
        d, hq, hkv, dh = cfg.get("d", 32), cfg.get("hq", 4), cfg.get("hkv", 2), cfg.get("dh", 8)
        n = cfg.get("n_layer", 2)
        attention = {"qk": (n, (hq + hkv) * dh * d), "ov": (n, (hkv + hq) * dh * d)}
        if cfg.get("mha"):
            attention["mha"] = (1, 4 * d * d)
        muon = {"fc1": (n, 2 * d * d), "fc2": (n, 2 * d * d)}
    gather = 0
    for name, (length, numel) in {**attention, **muon}.items():
        both = 2 if name in attention and flags.get("momentum_reproject") else 1
        gather += (world - 1) * -(-length // world) * numel * 4 * both
    adamw = 0 if "gated" in cfg else 2 + n  # emb, head and one norm per block
    flags_n = sum(length for length, _ in {**attention, **muon}.values()) + adamw
    ring = 2 * (world - 1) / world
    counts = {"all_gather": len(attention) + len(muon), "all_reduce": 1}
    plans = {"replicated_split": len(attention)}
    if muon:
        plans["muon_replicated_split"] = len(muon)
    return counts, plans, {"all_gather": gather, "all_reduce": ring * 4 * flags_n}


DDP_CASES = {  # name: (model config, flags)
    "defaults": ({}, {}),
    "per_head_o_nesterov_renorm": (
        {},
        {"hybrid": False, "nesterov": True, "per_mat_renorm": True},
    ),  # fmt: skip
    # One-entry chunks (2 layers on 2 and 4 ranks) with a connection compute a neighbour
    # along (distributed._one_entry_differs): still one all_gather, the same bytes.
    "joint_connection": ({}, {"method": "joint", "connection": "frobenius"}),
    "reproject": ({}, {"momentum_reproject": True}),  # the projected momentum is gathered too
    # 3 layers: chunks (2, 1) on 2 ranks, (1, 1, 1, 0) on 4; the fused MHA is one entry.
    "uneven_layers_mha": ({"n_layer": 3, "mha": True}, {"connection": "frobenius_scalar"}),
    # Muon rows in an attention layout step with Muon's momentum (0.95), the pairs with beta
    "gated_q": ({"gated": 3}, {"beta": 0.9}),
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(DDP_CASES))
def test_ddp_split_step_matches_the_single_process_step(world, name):
    cfg, flags = DDP_CASES[name]
    counts, plans, sent = _split_expected(cfg, flags, world)
    for steps in get_pool(world).run(case_ddp, cfg, flags, {}):  # every rank
        for st in steps:
            assert st["differ"] == [], st["differ"]
            assert st["comm"] == (counts, plans, sent), st["comm"]
            assert st["explicit"] == sum(counts.values()) and st["implicit"] == 0


def test_ddp_every_rank_opt_out_needs_no_collective():
    # replicated="every_rank", or no process group (DDP's plain tensors): every rank computes
    # the whole step, no communicator, no collective, the same result.
    for group in (True, False):
        for steps in get_pool(2).run(case_ddp, {}, {}, {"replicated": "every_rank"}, group):
            for st in steps:
                assert st["differ"] == [] and st["comm"] is None
                assert st["explicit"] == 0 and st["implicit"] == 0


def test_ddp_split_nonfinite_gradients():
    # A NaN in layer 1's k gradient (on every rank, as DDP's all_reduce spreads it). "skip": that
    # QK group keeps its weights and momentum (masked on the device: the batch still computes
    # and gathers all 3 entries), the rest steps as the single process.
    cfg, bad = {"n_layer": 3}, "blocks.1.k_proj.weight"
    counts, plans, sent = _split_expected(cfg, {}, 4)
    for steps in get_pool(4).run(case_ddp, cfg, {}, {"nonfinite": "skip"}, steps=1, nan=bad):
        (st,) = steps
        assert st["differ"] == [] and st["comm"] == (counts, plans, sent), st["comm"]
        assert st["skips"] == st["skips_ref"] and st["skips"].count(1) == 1
    with pytest.raises(WorkerError, match="nothing was modified"):  # "raise", on every rank
        get_pool(4).run(case_ddp, cfg, {}, {}, steps=1, nan=bad)


def test_replicated_option_is_validated():
    with pytest.raises(ValueError, match="replicated"):
        CompositionalMuon([{"kind": "muon", "params": [nn.Parameter(torch.ones(2, 2))]}],
                          replicated="scatter")  # fmt: skip


def case_ddp_flops(cfg: dict) -> tuple[int, int]:
    """Matmul flops (FlopCounterMode: the profiler's 2 m n k from the shapes, deterministic,
    cheaper; bench/ddp_flops.py checks that both agree) of this rank's split step and of the
    single-process step, on the same model and gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref = Net(**cfg)
    ddp = DDP(copy.deepcopy(ref))
    opt_ref = CompositionalMuon(param_groups(ref), lr=0.05)
    opt = CompositionalMuon(param_groups(ddp), lr=0.05, process_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(ref.parameters(), ddp.module.parameters()):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    return tuple(step_flops(o.step, "dispatch")["matmul"] for o in (opt, opt_ref))


def test_ddp_split_step_flops_per_rank():
    # 2 layers on 2 ranks: each rank computes one of each batch's 2 entries; what is left is
    # elementwise (no matmul). bench/ddp_flops.py measures a Llama-shaped model.
    for mine, single in get_pool(2).run(case_ddp_flops, {}):
        assert 0 < mine <= 0.6 * single, mine / single


def case_dcp_save(path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    ref = Net(hq=8, hkv=4)
    sharded = _shard(copy.deepcopy(ref), mesh)
    opt = CompositionalMuon(param_groups(sharded, connection="frobenius"), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        _set_grads(ref, sharded, gen, mesh)
        opt.step()
    model_sd, optim_sd = get_state_dict(sharded, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    full = {n: p.full_tensor() for n, p in sharded.named_parameters()}
    named = [(n, opt.state[p].get("momentum_buffer")) for n, p in sharded.named_parameters()]
    return full, {n: m.full_tensor() for n, m in named if m is not None}


def case_dcp_load(path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    sharded_run = dist.is_initialized()
    torch.manual_seed(0)
    model = Net(hq=8, hkv=4)
    if sharded_run:
        from torch.distributed.device_mesh import init_device_mesh

        model = _shard(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = CompositionalMuon(param_groups(model, connection="frobenius"), lr=0.05)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    params = {n: full(p).clone() for n, p in model.named_parameters()}
    named = [(n, opt.state[p].get("momentum_buffer")) for n, p in model.named_parameters()]
    moms = {n: full(m).clone() for n, m in named if m is not None}
    keys = [(g["kind"], g.get("head_dim"), g.get("connection")) for g in opt.param_groups]
    for p in model.parameters():  # continue: one more step from the loaded state
        p.grad = torch.ones_like(p)
    opt.step()
    return params, moms, keys, all(torch.isfinite(full(p)).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # the 1-rank load
def test_dcp_checkpoint_reshards_from_2_ranks_to_4_and_to_1():
    with tempfile.TemporaryDirectory() as path:
        saved_params, saved_moms = get_pool(2).run(case_dcp_save, path)[0]
        loaded = get_pool(4).run(case_dcp_load, path)
        loaded.append(case_dcp_load(path))  # one process, no process group
        want_keys = [("qk", 8, "frobenius"), ("ov", 8, "frobenius")] * 2
        for params, moms, keys, finite in loaded:
            assert finite
            assert keys[:4] == want_keys and {k for k, *_ in keys[4:]} == {"muon", "adamw"}
            for n, t in saved_params.items():
                assert torch.equal(params[n], t), n
            assert moms.keys() == saved_moms.keys()
            for n, t in saved_moms.items():
                assert torch.equal(moms[n], t), n


def test_a_failing_rank_fails_the_case_with_its_traceback():
    # The harness itself: an exception on one rank must surface here, not hang.
    with pytest.raises(WorkerError, match="ZeroDivisionError"):
        get_pool(2).run(_fail_on_rank_one)


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ZeroDivisionError("planted")
    dist.barrier()
