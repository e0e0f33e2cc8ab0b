"""Numerical edge cases: degenerate partners, extreme scales, low precision, layouts."""

from __future__ import annotations

import pytest
import torch
from helpers import clones, ov_tensors, qk_tensors

from cm_triton import cm_ov, cm_qk
from cm_triton.functional import row_heads
from cm_triton.reference import msign

DH, H, D = 16, 4, 64
KW = dict(head_dim=DH, eta=0.1)


def _finite(*ts):
    return all(torch.isfinite(t).all() for t in ts)


def test_zero_initialised_o_proj_amplifies_the_v_step_by_inverse_sqrt_damping():
    # o_w = 0 (nanochat's init) makes the V leg's partner Gram exactly lambda I, so
    # C_O^-1 = lambda^-1/2 I and Delta_V = lambda^-1/2 msign(D_V): a 10x larger V step at the
    # default lambda = 1e-2. Newton's root of lambda I is exact to fp32 rounding: rtol 1e-4.
    v, o, gv, go, mv, mo = ov_tensors(H, H, DH, D, dtype=torch.float32, momentum=False)
    o.zero_()
    v0 = v.clone()
    cm_ov(v, o, gv, go, mv, mo, **KW, damping=1e-2)
    want = 0.1 * 0.5 * 1e-2**-0.5 * msign(row_heads(gv, DH)).reshape_as(v)
    torch.testing.assert_close(v0 - v, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inv_root", ["newton", "eigh"])
def test_rank_deficient_partner_stays_finite_and_bounded(inv_root):
    q, k, gq, gk, mq, mk = qk_tensors(H, H, DH, D, dtype=torch.float32)
    row_heads(k, DH)[:, 5:] = 0  # every K head has rank 5 of 16
    q0 = q.clone()
    cm_qk(q, k, gq, gk, mq, mk, **KW, inv_root=inv_root)
    assert _finite(q, k, mq, mk)
    # ||C_K^-1|| <= lambda^-1/2 and ||msign|| ~ 1: |Delta_Q|_2 <= lambda^-1/2 (5% for NS).
    step = row_heads((q0 - q) / (0.1 * 0.5), DH)
    assert torch.linalg.matrix_norm(step, ord=2).max() <= 1.05 * 1e-2**-0.5


def test_huge_norm_partner_keeps_the_leg_bound():
    # Scale 1e4: lambda is negligible, so the leg saturates, ||Delta_Q,h^T K_h||_2 ~ 1 (Polar
    # Express is within ~1e-5 of the exact polar factor for these random blocks). float64: the
    # step (~5e-6) is recovered as q0 - q, which fp32 rounding of O(1) weights would swamp.
    q, k, gq, gk, mq, mk = qk_tensors(H, H, DH, D, dtype=torch.float64)
    k.mul_(1e4)
    q0 = q.clone()
    cm_qk(q, k, gq, gk, mq, mk, **KW)
    step = row_heads((q0 - q) / (0.1 * 0.5), DH)
    leg = torch.linalg.matrix_norm(step.mT @ row_heads(k, DH), ord=2)
    torch.testing.assert_close(leg, torch.ones_like(leg), rtol=1e-3, atol=0)


@pytest.mark.parametrize("inv_root", ["newton", "eigh"])
def test_partner_condition_1e6_stays_finite(inv_root):
    q, k, gq, gk, mq, mk = qk_tensors(H, H, DH, D, dtype=torch.float32)
    u, _, vh = torch.linalg.svd(row_heads(k, DH), full_matrices=False)
    sv = torch.logspace(0, -3, DH)  # Gram condition 1e6 before damping
    k.copy_(((u * sv) @ vh).reshape_as(k))
    cm_qk(q, k, gq, gk, mq, mk, **KW, inv_root=inv_root)
    assert _finite(q, k, mq, mk)


def test_zero_partner_without_damping_raises_and_changes_nothing():
    ts = list(qk_tensors(H, H, DH, D, dtype=torch.float32))
    ts[1].zero_()  # k_w = 0 and damping = 0: C_K^-1 does not exist
    before = clones(ts)
    with pytest.raises(FloatingPointError, match="damping=0.0"):
        cm_qk(*ts, **KW, damping=0.0)
    for a, b in zip(ts, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_compute_in_fp32_and_cast_once(dtype):
    # The only difference from the fp32 computation is one final cast: identical after it.
    for fn, make in ((cm_qk, qk_tensors), (cm_ov, ov_tensors)):
        low = list(make(H, 2, DH, D, dtype=dtype))
        high = [t.float() for t in low]
        fn(*low, **KW)
        fn(*high, **KW)
        for lo, hi in zip(low, high):
            assert lo.dtype == dtype
            assert torch.equal(lo, hi.to(dtype))


def test_momentum_is_accumulated_not_normalised_in_place():
    # Regression guard (torch.optim.Muon once normalised its momentum buffer in place with bf16
    # and nesterov off): after a step m = beta m + G exactly, and G is untouched.
    q, k, gq, gk, mq, mk = qk_tensors(H, H, DH, D, dtype=torch.bfloat16)
    want_mq = (0.95 * mq.float() + gq.float()).bfloat16()
    g_before = gq.clone()
    cm_qk(q, k, gq, gk, mq, mk, **KW, nesterov=False)
    assert torch.equal(mq, want_mq)
    assert torch.equal(gq, g_before)


def test_non_contiguous_weights_update_in_place_like_contiguous():
    # A weight stored transposed (column-major) is a valid view: same result, written through.
    q, k, gq, gk, mq, mk = qk_tensors(H, H, DH, D, dtype=torch.float32)
    q_t = q.T.contiguous().T  # same values, strides (1, rows)
    assert not q_t.is_contiguous()
    ref = clones([q, k, gq, gk, mq, mk])
    cm_qk(q_t, k, gq, gk, mq, mk, **KW)
    cm_qk(*ref, **KW)
    assert torch.equal(q_t, ref[0]) and torch.equal(k, ref[1])


@pytest.mark.parametrize("dh", [1, 2, 256])
def test_tiny_and_large_head_dim(dh):
    q, k, gq, gk, mq, mk = qk_tensors(2, 1, dh, 40 if dh < 256 else 300, dtype=torch.float32)
    ts = [q, k, gq, gk, mq, mk]
    ref = clones(ts)
    cm_qk(*ts, head_dim=dh, eta=0.1, backend="triton")  # dh > 128 falls back to the reference
    cm_qk(*ref, head_dim=dh, eta=0.1, backend="reference")
    assert _finite(*ts)
    # fp32 kernels vs reference (see test_kernels.py for the 1e-4 derivation)
    torch.testing.assert_close(ts[0], ref[0], rtol=1e-4, atol=1e-6)


def test_all_finite_falls_back_when_a_finite_sum_overflows():
    # float64 entries beyond float32's range make the quick float32 sum infinite; the entry-by-
    # entry check must still call them finite, and must still catch a real NaN or Inf.
    from cm_triton.functional import all_finite

    big = torch.tensor([1e300, -1e300, 3.0], dtype=torch.float64)
    assert all_finite([big, torch.ones(4)])
    assert not all_finite([big, torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf")], dtype=torch.bfloat16)])
    assert all_finite([])


def test_factor_widths_may_differ():
    # The per-head Grams are dh x dh whatever the factors' input widths (cross-attention,
    # nn.MultiheadAttention with kdim != embed_dim). A zero column appended to q (weight,
    # gradient, momentum) changes no Gram and no sign except by that zero column, so the
    # narrow call must equal the padded one. float64: only summation order differs (~1e-16,
    # amplified by the iterations to ~1e-13); rtol 1e-10 is far below any formula error.
    def pad(t, dim):
        return torch.cat([t, torch.zeros_like(t.narrow(dim, 0, 1))], dim)

    cases = ((cm_qk, qk_tensors, (0, 2, 4), 1), (cm_ov, ov_tensors, (1, 3, 5), 0))
    for fn, make, idx, dim in cases:
        narrow = list(make(H, 2, DH, D, dtype=torch.float64))
        for i in idx:
            narrow[i] = narrow[i].narrow(dim, 0, D - 1).contiguous()
        padded = [pad(t, dim) if i in idx else t.clone() for i, t in enumerate(narrow)]
        fn(*narrow, **KW)
        fn(*padded, **KW)
        for i, (a, b) in enumerate(zip(narrow, padded)):
            if i in idx:
                assert torch.equal(b.narrow(dim, D - 1, 1), torch.zeros_like(b.narrow(dim, 0, 1)))
                b = b.narrow(dim, 0, D - 1)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
