"""Triton kernels against the reference (spec §6.7).

On CPU these run through Triton's interpreter (conftest sets TRITON_INTERPRET=1), so CI runs
every kernel. On a CUDA machine run with TRITON_INTERPRET=0 to test the compiled kernels.

Tolerances. fp32: both sides do the same fp32 arithmetic in a different summation order
(u = 6e-8). The Newton-Schulz msign (8 steps) and the coupled inverse root (25 steps, each
three dh x dh products) amplify that by the partner's condition number (10-100 for these
random blocks); measured worst relative difference: 3e-6 for the primitives and 1.4e-5 for a
whole cm_qk/cm_ov step over all 1920 flag combinations. FP32_RTOL = 1e-4 keeps ~7x margin; a
formula difference is O(1). bf16 iterations: see BF16_NS_RTOL in test_primitives.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import clones, flag_id, flag_product, ov_tensors, qk_tensors
from test_primitives import BF16_NS_RTOL

from cm_triton import MUON_CLASSIC_5, POLAR_EXPRESS_8, cm_ov, cm_qk
from cm_triton.dispatch import resolve_primitives, triton_available
from cm_triton.functional import col_heads_t, row_heads
from cm_triton.reference import primitives as ref

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

FP32_RTOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius difference per leading slice, the worst one."""
    a, b = a.double(), b.double()
    num = (a - b).flatten(1).norm(dim=1)
    return (num / b.flatten(1).norm(dim=1).clamp_min(1e-30)).max().item()


@pytest.fixture(scope="module")
def kernels():
    from cm_triton import kernels

    return kernels


LAYOUTS = ["rows", "cols", "tall"]


def _slices(layout, h, dh, d, dtype):
    """Head slices as cm_triton passes them: row blocks, transposed column blocks of an o
    weight (strided, no copy), or tall slices (iterated on their transpose)."""
    if layout == "rows":
        return row_heads(torch.randn(h * dh, d, device=DEVICE).to(dtype), dh)
    if layout == "cols":
        return col_heads_t(torch.randn(d, h * dh, device=DEVICE).to(dtype), dh)
    return row_heads(torch.randn(h * dh, d, device=DEVICE).to(dtype), dh).mT


@pytest.mark.parametrize("dh", [16, 32, 64, 128])
@pytest.mark.parametrize("d", [37, 200])  # neither a multiple of the column tile
@pytest.mark.parametrize("layout", LAYOUTS)
def test_msign_kernel_matches_reference_fp32(kernels, dh, d, layout):
    x = _slices(layout, 3, dh, d, torch.float32)
    assert _rel(kernels.msign(x), ref.msign(x)) < FP32_RTOL


