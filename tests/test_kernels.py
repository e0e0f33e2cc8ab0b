"""Triton kernels against the reference (spec §6.7).

On CPU these run through Triton's interpreter (conftest sets TRITON_INTERPRET=1), so CI runs
every kernel. On a CUDA machine run with TRITON_INTERPRET=0 to test the compiled kernels.

Tolerances. The kernels and the reference evaluate the same fp32 formulas in a different order
(row blocks, K chunks, partial Grams summed per chunk; tf32x3 dots on a GPU, ~fp32 accurate),
u = 6e-8. The Gram iteration (8 steps of three dh x dh products) and the inverse root amplify
that by the partner's condition (10-100 for these random blocks): measured worst 3e-6 per
phase and ~1e-5 for a whole step. FP32_RTOL = 1e-4 keeps the margin; a formula slip is O(1).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    clones,
    compare_steps,
    flag_id,
    flag_product,
    kernel_launches,
    ov_tensors,
    qk_tensors,
)

from cm_triton import cm_ov, cm_qk
from cm_triton.dispatch import resolve_primitives, triton_available
from cm_triton.reference import REFERENCE
from cm_triton.reference import phases as ref
from cm_triton.schedules import POLAR_EXPRESS_8

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

FP32_RTOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius difference, the worst over leading slices."""
    a, b = a.double().flatten(0, -3), b.double().flatten(0, -3)
    num = (a - b).flatten(1).norm(dim=1)
    return (num / b.flatten(1).norm(dim=1).clamp_min(1e-30)).max().item()


@pytest.fixture(scope="module")
def kp():
    from cm_triton.kernels import phases

    return phases


