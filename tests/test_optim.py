"""CompositionalMuon and param_groups: discovery, equivalence with the functional API, state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cm_triton import CompositionalMuon, cm_ov, cm_qk, param_groups
from cm_triton.demo import GPT, GPTConfig
from cm_triton.reference import msign
from cm_triton.schedules import MUON_COEFFICIENTS


def _ids(groups):
    return [id(p) for g in groups for p in g["params"]]


def _check_partition(model, groups):
    ids = _ids(groups)
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"


def _kinds(groups):
    return [g["kind"] for g in groups]


def test_discovers_the_demo_model():
    model = GPT(GPTConfig(n_layer=2))
    groups = param_groups(model)
    _check_partition(model, groups)
    assert _kinds(groups) == ["qk", "ov", "qk", "ov", "muon", "adamw"]
    blk = model.blocks[0].attn
    assert groups[0]["params"] == [blk.q_proj.weight, blk.k_proj.weight]
    assert groups[1]["params"] == [blk.v_proj.weight, blk.o_proj.weight]
    assert groups[0]["head_dim"] == 32
    muon = {id(p) for p in groups[4]["params"]}
    assert id(model.blocks[0].fc.weight) in muon and id(model.lm_head.weight) not in muon
    assert id(model.tok_emb.weight) not in muon


class LlamaAttention(nn.Module):
    """Hand-written Llama-style attention block with GQA and a bias on o_proj."""

    def __init__(self, d=48, n_heads=6, n_kv=2, head_dim=8, with_attrs=True):
        super().__init__()
        if with_attrs:
            self.num_heads, self.num_key_value_heads = n_heads, n_kv
        self.q_proj = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d, bias=True)
        self.norm = nn.RMSNorm(d)
        self.mlp = nn.Linear(d, d, bias=False)


def test_discovers_llama_style_gqa():
    model = nn.Sequential(LlamaAttention(), LlamaAttention())
    groups = param_groups(model, method="joint")
    _check_partition(model, groups)
    assert _kinds(groups) == ["qk", "ov", "qk", "ov", "muon", "adamw"]
    assert groups[0]["head_dim"] == 8 and groups[0]["method"] == "joint"
    adamw = {id(p) for p in groups[-1]["params"]}
    assert id(model[0].o_proj.bias) in adamw and id(model[0].norm.weight) in adamw


def test_unreadable_head_dim_names_the_module():
    model = nn.Sequential(LlamaAttention(with_attrs=False))
    with pytest.raises(ValueError, match="'0'.*head_dim"):
        param_groups(model)
    assert _kinds(param_groups(model, head_dim=8))[:2] == ["qk", "ov"]


def test_inconsistent_kv_heads_names_the_module():
    m = LlamaAttention()
    m.num_key_value_heads = 3
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        param_groups(nn.Sequential(m))


def test_discovers_multihead_attention():
    model = nn.Sequential(nn.MultiheadAttention(32, 4), nn.Linear(32, 32))
    groups = param_groups(model)
    _check_partition(model, groups)
    assert _kinds(groups) == ["mha", "muon", "adamw"]
    assert groups[0]["params"][0] is model[0].in_proj_weight and groups[0]["head_dim"] == 8
    sep = nn.MultiheadAttention(32, 4, kdim=32, vdim=24)  # separate q/k/v weights
    assert _kinds(param_groups(sep)) == ["qk", "ov", "adamw"]


def _with_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_one_step_equals_the_functional_calls():
    torch.manual_seed(0)
    model = nn.Sequential(LlamaAttention(), nn.Linear(48, 20, bias=False))
    model[1].weight.data *= 1  # a (20, 48) Muon matrix: shape factor 1
    model.add_module("tall", nn.Linear(20, 48, bias=False))  # (48, 20): shape factor sqrt(2.4)
    _with_grads(model)
    ref = copy.deepcopy(model)
    _with_grads(ref)  # deepcopy does not copy .grad; same seed, same order: same gradients
    opt = CompositionalMuon(param_groups(model), lr=0.05, adamw_lr=0.01, weight_decay=0.1)
    opt.step()
    a = ref[0]
    z = [torch.zeros_like(p) for p in (a.q_proj.weight, a.k_proj.weight)]
    with torch.no_grad():
        cm_qk(a.q_proj.weight, a.k_proj.weight, a.q_proj.weight.grad, a.k_proj.weight.grad,
              *z, head_dim=8, eta=0.05, weight_decay=0.1)  # fmt: skip
        z = [torch.zeros_like(p) for p in (a.v_proj.weight, a.o_proj.weight)]
        cm_ov(a.v_proj.weight, a.o_proj.weight, a.v_proj.weight.grad, a.o_proj.weight.grad,
              *z, head_dim=8, eta=0.05, weight_decay=0.1)  # fmt: skip
        for w in (a.mlp.weight, ref[1].weight, ref.tall.weight):  # Muon, first step: buf = g
            g = w.grad
            upd = msign((g + 0.95 * g)[None], MUON_COEFFICIENTS)[0]  # Muon groups' default
            w.mul_(1 - 0.05 * 0.1).add_(upd, alpha=-0.05 * max(1, w.shape[0] / w.shape[1]) ** 0.5)
    adam_params = [a.o_proj.bias, a.norm.weight]
    torch.optim.AdamW(adam_params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1).step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # Same functions on the same inputs: identical except AdamW, whose torch version
        # orders its fp32 operations differently (a few ulps).
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_mha_group_equals_qk_and_ov_on_views():
    mha = nn.MultiheadAttention(32, 4, bias=False)
    _with_grads(mha)
    ref = copy.deepcopy(mha)
    _with_grads(ref)
    CompositionalMuon([{"kind": "mha", "params": [mha.in_proj_weight, mha.out_proj.weight],
                        "head_dim": 8}], lr=0.05).step()  # fmt: skip
    w, g = ref.in_proj_weight.detach(), ref.in_proj_weight.grad
    m = torch.zeros_like(w)
    mo = torch.zeros_like(ref.out_proj.weight)
    cm_qk(w[:32], w[32:64], g[:32], g[32:64], m[:32], m[32:64], head_dim=8, eta=0.05)
    cm_ov(w[64:], ref.out_proj.weight.detach(), g[64:], ref.out_proj.weight.grad, m[64:], mo,
          head_dim=8, eta=0.05)  # fmt: skip
    assert torch.equal(mha.in_proj_weight, w) and torch.equal(
        mha.out_proj.weight, ref.out_proj.weight
    )


def test_pair_with_a_missing_gradient_is_skipped_whole():
    model = nn.Sequential(LlamaAttention())
    _with_grads(model)
    model[0].k_proj.weight.grad = None
    before = copy.deepcopy(model)
    opt = CompositionalMuon(param_groups(model), lr=0.05)
    opt.step()
    assert torch.equal(model[0].q_proj.weight, before[0].q_proj.weight)
    assert "momentum_buffer" not in opt.state[model[0].q_proj.weight]
    assert not torch.equal(model[0].v_proj.weight, before[0].v_proj.weight)  # OV did step


def _train(model, opt, steps, seed=0, sched=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 32), generator=g)
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_state_dict_resume_is_bit_identical():
    cfg = GPTConfig(n_layer=1, d_model=64, block_size=32)
    torch.manual_seed(0)
    a = GPT(cfg)
    b = copy.deepcopy(a)
    opt_a = CompositionalMuon(param_groups(a, connection="frobenius"), lr=0.03)
    _train(a, opt_a, 6)
    # interrupted: 3 steps, save, rebuild everything from the saved state, 3 more steps
    opt_b = CompositionalMuon(param_groups(b, connection="frobenius"), lr=0.03)
    _train(b, opt_b, 3)
    saved = copy.deepcopy((b.state_dict(), opt_b.state_dict()))
    c = GPT(cfg)
    c.load_state_dict(saved[0])
    opt_c = CompositionalMuon(param_groups(c, connection="frobenius"), lr=0.03)
    opt_c.load_state_dict(saved[1])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # replay the first 3 batches of the generator, then continue
        torch.randint(0, 256, (4, 32), generator=g)
    for _ in range(3):
        x = torch.randint(0, 256, (4, 32), generator=g)
        loss = c(x[:, :-1], x[:, 1:])
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()
    for (name, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), name


def test_lr_scheduler_scales_every_group():
    model = nn.Sequential(LlamaAttention())
    opt = CompositionalMuon(param_groups(model), lr=0.05, adamw_lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    opt.step()  # no gradients yet: a no-op, and torch's scheduler expects this order
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.025, 0.025, 0.005]
    for g in opt.param_groups:
        g["lr"] = 0.0
    _with_grads(model)
    before = copy.deepcopy(model)
    opt.step()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)  # lr 0 (and no weight decay) changes nothing


def test_closure_and_zero_grad():
    model = nn.Sequential(LlamaAttention())
    opt = CompositionalMuon(param_groups(model), lr=0.05)
    x = torch.randn(3, 48)

    def closure():
        opt.zero_grad()
        loss = (
            model[0].q_proj(x).square().mean()
            + model[0].o_proj(model[0].v_proj(x).repeat(1, 3)).square().mean()
        )  # noqa: E501
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_skip_counts_and_leaves_the_pair():
    model = nn.Sequential(LlamaAttention())
    _with_grads(model)
    model[0].q_proj.weight.grad[0, 0] = float("nan")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"q_grad \(48, 48\) contains non-finite"):
        CompositionalMuon(param_groups(model), lr=0.05).step()
    assert torch.equal(model[0].q_proj.weight, before[0].q_proj.weight)
    opt = CompositionalMuon(param_groups(model), lr=0.05, nonfinite="skip")
    opt.step()
    assert torch.equal(model[0].q_proj.weight, before[0].q_proj.weight)
    assert torch.equal(model[0].k_proj.weight, before[0].k_proj.weight)
    assert opt.state[model[0].q_proj.weight]["nonfinite_skips"] == 1
    assert not torch.equal(model[0].v_proj.weight, before[0].v_proj.weight)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"method": "split"}, "method"),
        ({"bogus": 1}, "bogus"),
        ({"lr": -1.0}, "eta"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ],
    ids=str,
)
def test_bad_optimizer_options_name_the_argument(kw, match):
    model = nn.Sequential(LlamaAttention())
    with pytest.raises((ValueError, TypeError), match=match):
        CompositionalMuon(param_groups(model), **kw)


def test_bad_group_kind_and_head_dim():
    w = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="kind"):
        CompositionalMuon([{"kind": "attn", "params": [w]}])
    with pytest.raises(ValueError, match="head_dim"):
        CompositionalMuon([{"kind": "qk", "params": [w, nn.Parameter(torch.randn(8, 8))]}])


def test_badly_shaped_pairs_are_rejected_when_the_optimizer_is_built():
    q = nn.Parameter(torch.randn(30, 16))  # 30 rows: head_dim 8 does not divide them
    k = nn.Parameter(torch.randn(16, 16))
    with pytest.raises(ValueError, match="head_dim=8 does not divide the 30 rows of q_w"):
        CompositionalMuon([{"kind": "qk", "params": [q, k], "head_dim": 8}])
    v, o = nn.Parameter(torch.randn(16, 16)), nn.Parameter(torch.randn(12, 48))
    CompositionalMuon([{"kind": "ov", "params": [v, o], "head_dim": 8}])  # widths may differ
    with pytest.raises(ValueError, match=r"joint.*widths must match \(12 vs 16\)"):  # one sign
        CompositionalMuon([{"kind": "ov", "params": [v, o], "head_dim": 8, "method": "joint"}])
    w = nn.Parameter(torch.randn(3 * 24, 24))
    with pytest.raises(ValueError, match="head_dim=5"):
        CompositionalMuon([{"kind": "mha", "params": [w, nn.Parameter(torch.randn(24, 24))],
                            "head_dim": 5}])  # fmt: skip


def test_nonfinite_muon_or_adamw_gradient_raises_before_anything_moves():
    # The attention pairs step before the Muon group: with "raise", a NaN in the Muon matrix's
    # gradient must stop the step before the pairs move, and leave the optimizer state empty.
    model = nn.Sequential(LlamaAttention())
    _with_grads(model)
    model[0].mlp.weight.grad[1, 1] = float("inf")
    before = copy.deepcopy(model)
    opt = CompositionalMuon(param_groups(model), lr=0.05)
    with pytest.raises(ValueError, match=r"'muon'.*non-finite.*nothing was modified"):
        opt.step()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)
    assert len(opt.state) == 0
    model[0].mlp.weight.grad.fill_(0.1)
    model[0].norm.weight.grad[0] = float("nan")
    with pytest.raises(ValueError, match=r"'adamw'.*non-finite"):
        opt.step()


def test_a_pair_with_a_frozen_weight_leaves_its_partner_in_one_group():
    model = nn.Sequential(LlamaAttention())
    model[0].q_proj.weight.requires_grad_(False)
    groups = param_groups(model)
    ids = _ids(groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert _kinds(groups) == ["ov", "muon", "adamw"]
    assert any(p is model[0].k_proj.weight for p in groups[1]["params"])


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_parameter():
    cfg = GPTConfig(n_layer=1, d_model=64, block_size=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = CompositionalMuon(param_groups(model), lr=0.03)
    _train(model, opt, 2)
    good = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    # A momentum buffer of the wrong shape: today's torch loads it and the next step fails
    # deep inside; the optimizer refuses it first, naming the group and parameter.
    bad = copy.deepcopy(good)
    (i, first), *_ = [(i, g["params"][0]) for i, g in enumerate(bad["param_groups"])
                      if g["kind"] == "qk"]  # fmt: skip
    bad["state"][first]["momentum_buffer"] = torch.zeros(3, 7)
    with pytest.raises(ValueError, match=rf"param group {i} \('qk'\), parameter 0 .*"
                                         r"'momentum_buffer' has shape \(3, 7\)"):  # fmt: skip
        opt.load_state_dict(bad)
    wrong_kind = copy.deepcopy(good)
    wrong_kind["param_groups"][i]["kind"] = "ov"
    with pytest.raises(ValueError, match=rf"param group {i} \('qk'\): .*'kind' is 'ov'"):
        opt.load_state_dict(wrong_kind)
    short = copy.deepcopy(good)
    short["param_groups"] = short["param_groups"][:-1]
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(short)
    now = opt.state_dict()  # nothing was loaded
    for k, st in before["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(now["state"][k][name]), torch.as_tensor(v))
    opt.load_state_dict(good)  # the fitting checkpoint still loads
