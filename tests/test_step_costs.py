"""What a step costs, counted (deterministic, CPU): copies, host reads, ops, graph breaks,
planning. The model is Llama-shaped (4 blocks, d 256, 8/2 heads; ``step_costs.Llama``).

Before this design (the 2026-12-01 measurement of the issue): copies 18.2x the parameter
bytes, 12 host reads with nonfinite="raise" and 13 with "skip", 28 graph breaks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from step_costs import Llama, step_costs

from cm_triton import CompositionalMuon, engine, param_groups
from cm_triton.dispatch import triton_available
from cm_triton.options import CMOptions

# These count a step's costs (the kernel path through the interpreter): the interpreter's
# int32 overflow check off, as for the kernels' flag products (conftest.no_overflow_check).
pytestmark = pytest.mark.usefixtures("no_overflow_check")


def _cm(**kw):
    return lambda model: CompositionalMuon(param_groups(model), lr=0.02, **kw)


# Copies of the reference path: the weights and gradients are stacked once (2 units each:
# read and write) and the weights written back once (2): 6 units of the CM and Muon share of
# the parameters (all but the embedding, head and norms: 98.8% here) = 5.93, plus the P heads'
# partner roots repeated over their KV groups (Hq dh x dh per layer: 0.047) and a pair's two
# Grams concatenated for one batched inverse root (0.023). The momentum is neither stacked
# nor copied back (the state is a view of the batch's stack).
REFERENCE_COPIES = 6.0


def test_a_step_copies_the_weights_and_gradients_once():
    torch.manual_seed(0)
    costs = step_costs(Llama(), _cm())
    assert costs.copies <= REFERENCE_COPIES, costs.by_op
    assert costs.by_op["stack"] < 3.6 and costs.by_op["_foreach_copy_"] < 2.4, costs.by_op
    assert costs.by_op.get("clone", 0) < 0.05 and costs.by_op.get("cat", 0) < 0.025, costs.by_op


def test_the_kernel_path_reads_weights_and_gradients_in_place():
    # backend="triton" (the interpreter here; its own argument copies are not counted): the
    # kernels read each layer's weight and gradient where it lives (tables.LayerRows), so
    # nothing is stacked. What is left is the weights' write-back (read the new values, write
    # the parameters: 2 units of the CM and Muon share of the parameters); the dh x dh
    # kernels read a KV group's shared root by index (none is repeated) and dh 16 needs no
    # padding, so the rest is the small offset tables and flags (< 0.01).
    model = Llama(n=2, d=64, hq=4, hkv=2)
    total = sum(p.numel() for p in model.parameters())
    share = sum(p.numel() for n, p in model.named_parameters()
                if p.ndim == 2 and "embed" not in n and "lm_head" not in n) / total  # fmt: skip
    costs = step_costs(model, _cm(backend="triton"))
    assert costs.by_op.get("stack", 0) < 0.01, costs.by_op  # offsets tables only
    assert costs.by_op["_foreach_copy_"] == pytest.approx(2 * share, rel=1e-6), costs.by_op
    assert costs.copies <= 2 * share + 0.01, (costs.by_op, 2 * share)


@pytest.mark.parametrize("nonfinite, reads", [("skip", 0), ("raise", 1)])
def test_host_reads_per_step(nonfinite, reads):
    # "skip": a non-finite member is masked on the device and counted in a device tensor;
    # "raise": one flag for the whole step, read before anything is written.
    torch.manual_seed(0)
    assert step_costs(Llama(), _cm(nonfinite=nonfinite)).reads == reads


REAL_WIDTHS = {
    "llama_d256": dict(n=2, d=256),
    "block_d1024_mlp4d": dict(n=1, d=1024, hq=8, hkv=2, hidden=4096),
}


@pytest.mark.parametrize("chooser", ["every_phase", "h100_model"])
@pytest.mark.parametrize("width", list(REAL_WIDTHS))
def test_the_kernel_path_reads_in_place_at_real_widths(width, chooser, monkeypatch):
    # Llama-shaped at d 256 (SwiGLU 688: Muon legs of 256 rows, two row blocks) and a d-1024
    # block with a 4d MLP (Muon legs of 1024 rows, row-tiled), kernels stubbed
    # (helpers.stub_kernels: they compute nothing; every torch op around them is the kernel
    # path's own). "every_phase": each phase a kernel takes runs it (the CPU's chooser);
    # "h100_model": each phase as on an H100, by the cost model (the stack torch would form
    # charged to torch). Either way nothing big is stacked: the copies are the weights'
    # write-back (2 units of the CM and Muon share), plus, where the model gives the dh x dh
    # algebra of a few heads to torch, the partner roots its KV groups share repeated per head
    # for it (first and last maps: 2 x 2 units of Hq R^2 fp32 per layer, R <= 128).
    from cm_triton import cost_model, dispatch

    if chooser == "h100_model":
        h100 = cost_model.GPUS["H100"]

        def as_on_h100(phase, b, h, dh, n, device, stacked=0):
            return cost_model.prefer_kernel(phase, b, h, dh, n, h100, stacked)

        monkeypatch.setattr(dispatch, "use_kernel", as_on_h100)
    cfg = REAL_WIDTHS[width]
    model = Llama(**cfg)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    share = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if p.ndim == 2 and "embed" not in n and "lm_head" not in n) / pbytes  # fmt: skip
    hq, layers = cfg.get("hq", 8), cfg["n"]
    roots = 2 * 2 * layers * hq * 128**2 * 4 / pbytes if chooser == "h100_model" else 0.0
    costs = step_costs(model, _cm(backend="triton"), stub=True)
    assert costs.by_op.get("stack", 0) < 1e-3, costs.by_op  # offsets and flags only
    assert costs.by_op["_foreach_copy_"] == pytest.approx(2 * share, rel=1e-6), costs.by_op
    assert costs.copies <= 2 * share + roots + 1e-3, (costs.by_op, 2 * share, roots)
    assert costs.triton["gram"] >= 2 and costs.triton["map"] >= 2, costs.triton
    if chooser == "every_phase":
        assert costs.copies <= 2.0, costs.by_op


STEADY = [
    {},
    {"nonfinite": "skip"},
    {"nonfinite": "skip", "capturable": True},
    {"backend": "triton"},
    {"backend": "triton", "nonfinite": "skip", "capturable": True},
]


@pytest.mark.parametrize("kw", STEADY, ids=[str(k) for k in STEADY])
def test_a_steady_step_builds_no_tensor_from_host_data(kw):
    # On CUDA a tensor built from host data (torch.tensor of a list) is a host-to-device copy
    # the stream waits for, and a CUDA graph refuses it while capturing. The kernels' tables
    # (coefficients, pair lists, stride offsets) are made once; the layer offsets are the
    # plan's, rewritten on the device: here every step's gradients are new tensors (as
    # zero_grad(set_to_none=True) makes them), so they move and the grads' tables are
    # rewritten each step, still without host data. Before: 25 per step on this model.
    if kw.get("backend") == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    costs = step_costs(Llama(n=2, d=32, hq=4, hkv=2), _cm(**kw))
    assert costs.built == {}, costs.built


def test_ops_per_step_do_not_grow_with_depth():
    # (With nonfinite="skip", AdamW masks each of its parameters on its own: its ops grow
    # with the number of AdamW parameters, the norms of every layer.)
    two, eight = (step_costs(Llama(n=n, d=64), _cm()) for n in (2, 8))
    assert two.ops == eight.ops and two.ops > 100, (two.ops, eight.ops)
    assert two.launches == eight.launches and 0 < two.launches < two.ops, (two, eight)
    assert not two.triton  # the reference path launches no Triton kernel


def test_kernel_launches_per_step_do_not_grow_with_depth():
    # backend="triton": each batch's passes are one launch over all of its layers (the
    # kernels read layer l at first + offsets[l]), so a deeper model launches the same.
    # Gradients kept in place (one layer's offsets cannot move, two layers' can).
    one, two = (step_costs(Llama(n=n, d=32, hq=4, hkv=2), _cm(backend="triton"),
                           moving_grads=False) for n in (1, 2))  # fmt: skip
    assert one.triton == two.triton and one.launches == two.launches, (one, two)
    assert one.triton["gram"] >= 1 and one.triton["map"] >= 1, one.triton
    # Gradients made anew each step move: each gradient operand read in place rewrites its
    # offsets table on the device, two launches (zero_, _foreach_add_) whatever the depth.
    moved = step_costs(Llama(n=2, d=32, hq=4, hkv=2), _cm(backend="triton"))
    tables = sum(op == "g" for b in moved.optimizer._plan.batches for _, op in b.tables)
    assert tables > 0 and moved.launches == two.launches + 2 * tables, (moved, two, tables)


def test_a_step_does_not_plan(monkeypatch):
    # The plan (batches, resolved options, primitives) is built once per structure: a steady
    # step validates no options and builds no plan; a new lr (a scheduler) only replaces the
    # batches' eta, once per batch; a new param group or a load plans again.
    torch.manual_seed(0)
    model = Llama(n=2, d=64)
    opt = CompositionalMuon(param_groups(model), lr=0.02)
    calls = {"post_init": 0, "plan": 0}
    post_init, build = CMOptions.__post_init__, engine.build_plan

    def counting_post_init(self):
        calls["post_init"] += 1
        post_init(self)

    def counting_build(*a, **kw):
        calls["plan"] += 1
        return build(*a, **kw)

    monkeypatch.setattr(CMOptions, "__post_init__", counting_post_init)
    monkeypatch.setattr(engine, "build_plan", counting_build)

    def step():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()

    step()
    assert calls["plan"] == 1
    calls.update(post_init=0)
    step()
    assert calls == {"post_init": 0, "plan": 1}
    for g in opt.param_groups:
        g["lr"] *= 0.5
    step()
    batches = len(opt._plan.batches)
    assert calls == {
        "post_init": sum(b.kind == "attention" for b in opt._plan.batches)
        + sum(b.kind == "muon" for b in opt._plan.batches),
        "plan": 1,
    }, batches
    opt.load_state_dict(opt.state_dict())
    step()
    assert calls["plan"] == 2


@pytest.mark.parametrize("nonfinite, breaks", [("skip", 0), ("raise", 1)])
def test_torch_compile_traces_the_step_whole(nonfinite, breaks):
    # torch._dynamo.explain counts the graph breaks of the steady-state step: "skip" reads
    # nothing back, so the step is one graph; "raise" breaks once, at its one host read.
    torch.manual_seed(0)
    model = Llama(n=1, d=32)
    opt = CompositionalMuon(param_groups(model), lr=0.02, nonfinite=nonfinite)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if _ == 0:
            opt.step()
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(opt.step)()
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == breaks, [r.reason for r in explained.break_reasons]


def test_capturable_steps_the_same_in_place():
    # capturable=True writes the momentum into the same stacks (a CUDA graph replays fixed
    # addresses): the same bits as the default, buffers that never move, no host read.
    torch.manual_seed(0)
    a = Llama(n=2, d=64)
    b = Llama(n=2, d=64)
    b.load_state_dict(a.state_dict())
    opt_a = CompositionalMuon(param_groups(a), lr=0.02, nonfinite="skip")
    opt_b = CompositionalMuon(param_groups(b), lr=0.02, nonfinite="skip", capturable=True)
    gen = torch.Generator().manual_seed(1)
    addresses = None
    for _ in range(3):
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
        now = [opt_b.state[q]["momentum_buffer"].data_ptr() for q in b.parameters()
               if "momentum_buffer" in opt_b.state[q]]  # fmt: skip
        assert addresses is None or now == addresses
        addresses = now
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key in ("momentum_buffer", "exp_avg"):
            if key in opt_a.state[p]:
                assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])
    assert step_costs(Llama(n=2, d=64), _cm(nonfinite="skip", capturable=True)).reads == 0
    with pytest.raises(ValueError, match="capturable=True needs nonfinite='skip'"):
        CompositionalMuon(param_groups(a), lr=0.02, capturable=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_capturable_step_replays_in_a_cuda_graph():
    # The same arithmetic replayed: equal to eager steps up to the kernels' own run-to-run
    # order (fp32 Grams summed in a fixed order: bit for bit expected; 1e-6 allows cuBLAS's
    # algorithm choice to differ between capture and eager).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_check

    worst, _ = gpu_check.replay_difference({"n": 2, "d": 256}, "cuda")
    assert worst <= 1e-6