def _heads(layout: str, b: int, h: int, dh: int, n: int, dtype=torch.float32, seed=0):
    """Heads as the engine passes them: row blocks (q/k/v) or transposed column blocks (o)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "rows":
        x = torch.randn(b, h * dh, n, generator=g).unflatten(1, (h, dh))
    else:
        x = torch.randn(b, n, h * dh, generator=g).unflatten(2, (h, dh)).permute(0, 2, 3, 1)
    return x.to(DEVICE, dtype)


def _spd_root(a: torch.Tensor) -> torch.Tensor:
    return ref.inv_sqrt(a + torch.eye(a.shape[-1], device=a.device), "eigh")


@pytest.mark.parametrize("dh", [8, 16, 32])
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_streaming_phases_match_the_reference(kp, dh, layout, nesterov):
    n = 3 * dh + 5  # not a multiple of any tile
    w, g, m = (_heads(layout, 2, 3, dh, n, seed=s) for s in range(3))
    got, want = kp.stream(w, g, m, 0.9, nesterov), ref.stream(w, g, m, 0.9, nesterov)
    assert torch.equal(got[0], want[0])  # the momentum: the same two fp32 operations
    for a, b in zip(got[1:], want[1:]):
        assert _rel(a, b) < FP32_RTOL
    t = _spd_root(want[1])
    assert _rel(kp.restart_gram(t, g, want[0], 0.9, nesterov),
                ref.restart_gram(t, g, want[0], 0.9, nesterov)) < FP32_RTOL  # fmt: skip
    step = torch.tensor([0.1, 0.2], device=DEVICE).view(2, 1, 1, 1)
    got = kp.apply_update(w, t, g, want[0], 0.9, nesterov, 0.99, step)
    assert _rel(got - 0.99 * w, ref.apply_update(w, t, g, want[0], 0.9, nesterov, 0.99, step)
                - 0.99 * w) < FP32_RTOL  # fmt: skip


def test_a_step_tensor_of_the_wrong_length_is_refused(kp):
    # One step per batch entry (2 here) or one for all; 3 values is neither: refused before
    # anything launches, naming `step`, the inputs as they were.
    w, g, m = (_heads("rows", 2, 3, 8, 29, seed=s) for s in range(3))
    t = _spd_root(w @ w.mT)
    before = [x.clone() for x in (w, t, g, m)]
    with pytest.raises(ValueError, match="step: expected 1 or 2 values"):
        kp.apply_update(w, t, g, m, 0.9, False, 0.99, torch.tensor([0.1, 0.2, 0.3]))
    assert all(torch.equal(x, y) for x, y in zip((w, t, g, m), before))


def test_streaming_phases_read_bf16_weights(kp):
    # bf16 inputs are read and accumulated in fp32: the same values as upcasting first.
    w, g, m = (_heads("cols", 2, 2, 16, 40, torch.bfloat16, seed=s) for s in range(3))
    got = kp.stream(w, g, m, 0.95, False)
    want = ref.stream(w.float(), g.float(), m.float(), 0.95, False)
    for a, b in zip(got, want):
        assert _rel(a, b) < FP32_RTOL


@pytest.mark.parametrize("dh", [8, 16, 32])
@pytest.mark.parametrize("with_root", [False, True])
def test_dh_algebra_matches_the_reference(kp, dh, with_root):
    w = _heads("rows", 2, 3, dh, 3 * dh)
    s = w @ w.mT
    root = _spd_root(s) if with_root else None
    first, rest = POLAR_EXPRESS_8[:3], POLAR_EXPRESS_8[3:]
    for a, b in zip(kp.first_maps(s, root, first), ref.first_maps(s, root, first)):
        assert _rel(a, b) < FP32_RTOL
    t, r = ref.first_maps(s, root, first)
    got, want = kp.last_maps(r, t, root, rest), ref.last_maps(r, t, root, rest)
    assert _rel(got[0], want[0]) < FP32_RTOL
    assert _rel(got[1], want[1]) < FP32_RTOL  # U U^T: near-zero off-diagonal entries
    a = s + 0.1 * torch.eye(dh, device=DEVICE)
    assert _rel(kp.inv_sqrt(a, "quintic"), ref.inv_sqrt(a, "quintic")) < FP32_RTOL


def test_the_chooser_hands_what_the_kernels_do_not_take_to_the_reference(kp):
    # The kernels raise on what they do not take; cm_triton.dispatch sends it to the
    # reference before any launch (bit for bit the reference's result).
    chosen = resolve_primitives("triton", torch.device(DEVICE)).phases
    a = torch.randn(2, 4, 4, dtype=torch.float64)
    a = a @ a.mT + torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="inv_sqrt"):
        kp.inv_sqrt(a, "quintic")
    with kernel_launches() as n:
        assert torch.equal(chosen.inv_sqrt(a, "quintic"), ref.inv_sqrt(a, "quintic"))  # float64
        b = a.float()
        assert torch.equal(chosen.inv_sqrt(b, "eigh"), ref.inv_sqrt(b, "eigh"))  # eigh: cuSOLVER
        big = torch.randn(1, 1, 160, 200, device=DEVICE)
        big = big @ big.mT  # an SPD dh x dh Gram past MAX_HEAD_DIM
        got = chosen.first_maps(big, None, POLAR_EXPRESS_8[:3])
        want = ref.first_maps(big, None, POLAR_EXPRESS_8[:3])
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    assert sum(n.values()) == 0
    with pytest.raises(ValueError, match="first_maps"):
        kp.first_maps(big, None, POLAR_EXPRESS_8[:3])
    rows = torch.randn(1, 2, 160, 400, device=DEVICE)  # rows past one block: tiled, a kernel
    with kernel_launches() as n:
        got = chosen.stream(rows, rows, rows, 0.9, False)
    assert n["gram"] == 1
    for x, y in zip(got, ref.stream(rows, rows, rows, 0.9, False)):
        assert _rel(x, y) < FP32_RTOL


def test_triton_backend_uses_the_kernels():
    from cm_triton.kernels import KERNEL_PHASES

    chosen = resolve_primitives("triton", torch.device(DEVICE))
    assert chosen.phases.apply_update.__name__ == KERNEL_PHASES.apply_update.__name__
    assert chosen is not REFERENCE
    if DEVICE == "cpu":  # "auto" keeps CPU tensors on the reference, interpreter or not
        assert resolve_primitives("auto", torch.device("cpu")) is REFERENCE


def _compare_step(fn, make, shape, flags, dtype=torch.float32, rtol=FP32_RTOL, **extra):
    """The Triton step against the reference's; the Triton step must launch the stream
    (``gram``) and apply (``map``) kernels: every flag combination's big-matrix passes."""
    with kernel_launches() as n:
        compare_steps(fn, make, shape, {"backend": "triton", **flags, **extra},
                      {"backend": "reference", **flags, **extra}, rtol, dtype, DEVICE)  # fmt: skip
    assert n["gram"] >= 1 and n["map"] >= 1, dict(n)


