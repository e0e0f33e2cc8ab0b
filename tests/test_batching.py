"""Model-wide batching (engine.py): equal-shaped groups across layers step as one batch.

The op count of a step must not grow with depth (that is what a GPU's launch overhead sees),
and the batched step must equal stepping each layer on its own.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cm_triton import CompositionalMuon, param_groups
from cm_triton.demo import GPT, GPTConfig


def _model(n_layer: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, d_model=64, block_size=16))


def _backward(model: nn.Module, seed: int = 0) -> None:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x[:, :-1], x[:, 1:]).backward()


def _ops_of_one_step(n_layer: int, **options) -> Counter:
    """aten ops dispatched by ``step()`` itself (its direct children in the profile: an op's
    own internals, e.g. a foreach op's per-tensor loop on the CPU, are one launch on a GPU)."""
    model = _model(n_layer)
    opt = CompositionalMuon(param_groups(model, **options), lr=0.01)
    _backward(model)
    opt.step()  # creates the state: the steady state is the second step
    _backward(model, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return Counter(
        e.name
        for e in prof.events()
        if e.cpu_parent is not None and e.cpu_parent.name.startswith("Optimizer.step")
    )


@pytest.mark.parametrize("options", [{}, {"connection": "frobenius", "method": "joint"}], ids=str)
def test_the_op_count_of_a_step_does_not_grow_with_depth(options):
    two, eight = _ops_of_one_step(2, **options), _ops_of_one_step(8, **options)
    assert sum(two.values()) > 100  # the profile did see the step's ops
    assert two == eight


def _per_layer_optimizers(model, lr):
    """One optimizer per param group: each layer's pairs step alone (batches of one)."""
    return [CompositionalMuon([g], lr=lr, adamw_lr=3e-3) for g in param_groups(model)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batched_step_equals_per_layer_steps(dtype):
    # The same per-slice arithmetic either way: batched matmuls (bmm over L*H slices) and
    # eigh compute each slice independently, so the results agree bit for bit.
    a = _model(4).to(dtype)
    b = copy.deepcopy(a)
    opt_a = CompositionalMuon(param_groups(a), lr=0.01, adamw_lr=3e-3)
    opts_b = _per_layer_optimizers(b, 0.01)
    for step in range(3):
        for model in (a, b):
            _backward(model, step)
        opt_a.step()
        for o in opts_b:
            o.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
