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

import dataclasses

import pytest
import torch
from helpers import (
    clones,
    compare_steps,
    flag_id,
    flag_product,
    kernel_launches,
    needs,
    ov_tensors,
    qk_tensors,
)

from cm_triton import cm_ov, cm_qk
from cm_triton.dispatch import resolve_primitives
from cm_triton.options import CMOptions
from cm_triton.reference import REFERENCE
from cm_triton.reference import phases as ref
from cm_triton.schedules import POLAR_EXPRESS_8

pytestmark = needs("triton")

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


def test_the_triton_backend_chooses_the_kernels_themselves(kp):
    # By identity, not by name (kernel and reference phases share their names): each phase of
    # the backend picks between this very kernel and this very reference function, and on
    # input the kernel takes it launches it.
    from cm_triton.dispatch import PHASE_OF
    from cm_triton.kernels import KERNEL_PHASES

    chosen = resolve_primitives("triton", torch.device(DEVICE))
    assert chosen is not REFERENCE
    for name in PHASE_OF:
        run = getattr(chosen.phases, name)
        assert run.kernel is getattr(KERNEL_PHASES, name), name
        assert run.reference is getattr(ref.REFERENCE_PHASES, name), name
    w, g, m = (_heads("rows", 1, 2, 8, 40, seed=s) for s in range(3))
    t = _spd_root(w @ w.mT)
    with kernel_launches() as n:
        chosen.phases.apply_update(w, t, g, m, 0.9, False, 1.0, 0.1)
    assert dict(n) == {"map": 1}
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


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each |x| (8 significand bits: |x| in [2^(e-1), 2^e)
    has ulp 2^(e-8))."""
    _, e = torch.frexp(x.float().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


def _assert_bf16_steps_agree(fn, make, **kw):
    # bf16 weights of 1e-3 and eta 1: each new weight is mostly the step, so each side's one
    # rounding to bf16 is what separates them: the fp32 values before it differ by under
    # FP32_RTOL of the step, so the rounded ones by at most one ulp (ulp(x) <= 2^-7 |x|),
    # plus that difference. A step 1% off moves its largest entries by 1% > 2^-7 = 0.78%:
    # more than an ulp (test_a_one_percent_error_in_any_phase_fails breaks it so).
    ts = make(4, 2, 32, 70, dtype=torch.float32, device=DEVICE)
    ts = [t * 1e-3 if i < 2 else t for i, t in enumerate(ts)]
    ts = [t.to(torch.bfloat16) for t in ts]
    got, want = clones(ts), clones(ts)
    fn(*got, head_dim=32, eta=1.0, backend="triton", **kw)
    fn(*want, head_dim=32, eta=1.0, backend="reference", **kw)
    for i, (g, w, t0) in enumerate(zip(got, want, ts)):
        assert g.dtype == torch.bfloat16
        g, w = g.float(), w.float()
        step = (w - t0.float()).abs().max()
        bound = _bf16_ulp(torch.maximum(g.abs(), w.abs())) + FP32_RTOL * step
        assert ((g - w).abs() <= bound).all(), (i, ((g - w).abs() / bound).max().item())


def test_bf16_weights_match_reference():
    for fn, make in ((cm_qk, qk_tensors), (cm_ov, ov_tensors)):
        _assert_bf16_steps_agree(fn, make)


def _off_by_one_percent(fn):
    # Every entry 1% off, up or down by the parity of its column: a uniform 1.01 is absorbed
    # by what follows some phases (a scaled T_r is undone by the Newton-Schulz steps after
    # the restart, which normalise), an uneven one is an error in the step.
    def wrong(out):
        if isinstance(out, dict):
            return {k: wrong(v) for k, v in out.items()}
        if isinstance(out, tuple):
            return tuple(wrong(x) for x in out)
        sign = 1 - 2 * (torch.arange(out.shape[-1], device=out.device) % 2)
        return out * (1 + 0.01 * sign)

    def run(*args, **kwargs):
        return wrong(fn(*args, **kwargs))

    return run


# Each kernel phase, and flags whose step runs it: a 1% error in it must fail the parity
# check (FP32_RTOL = 1e-4; bf16: one ulp), or the tolerances guard less than they look.
BROKEN = {
    "stream": (cm_qk, {}), "first_maps": (cm_qk, {}), "restart_gram": (cm_qk, {}),
    "last_maps": (cm_qk, {}), "apply_update": (cm_qk, {}), "inv_sqrt": (cm_qk, {}),
    "stream_grams": (cm_qk, {"connection": "frobenius"}),
    "cross_grams": (cm_ov, {"connection": "frobenius"}),
}  # fmt: skip


@pytest.mark.parametrize("phase", list(BROKEN))
def test_a_one_percent_error_in_any_phase_fails(phase, monkeypatch):
    from cm_triton import dispatch
    from cm_triton.kernels import KERNEL_PHASES

    fn, flags = BROKEN[phase]
    make = qk_tensors if fn is cm_qk else ov_tensors
    broken = dataclasses.replace(KERNEL_PHASES, **{
        phase: _off_by_one_percent(getattr(KERNEL_PHASES, phase))})  # fmt: skip
    monkeypatch.setattr(dispatch, "_triton_primitives",
                        lambda guarded=False: dispatch.build_primitives(broken))  # fmt: skip
    kw = {"inv_root": "quintic", **flags}
    with pytest.raises(AssertionError):
        _compare_step(fn, make, (4, 2, 16, 70), kw)
    if phase in ("stream", "apply_update", "last_maps"):
        with pytest.raises(AssertionError):
            _assert_bf16_steps_agree(fn, make, **kw)


def test_tf32x3_dots_stay_within_the_fp32_tolerance():
    # On a GPU every tl.dot is tf32x3: each operand split into a tf32 high part and a tf32
    # remainder, three products summed (the remainders' product dropped). The interpreter
    # computes them in plain fp32, so FP32_RTOL's premise (the kernels' arithmetic is fp32's
    # to within the reorderings) is checked here by emulating tf32x3 in every product of the
    # kernels' phases: the step stays within FP32_RTOL of the fp32 reference; one tf32 pass
    # (10-bit products) does not, so the check can fail.
    from torch.overrides import TorchFunctionMode

    from cm_triton.dispatch import build_primitives
    from cm_triton.reference.rule import pair_step

    def tf32(x):  # round to 10 mantissa bits, to nearest, as cvt.rna.tf32.f32
        bits = x.float().contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)

    def dot(a, b, passes):
        ah, bh = tf32(a), tf32(b)
        if passes == 1:
            return torch.matmul(ah, bh)
        return torch.matmul(ah, bh) + torch.matmul(ah, tf32(b - bh)) + torch.matmul(
            tf32(a - ah), bh)  # fmt: skip

    class Dots(TorchFunctionMode):
        def __init__(self, passes):
            super().__init__()
            self.passes = passes

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            out = kwargs.pop("out", None)
            if func in (torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__):
                value = dot(args[0], args[1], self.passes)
            elif func is torch.baddbmm:
                beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
                value = beta * args[0] + alpha * dot(args[1], args[2], self.passes)
            else:
                return func(*args, **kwargs, **({} if out is None else {"out": out}))
            return value if out is None else out.copy_(value)

    def emulated(fn, passes):
        def run(*args, **kwargs):
            with Dots(passes):
                return fn(*args, **kwargs)

        return run

    names = ("stream", "stream_grams", "cross_grams", "first_maps", "restart_gram",
             "last_maps", "apply_update")  # fmt: skip
    ts = [t.unflatten(0, (-1, 16))[None] for t in qk_tensors(4, 2, 16, 70,
                                                              dtype=torch.float32)]  # fmt: skip
    from cm_triton.dispatch import resolve_options

    opts = resolve_options(CMOptions(eta=0.1, inv_root="eigh"), torch.device("cpu"))
    want = pair_step(*ts, opts)
    for passes, ok in ((3, True), (1, False)):
        ops = dataclasses.replace(ref.REFERENCE_PHASES, **{
            n: emulated(getattr(ref.REFERENCE_PHASES, n), passes) for n in names})  # fmt: skip
        prims = build_primitives(ops)
        got = pair_step(*ts, opts, prims=prims)
        worst = max(((g - w).norm() / (w - t).norm()).item()
                    for g, w, t in zip(got[:2], want[:2], ts[:2]))  # fmt: skip
        assert (worst < FP32_RTOL) == ok, (passes, worst)


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


@pytest.mark.parametrize("arch", [86, 100])
def test_each_target_familys_tiles_compute_the_same(kp, arch, monkeypatch):
    # The launch shapes differ by target (kernels.common: 64-row Gram blocks on mma.sync
    # targets, i <= j block pairs mirrored; more warps where registers or shared memory are
    # short): the same values as the reference on every family. The interpreter has no
    # target, so it is named here: heads of 128 (one Gram block, or two on sm_86), and a leg
    # of 256 rows (row-tiled; its restart in two passes).
    from cm_triton.kernels import common

    monkeypatch.setattr(common, "target_arch", lambda: arch)
    for rows in (128, 256):
        w, g, m = (_heads("rows", 1, 1, rows, 2 * rows + 16, seed=s) for s in range(3))
        got, want = kp.stream(w, g, m, 0.9, True), ref.stream(w, g, m, 0.9, True)
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1:], want[1:]):
            assert _rel(a, b) < FP32_RTOL
        cross = kp.stream_grams(w, g, m, 0.9, False, ("ww", "dd", "wd"))[1]
        for key, x in ref.stream_grams(w, g, m, 0.9, False, ("ww", "dd", "wd"))[1].items():
            assert _rel(cross[key], x) < FP32_RTOL, key
        t = _spd_root(want[1])
        assert _rel(kp.restart_gram(t, g, want[0], 0.9, True),
                    ref.restart_gram(t, g, want[0], 0.9, True)) < FP32_RTOL  # fmt: skip
    if arch == 86:  # a whole step: the mma.sync family's (the other family's tiles as above)
        _compare_step(cm_qk, qk_tensors, (2, 1, 128, 260), {}, inv_root="quintic")
