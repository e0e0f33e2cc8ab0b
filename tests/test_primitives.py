"""msign and inv_sqrt (spec §2)."""

from __future__ import annotations

import pytest
import torch
from oracle import ns_msign, svd_msign
from torch.utils._python_dispatch import TorchDispatchMode

from cm_triton import MUON_CLASSIC_5, POLAR_EXPRESS_8
from cm_triton.reference import gram, gram_inv_sqrt, inv_sqrt, msign, partner_roots
from cm_triton.reference.primitives import gram_polynomial

BF16_NS_RTOL = 0.1  # see test_msign_bf16_iterations_return_fp32 for the derivation


@pytest.mark.parametrize("shape", [(3, 8, 40), (2, 40, 8), (1, 16, 16)], ids=str)
@pytest.mark.parametrize("schedule", [POLAR_EXPRESS_8, MUON_CLASSIC_5], ids=["pe8", "muon5"])
def test_msign_matches_per_matrix_newton_schulz(shape, schedule):
    # Same float64 iteration per slice (tall slices transposed): only rounding differs.
    x = torch.randn(*shape, dtype=torch.float64)
    got = msign(x, schedule)
    for i in range(shape[0]):
        torch.testing.assert_close(got[i], ns_msign(x[i], schedule), rtol=1e-10, atol=1e-10)


def test_msign_approximates_the_polar_factor():
    # Polar Express in fp32 leaves singular values within ~[0.85, 1.15] of 1 for a random
    # well-conditioned input; the factor it approximates is U V^T.
    x = torch.randn(4, 16, 64)
    u = msign(x)
    sv = torch.linalg.svdvals(u)
    assert sv.min() > 0.8 and sv.max() < 1.2
    cos = (u * svd_msign(x)).sum((-2, -1)) / (u.norm(dim=(-2, -1)) * 4.0)
    assert (cos > 0.99).all()


def test_msign_normalises_each_slice_by_its_own_norm():
    # A slice scaled by 1e4 must give the same sign as unscaled (per-slice normalisation).
    x = torch.randn(2, 8, 24, dtype=torch.float64)
    y = x.clone()
    y[1] *= 1e4
    torch.testing.assert_close(msign(y), msign(x), rtol=1e-9, atol=1e-9)


def test_msign_does_not_modify_its_input():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, 24).to(dtype)
        before = x.clone()
        msign(x, dtype=torch.bfloat16)
        assert torch.equal(x, before)


@pytest.mark.parametrize("steps", [0, 1, 2, 8])
def test_gram_polynomial_is_the_iteration_on_x_and_leaves_r_unchanged(steps):
    # Q X must be what X <- a X + (b A + c A A) X makes of X, and R_final its Gram; R is read
    # only (the polynomial writes into its own buffers). float64 over <= 8 steps of O(1)
    # matrices: rounding ~1e-14; 1e-10 holds it, a wrong buffer swap is O(1).
    coefficients = POLAR_EXPRESS_8[:steps]
    x = torch.randn(3, 8, 24, dtype=torch.float64)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) * 1.01)
    r = x @ x.mT
    before = r.clone()
    q, r_final = gram_polynomial(r, coefficients)
    y = x
    for a, b, c in coefficients:
        s = y @ y.mT
        y = a * y + (b * s + c * s @ s) @ y
    torch.testing.assert_close(q @ x, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r_final, y @ y.mT, rtol=1e-10, atol=1e-10)
    assert torch.equal(r, before)


