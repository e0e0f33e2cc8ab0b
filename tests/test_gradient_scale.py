"""Any finite gradient gives the step a moderate one gives (a loss spike must not stop
training, a vanishing gradient must not be lost to underflow).

CM's and Muon's directions do not depend on the gradient's scale, but fp32 Grams do: before
this, ``D D^T`` overflowed from gradients of ~1e18 (the step was refused, blaming a damping of
0 that was 1e-2) and underflowed below ~1e-19 (a step of 0). Each pair's direction, and each
Muon update, now enters its Grams scaled by a power of two (``phases.direction_scale``), exact
in binary floating point.

Tolerance. c G rounds each entry once (relative 2^-24 in fp32), and the power of two brings
c G and G to the same scale up to a factor in [1/2, 2), so the two steps are the same
computation on inputs 1 ulp apart: the whole step's fp32 sensitivity, measured ~1e-5 for a
step (tests/test_kernels.py), under FP32_RTOL = 1e-4. bf16 weights: each side rounds its
weights once to bf16 (2^-8 relative), and the step is compared on weights of order the step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cm_triton import CompositionalMuon, param_groups

FP32_RTOL = 1e-4
SCALES = [1e-30, 1e-20, 1e-10, 1e10, 1e18, 1e20, 1e30]


class Net(nn.Module):  # the case (nn.MultiheadAttention) and a GQA pair, and Muon
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
        self.q_proj, self.k_proj = nn.Linear(32, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.v_proj, self.o_proj = nn.Linear(32, 16, bias=False), nn.Linear(32, 32, bias=False)
        self.num_heads, self.num_key_value_heads, self.head_dim = 4, 2, 8
        self.fc = nn.Linear(32, 96, bias=False)  # Muon, Gram form (aspect 3)


def _step(scale: float, dtype: torch.dtype, backend: str = "reference", **kw) -> list:
    torch.manual_seed(0)
    net = Net().to(dtype)
    before = [p.detach().float().clone() for p in net.parameters()]
    opt = CompositionalMuon(param_groups(net), lr=0.5, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    opt.step()
    return [p.detach().float() - b for p, b in zip(net.parameters(), before)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scale", SCALES, ids=[f"{s:g}" for s in SCALES])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_scaled_gradient_takes_the_moderate_step_fp32(scale, nonfinite):
    want = _step(1.0, torch.float32, nonfinite=nonfinite)
    got = _step(scale, torch.float32, nonfinite=nonfinite)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and w.norm() > 0
        assert _rel(g, w) < FP32_RTOL, (_rel(g, w), scale)


@pytest.mark.parametrize("scale", SCALES, ids=[f"{s:g}" for s in SCALES])
def test_a_scaled_gradient_takes_the_moderate_step_bf16(scale):
    # Weights of order 0.05, steps of order lr b = 0.25: a bf16 ulp of the updated weight
    # (<= 2^-8 of ~0.3) against steps of ~0.1-0.3 per entry, per side: rtol 2^-6 of the step.
    want = _step(1.0, torch.bfloat16)
    got = _step(scale, torch.bfloat16)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert _rel(g, w) < 2**-6, (_rel(g, w), scale)


def test_scales_of_the_kernel_path_match_the_reference():
    # The kernels take the same power of two (the Gram kernel scales its momentum and
    # direction forms by it): a 1e30 gradient's step on the kernels equals the reference's.
    from cm_triton.dispatch import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    want = _step(1e30, torch.float32)
    got = _step(1e30, torch.float32, backend="triton")
    for g, w in zip(got, want):
        assert _rel(g, w) < FP32_RTOL


def test_a_nonfinite_step_from_finite_gradients_names_its_group(monkeypatch):
    # With the partners damped and every direction scaled, a non-finite step from finite
    # gradients has no cause the package knows: the error says so and names the group (it
    # no longer blames a damping of 0 that is 1e-2), and nothing moves.
    from cm_triton import engine

    real = engine.pair_step

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        return (out[0] * float("nan"), *out[1:])

    monkeypatch.setattr(engine, "pair_step", broken)
    torch.manual_seed(0)
    net = Net()
    opt = CompositionalMuon(param_groups(net), lr=0.02)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match=r"param group 2 \('mha'\).*no cause this"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
