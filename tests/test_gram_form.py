"""Gram evaluation of msign and of the whitened legs (spec §2.1, §6.7).

Accuracy bounds (bench/results/accuracy.md, 8 slices of 128 x 2048 against float64 Newton-
Schulz): fp32 iterations 1.8e-6 .. 7.5e-5 over spectra from Gaussian to condition 1e6 and
rank-deficient; the Gram form with one restart after 3 steps 9.3e-7 .. 6.0e-5; without a
restart up to 1.7e-2 (the Gram loses singular values below ~sqrt(u)); bf16 iterations up to
0.9. The properties below hold those measurements on smaller slices with a 2-3x margin.
"""

from __future__ import annotations

import pytest
import torch
from helpers import compare_steps, flag_id, flag_product, ov_tensors, qk_tensors, spectrum_slices

from cm_triton import cm_ov, cm_qk
from cm_triton.reference import msign
from cm_triton.reference.legs import use_gram
from cm_triton.reference.phases import whitened_sign
from cm_triton.schedules import POLAR_EXPRESS_8

SPECTRA = ("gaussian", "cond1e2", "cond1e4", "cond1e6", "rank_half")


def _slices(kind: str) -> torch.Tensor:
    return spectrum_slices(kind, 4, 32, 512, seed=7)


def _err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("kind", SPECTRA)
def test_gram_with_a_restart_is_as_accurate_as_fp32_iterations(kind):
    x = _slices(kind)
    exact = msign(x, POLAR_EXPRESS_8)  # float64 iterations: the polynomial's true value
    ns = _err(msign(x.float(), POLAR_EXPRESS_8, method="ns"), exact)
    gram = _err(msign(x.float(), POLAR_EXPRESS_8, method="gram", restart=3), exact)
    assert gram <= 2e-4  # measured <= 6e-5 at 128 x 2048
    assert gram <= 3 * ns + 1e-5  # not worse than fp32 iterations beyond noise


@pytest.mark.parametrize("kind", ["cond1e4", "cond1e6"])
def test_without_a_restart_the_gram_loses_the_small_singular_values(kind):
    # The reason for the restart: with none, the error grows by orders of magnitude.
    x = _slices(kind)
    exact = msign(x, POLAR_EXPRESS_8)
    lossy = _err(msign(x.float(), POLAR_EXPRESS_8, method="gram", restart=0), exact)
    restarted = _err(msign(x.float(), POLAR_EXPRESS_8, method="gram", restart=3), exact)
    assert lossy > 1e-3 > 10 * restarted


def test_gram_evaluates_the_polynomial_exactly_in_float64():
    # In exact arithmetic Q(R) X equals the iteration on X: float64 leaves only rounding.
    x = torch.randn(3, 16, 90, dtype=torch.float64)
    for restart in (0, 2, 3):
        got = msign(x, POLAR_EXPRESS_8, method="gram", restart=restart)
        torch.testing.assert_close(got, msign(x, POLAR_EXPRESS_8), rtol=1e-10, atol=1e-12)


def test_the_whitened_leg_is_one_map_applied_once():
    # post msign(pre D) = T D with T = post Q pre / nu (spec §2.1), in float64 to rounding.
    g = torch.Generator().manual_seed(3)
    d = torch.randn(5, 8, 60, generator=g, dtype=torch.float64)
    a = torch.randn(5, 8, 8, generator=g, dtype=torch.float64)
    root = (a @ a.mT + torch.eye(8, dtype=torch.float64))[:, None]  # one SPD block per slice
    got = whitened_sign(d, root, root, POLAR_EXPRESS_8, "gram", 3)[0]
    want = root[:, 0] @ msign(root[:, 0] @ d, POLAR_EXPRESS_8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert use_gram(8, 60, "gram") and not use_gram(64, 100, "gram")  # aspect >= 2 only


SHAPES = [(3, 3, 16, 37), (4, 2, 16, 37)]
QK_FLAGS = list(flag_product())
OV_FLAGS = list(flag_product(ov=True))


def _gram_vs_ns(fn, make, shape, flags):
    # Both evaluate the same polynomial in fp32; each is within ~1e-4 of its float64 value
    # (accuracy.md: 7.5e-5 and 6.0e-5 at worst over hard spectra), and the whitening and the
    # connections amplify that by the partner's condition (10-100 for these random blocks):
    # measured worst 1.3e-5 over this product. 5e-4 keeps the margin; a formula slip is O(1).
    compare_steps(fn, make, shape, {"ns_method": "gram", **flags}, {"ns_method": "ns", **flags},
                  5e-4)  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize("flags", QK_FLAGS, ids=[flag_id(f) for f in QK_FLAGS])
def test_cm_qk_gram_equals_ns_every_flag(shape, flags):
    _gram_vs_ns(cm_qk, qk_tensors, shape, flags)


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
@pytest.mark.parametrize("flags", OV_FLAGS, ids=[flag_id(f) for f in OV_FLAGS])
def test_cm_ov_gram_equals_ns_every_flag(shape, flags):
    _gram_vs_ns(cm_ov, ov_tensors, shape, flags)