@pytest.mark.parametrize("schedule", [POLAR_EXPRESS_8, MUON_CLASSIC_5], ids=["pe8", "muon5"])
def test_msign_kernel_any_schedule(kernels, schedule):
    x = _slices("rows", 2, 32, 70, torch.float32)
    assert _rel(kernels.msign(x, schedule), ref.msign(x, schedule)) < FP32_RTOL


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dh", [16, 64, 128])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_msign_kernel_bf16_iterations(kernels, in_dtype, dh, layout):
    # bf16 rounding points differ between the kernel (fp32 accumulation, one rounding per
    # fused expression) and torch (a rounding after every op), so both are held to the derived
    # bf16 bound against the fp32 iteration, and to each other.
    x = _slices(layout, 2, dh, 150, in_dtype)
    exact = ref.msign(x)
    got = kernels.msign(x, dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    assert _rel(got, exact) < BF16_NS_RTOL
    assert _rel(got, ref.msign(x, dtype=torch.bfloat16)) < BF16_NS_RTOL


def test_msign_kernel_leaves_input_untouched(kernels):
    x = _slices("cols", 2, 16, 40, torch.float32)
    before = x.clone()
    kernels.msign(x)
    assert torch.equal(x, before)


def test_msign_kernel_falls_back_for_large_and_fp64_slices(kernels):
    # Short side > 128 (the hybrid O sign over a whole matrix) and fp64 use the reference.
    big = torch.randn(1, 160, 170, device=DEVICE)
    assert torch.equal(kernels.msign(big), ref.msign(big))
    f64 = torch.randn(2, 8, 20, dtype=torch.float64, device=DEVICE)
    assert torch.equal(kernels.msign(f64), ref.msign(f64))


@pytest.mark.parametrize("dh", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_gram_inv_sqrt_kernel_matches_reference(kernels, dh, group, layout, damping):
    d = 3 * dh + 5  # full-rank Grams even at damping 0, and d not a multiple of the tile
    w = _slices(layout, 2 * group, dh, d, torch.float32)
    dmat = _slices(layout, 2 * 2, dh, d, torch.float32)  # two heads per root
    root, white = kernels.gram_inv_sqrt(w, damping, group, apply_to=dmat)
    root_r, white_r = ref.gram_inv_sqrt(w, damping, group, apply_to=dmat)
    assert _rel(root, root_r) < FP32_RTOL
    assert _rel(white, white_r) < FP32_RTOL
    root_only, none = kernels.gram_inv_sqrt(w, damping, group)
    assert none is None and _rel(root_only, root_r) < FP32_RTOL


def test_gram_inv_sqrt_kernel_bf16_weights(kernels):
    # bf16 weights are read and accumulated in fp32: same input values, fp32 arithmetic.
    w = _slices("rows", 4, 32, 90, torch.bfloat16)
    assert _rel(kernels.gram_inv_sqrt(w, 1e-2, 2)[0], ref.gram_inv_sqrt(w.float(), 1e-2, 2)[0]) < (
        FP32_RTOL
    )


def test_gram_inv_sqrt_kernel_falls_back_for_eigh(kernels):
    w = _slices("rows", 2, 16, 40, torch.float32)
    got = kernels.gram_inv_sqrt(w, 1e-2, 1, "eigh")[0]
    assert torch.equal(got, ref.gram_inv_sqrt(w, 1e-2, 1, "eigh")[0])


def test_triton_backend_uses_the_kernels():
    from cm_triton.kernels import KERNELS

    assert resolve_primitives("triton", torch.device(DEVICE)) is KERNELS
    if DEVICE == "cpu":  # "auto" keeps CPU tensors on the reference, interpreter or not
        assert resolve_primitives("auto", torch.device("cpu")) is not KERNELS


def _compare_step(fn, make, shape, flags, dtype=torch.float32, rtol=FP32_RTOL, **extra):
    hq, hkv, dh, d = shape
    ts = make(hq, hkv, dh, d, dtype=dtype, device=DEVICE)
    got, want = clones(ts), clones(ts)
    fn(*got, head_dim=dh, eta=0.1, backend="triton", **flags, **extra)
    fn(*want, head_dim=dh, eta=0.1, backend="reference", **flags, **extra)
    for i in (0, 1, 4, 5):  # both weights (compare the steps) and both momentum buffers
        step_g, step_w = (got[i] - ts[i])[None], (want[i] - ts[i])[None]
        if step_w.norm() == 0:
            assert step_g.norm() == 0
        else:
            assert _rel(step_g, step_w) < rtol, i


SHAPES = [(3, 3, 16, 37), (4, 2, 16, 37)]
QK_FLAGS = list(flag_product())
OV_FLAGS = list(flag_product(ov=True))


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize("flags", QK_FLAGS, ids=[flag_id(f) for f in QK_FLAGS])
def test_cm_qk_triton_matches_reference_every_flag(shape, flags):
    _compare_step(cm_qk, qk_tensors, shape, flags)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize("flags", OV_FLAGS, ids=[flag_id(f) for f in OV_FLAGS])
def test_cm_ov_triton_matches_reference_every_flag(shape, flags):
    _compare_step(cm_ov, ov_tensors, shape, flags)


@pytest.mark.parametrize("flags", [{}, {"method": "joint"}, {"hybrid": False}], ids=str)
def test_bf16_iterations_match_reference(flags):
    # fp32 weights, bf16 Newton-Schulz on both sides: the steps agree to the bf16 NS bound.
    shape = (4, 2, 32, 70)
    extra = dict(ns_dtype=torch.bfloat16)
    _compare_step(cm_ov, ov_tensors, shape, flags, rtol=BF16_NS_RTOL, **extra)
    qk_flags = {k: v for k, v in flags.items() if k != "hybrid"}
    _compare_step(cm_qk, qk_tensors, shape, qk_flags, rtol=BF16_NS_RTOL, **extra)


def test_bf16_weights_match_reference():
    # bf16 weights: the step (eta b |Delta| ~ 0.05 x 0.2) is below one bf16 ulp of an O(1)
    # weight, so compare the weights themselves: each side rounds once (<= 2^-8 relative each,
    # rtol 2^-7), and the fp32 results before rounding differ by < 1e-4 of the step (fp32 kernels).
    for fn, make in ((cm_qk, qk_tensors), (cm_ov, ov_tensors)):
        ts = make(4, 2, 32, 70, dtype=torch.bfloat16, device=DEVICE)
        got, want = clones(ts), clones(ts)
        fn(*got, head_dim=32, eta=0.1, backend="triton")
        fn(*want, head_dim=32, eta=0.1, backend="reference")
        for g, w in zip(got, want):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.float(), w.float(), rtol=2**-7, atol=2**-14)