SHAPES = {"mha": (2, 2, 16, 37), "gqa": (4, 2, 16, 37)}
QK_FLAGS = list(flag_product())
OV_FLAGS = list(flag_product(ov=True))


# Every combination runs its kernels under the interpreter: QK's 320 on MHA and on GQA (the
# grouped partner roots meet every flag), OV's 640 on GQA; every combination asserts its
# stream and apply launches. Two things the flags do not change are cut to what the routes
# need, as they are most of the interpreter's time (one tl op costs it ~0.5 ms): the partner
# roots are eigh's (the inverse root is one kernel whatever the flags, its input the partner
# Gram: test_the_inverse_root_kernel_on_the_flag_shapes checks it on these very Grams), and
# the schedule is Polar Express's first three steps with the restart after the first (the
# dh x dh kernels loop over the steps; every route, restart included, still runs; the full
# schedule runs through every route in the tests below and in test_tables's whole steps).
FLAG_RUN = {"inv_root": "eigh", "ns_coefficients": POLAR_EXPRESS_8[:3], "ns_restart": 1}


@pytest.mark.usefixtures("no_overflow_check")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("flags", QK_FLAGS, ids=[flag_id(f) for f in QK_FLAGS])
def test_cm_qk_triton_matches_reference_every_flag(shape, flags):
    _compare_step(cm_qk, qk_tensors, SHAPES[shape], flags, **FLAG_RUN)