class _Allocations(TorchDispatchMode):
    """Counts the ops that allocate their result (not views, not in place, not ``out=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (func.is_view or func._schema.is_mutable or "out" in kwargs):
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", ["ns", "gram"])
def test_msign_allocations_do_not_grow_with_the_steps(method):
    # Each step writes into buffers made once per call (primitives._buffers): on the CPU a
    # new large product per step is fresh pages from the OS. 2 and 8 steps allocate the same.
    x = torch.randn(4, 16, 48)
    counts = []
    for steps in (2, 8):
        with _Allocations() as mode:
            msign(x, POLAR_EXPRESS_8[:steps], method=method)
        counts.append(mode.count)
    assert counts[0] == counts[1], counts


def test_msign_bf16_iterations_return_fp32():
    x = torch.randn(2, 16, 48)
    out = msign(x, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    # Each step forms a X + (b A + c A A) X with |a| up to 8.2 against an O(1) result, so bf16
    # rounding (u = 2^-9) is magnified by ~(|a|+|b|+|c|) per step: first-order worst case
    # sum_steps (|a|+|b|+|c|) u ~ 0.16 for Polar Express. Measured 2.4%-5% (Frobenius, relative)
    # over (16|64|128 x 48..2048) slices; 0.1 holds that with margin, and a wrong formula is O(1).
    exact = msign(x)
    rel = (out - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))
    assert (rel < BF16_NS_RTOL).all(), rel


def _spd(n, cond, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64, generator=g))
    w = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), n, dtype=torch.float64)
    scale = 10 ** (4 * torch.rand(batch, 1, dtype=torch.float64, generator=g) - 2)
    return (q * (w * scale).unsqueeze(-2)) @ q.mT


@pytest.mark.parametrize("n", [8, 16, 64, 128])
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("method", ["newton", "quintic", "eigh"])
def test_inv_sqrt_accuracy_bound(n, cond, method):
    # Spec §2: fp32, dh <= 128, condition <= 1e4: ||Z A Z - I||_rms <= 1e-4 (scale-free: the
    # matrices span 1e-2..1e2 in norm). Measured worst here ~8e-5 (eigh, n = 8, cond 1e4).
    a = _spd(n, cond)
    z = inv_sqrt(a.float(), method).double()
    err = (z @ a @ z - torch.eye(n, dtype=torch.float64)).square().mean((-2, -1)).sqrt()
    assert err.max() <= 1e-4, err.max()


def test_inv_sqrt_newton_agrees_with_eigh():
    a = _spd(32, 1e3)
    torch.testing.assert_close(inv_sqrt(a, "newton"), inv_sqrt(a, "eigh"), rtol=1e-5, atol=1e-8)


def test_inv_sqrt_rejects_unknown_method():
    with pytest.raises(ValueError, match="inv_root"):
        inv_sqrt(torch.eye(3)[None], "cholesky")


def test_gram_sums_over_groups_and_damps():
    w = torch.randn(6, 4, 9, dtype=torch.float64)
    a = gram(w, 3, 0.5)
    want = sum(w[i] @ w[i].T for i in range(3, 6)) + 0.5 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(a[1], want)


def test_gram_inv_sqrt_applies_each_root_to_its_group():
    w = torch.randn(2, 4, 9, dtype=torch.float64)
    d = torch.randn(6, 4, 11, dtype=torch.float64)
    root, white = gram_inv_sqrt(w, 0.1, 1, "eigh", apply_to=d)
    for i in range(6):
        torch.testing.assert_close(white[i], root[i // 3] @ d[i])


@pytest.mark.parametrize("method", ["newton", "quintic", "eigh"])
def test_partner_roots_equal_two_gram_inv_sqrt_calls(method):
    # One batched inverse root over both Grams is the same per-slice arithmetic as two calls
    # (each slice has its own norm); float64, so only summation order could differ.
    p, s = torch.randn(6, 4, 9, dtype=torch.float64), torch.randn(2, 4, 9, dtype=torch.float64)
    r_s, r_p = partner_roots(p[None], s[None], 0.1, method)
    want_rs, _ = gram_inv_sqrt(s, 0.1, 1, method)
    want_rp, _ = gram_inv_sqrt(p, 0.1, 3, method)
    torch.testing.assert_close(r_s[0], want_rs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_p[0], want_rp, rtol=1e-12, atol=1e-12)