@pytest.mark.usefixtures("no_overflow_check")
@pytest.mark.parametrize("shape", ["gqa"])
@pytest.mark.parametrize("flags", OV_FLAGS, ids=[flag_id(f) for f in OV_FLAGS])
def test_cm_ov_triton_matches_reference_every_flag(shape, flags):
    _compare_step(cm_ov, ov_tensors, SHAPES[shape], flags, **FLAG_RUN)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_inverse_root_kernel_on_the_flag_shapes(kp, shape):
    # The flag products' partner Grams (q, k, v and o heads, KV groups summed), damped as the
    # step damps them: the quintic kernel against the reference's quintic and against eigh.
    hq, hkv, dh, d = SHAPES[shape]
    q, k = qk_tensors(hq, hkv, dh, d, dtype=torch.float32)[:2]
    v, o = ov_tensors(hq, hkv, dh, d, dtype=torch.float32)[:2]
    heads = [q.unflatten(0, (hq, dh)), k.unflatten(0, (hkv, dh)), v.unflatten(0, (hkv, dh)),
             o.unflatten(1, (hq, dh)).permute(1, 2, 0)]  # fmt: skip
    grams = [h @ h.mT for h in heads]
    grams += [g.view(hkv, hq // hkv, dh, dh).sum(1) for g in (grams[0], grams[3])]
    for a in grams:
        a = (a + 1e-2 * torch.eye(dh))[None].to(DEVICE)
        got = kp.inv_sqrt(a, "quintic")
        assert _rel(got, ref.inv_sqrt(a, "quintic")) < FP32_RTOL
        assert _rel(got, ref.inv_sqrt(a, "eigh")) < FP32_RTOL


# Joint's Gram route: a group of (G+1) dh rows at most half the width (the shapes above take
# its explicit route: 2 x 16 rows of 37 columns, or 3 x 16, taller than wide).
JOINT_WIDE = [dict(method="joint", whitening=w, connection=c, momentum_reproject=r,
                   per_mat_renorm=n)
              for w in ("both", "none") for c in ("none", "frobenius", "scale_aware_scalar")
              for r in (False, True) for n in (False, True)]  # fmt: skip


@pytest.mark.usefixtures("no_overflow_check")
@pytest.mark.parametrize("flags", JOINT_WIDE, ids=[flag_id(f) for f in JOINT_WIDE])
def test_joint_gram_route_matches_reference(flags):
    shape = (2, 1, 8, 70)  # G = 2: 24-row groups over 70 columns
    _compare_step(cm_qk, qk_tensors, shape, flags)
    for hybrid in (False, True):
        _compare_step(cm_ov, ov_tensors, shape, {**flags, "hybrid": hybrid})


@pytest.mark.parametrize("extra", [{"inv_root": "quintic"}, {"nesterov": True},
                                   {"ns_restart": 0}, {"weight_decay": 0.1}], ids=str)  # fmt: skip
def test_the_fused_pipeline_with_other_options(extra):
    shape = (4, 2, 32, 70)
    _compare_step(cm_qk, qk_tensors, shape, {}, **extra)
    _compare_step(cm_ov, ov_tensors, shape, {"hybrid": False}, **extra)


def test_bf16_weights_match_reference():
    # bf16 weights: the step (eta b |Delta| ~ 0.05 x 0.2) is below one bf16 ulp of an O(1)
    # weight, so compare the weights themselves: each side rounds once (<= 2^-8 relative each,
    # rtol 2^-7), and the fp32 results before rounding differ by < 1e-4 of the step.
    for fn, make in ((cm_qk, qk_tensors), (cm_ov, ov_tensors)):
        ts = make(4, 2, 32, 70, dtype=torch.bfloat16, device=DEVICE)
        got, want = clones(ts), clones(ts)
        fn(*got, head_dim=32, eta=0.1, backend="triton")
        fn(*want, head_dim=32, eta=0.1, backend="reference")
        for g, w in zip(got, want):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.float(), w.float(), rtol=2**-7, atol=2**-14)


def test_the_cost_model_picks_kernels_for_many_heads_and_torch_for_few_big_ones():
    # cost_model.use_kernel on CUDA follows these estimates (deterministic arithmetic).
    from cm_triton.cost_model import GPUS, estimate, prefer_kernel

    h100 = GPUS["H100"]
    assert prefer_kernel("maps", 32, 32, 128, 0, h100)  # 1024 heads: one launch beats 37 x 5
    assert not prefer_kernel("maps", 1, 16, 128, 0, h100)  # 16 programs on 132 SMs
    kernel, torch_ = estimate("stream", 32, 32, 128, 4096, h100)
    assert kernel.launches == 1 and torch_.launches == 4 and kernel.bytes < torch_.bytes


def test_int32_offsets_stay_inside_one_head_at_a_70b_shape():
    # Llama-70B: 80 layers, width 8192, 64 query / 8 KV heads of 128, an MLP of 28672 (each
    # Muon matrix a leg of 8192 rows, its short side, read transposed). Meta tensors: shapes
    # and strides only, nothing allocated. What grows with the launch passes 2^31 (a batch
    # entry's offset, a scratch block's) and is int64 in every kernel (the compile gate reads
    # the TTIR: cm_triton.aot.narrow_program_offsets); what the kernels keep in int32 is one
    # tile's offset inside one head, which must fit for these shapes.
    from cm_triton.kernels.common import INT32_MAX, streams_take, tile_extent

    layers, d, hq, dh, f = 80, 8192, 64, 128, 28672
    q = torch.empty(layers, hq * dh, d, device="meta").unflatten(1, (hq, dh))
    o = torch.empty(layers, d, hq * dh, device="meta").unflatten(2, (hq, dh)).permute(0, 2, 3, 1)
    mlp = torch.empty(layers, f, d, device="meta").mT.unsqueeze(1)  # (80, 1, 8192, 28672)
    joint = torch.empty(layers, 8, 9 * dh, d, device="meta")  # a KV group's 8 + 1 heads
    for x in (q, o, mlp, joint):
        assert streams_take(x, x, x) and tile_extent(x) <= INT32_MAX, tuple(x.shape)
    assert layers * f * d > INT32_MAX  # the MLP layers' offsets from layer 0: int64 tables
    rp = 8192  # the MLP legs' Gram scratch: one (rp, rp) block per layer
    assert layers * rp * rp > INT32_MAX
    # A head whose own extent passes 2^31 is sent to the reference (streams_take False).
    wide = torch.empty(1, 1, 2, 2**30 + 1, device="meta")
    assert not streams_take(wide, wide, wide)
