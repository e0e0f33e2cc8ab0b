"""Property-based tests of the reference over random shapes and flags (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import EXACT, _composed_change, direction

from cm_triton import CMOptions, cm_ov, cm_qk
from cm_triton.reference import connect

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(
    st.integers(1, 3),  # Hkv
    st.integers(1, 3),  # G
    st.sampled_from([1, 2, 4, 8, 16]),  # dh
    st.integers(1, 70),  # d
)
flags = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["half_split", "joint"]),
        "isotropic": st.booleans(),
        "whitening": st.sampled_from(["both", "pre", "post", "none"]),
        "connection": st.sampled_from(
            ["none", "frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar"]
        ),
        "momentum_reproject": st.booleans(),
        "per_mat_renorm": st.booleans(),
        "nesterov": st.booleans(),
        "damping": st.sampled_from([1e-3, 1e-2, 0.3]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
    }
)


def _tensors(seed, hkv, g, dh, d, scale):
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * g

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    return [r(hq * dh, d) * scale, r(hkv * dh, d), r(hq * dh, d), r(hkv * dh, d),
            r(hq * dh, d), r(hkv * dh, d)]  # fmt: skip


@SETTINGS
@given(shape=shapes, f=flags, hybrid=st.booleans(), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))  # fmt: skip
def test_any_shape_and_flags_give_a_finite_in_place_step(shape, f, hybrid, seed, scale):
    # In place: the caller's weight and momentum tensors are the ones written (same storage),
    # the weights move, the gradients are read only, and the momentum is beta m + G exactly
    # (one fp64 multiply-add per entry; a reprojected momentum adds its own term).
    hkv, g, dh, d = shape
    q, k, gq, gk, mq, mk = _tensors(seed, hkv, g, dh, d, scale)
    ov = [k, q.T.contiguous(), gk, gq.T.contiguous(), mk, mq.T.contiguous()]
    for call, ts, extra in ((cm_qk, _tensors(seed, hkv, g, dh, d, scale), {}),
                            (cm_ov, ov, {"hybrid": hybrid})):  # fmt: skip
        before = [t.clone() for t in ts]
        ptrs = [t.data_ptr() for t in ts]
        call(*ts, head_dim=dh, eta=0.05, **extra, **f)
        assert [t.data_ptr() for t in ts] == ptrs
        assert all(torch.isfinite(t).all() for t in ts)
        assert not torch.equal(ts[0], before[0]) and not torch.equal(ts[1], before[1])
        assert torch.equal(ts[2], before[2]) and torch.equal(ts[3], before[3])
        if not f["momentum_reproject"]:
            for m, m0, g0 in ((ts[4], before[4], before[2]), (ts[5], before[5], before[3])):
                torch.testing.assert_close(m, 0.95 * m0 + g0, rtol=1e-15, atol=0)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16), method=st.sampled_from(["half_split", "joint"]))
def test_leg_bound_holds_for_any_shape(shape, seed, method):
    # lambda = 0, exact sign, full-rank partners (d >= G dh): every per-head view of each leg
    # has spectral norm <= 1 (= 1 for the per-query leg with half_split).
    hkv, g, dh, d = shape
    d = max(d, g * dh + 1)
    gen = torch.Generator().manual_seed(seed)
    p, s, dp, ds = (torch.randn(h, dh, d, generator=gen, dtype=torch.float64)
                    for h in (hkv * g, hkv, hkv * g, hkv))  # fmt: skip
    opts = CMOptions(eta=1.0, damping=0.0, inv_root="eigh", method=method)
    delta_p, delta_s = direction(p, s, dp, ds, opts, False, EXACT)
    leg_p = torch.linalg.matrix_norm(delta_p.mT @ s.repeat_interleave(g, 0), ord=2)
    leg_s = torch.linalg.matrix_norm(p.mT @ delta_s.repeat_interleave(g, 0), ord=2)
    assert leg_p.max() <= 1 + 1e-8 and leg_s.max() <= 1 + 1e-8
    if method == "half_split":  # the query leg's composite moves by exactly its budget
        torch.testing.assert_close(leg_p, torch.ones_like(leg_p), rtol=0, atol=1e-8)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16),
       kind=st.sampled_from(["frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar"]),
       damping=st.sampled_from([0.0, 1e-2]))  # fmt: skip
def test_connections_keep_the_composed_change_for_any_shape(shape, seed, kind, damping):
    hkv, g, dh, d = shape
    d = max(d, g * dh + 1)
    gen = torch.Generator().manual_seed(seed)
    p, s, dp, ds = (torch.randn(h, dh, d, generator=gen, dtype=torch.float64)
                    for h in (hkv * g, hkv, hkv * g, hkv))  # fmt: skip
    cp, cs = connect(p, s, dp, ds, kind, damping)
    torch.testing.assert_close(
        _composed_change(p, s, cp, cs), _composed_change(p, s, dp, ds), rtol=1e-8, atol=1e-8
    )


@SETTINGS
@given(shape=shapes, f=flags, seed=st.integers(0, 2**16))
def test_one_query_head_per_group_is_the_mha_path(shape, f, seed):
    # G = 1 through cm_qk equals the same call with heads fed one at a time (the grouped
    # machinery adds nothing when groups are single heads). Per-matrix renorm couples heads,
    # so it is switched off here.
    hkv, _, dh, d = shape
    f = dict(f, per_mat_renorm=False)
    ts = _tensors(seed, hkv, 1, dh, d, 1.0)
    whole = [t.clone() for t in ts]
    cm_qk(*whole, head_dim=dh, eta=0.05, **f)
    for h in range(hkv):
        part = [t[h * dh : (h + 1) * dh].clone() for t in ts]
        cm_qk(*part, head_dim=dh, eta=0.05, **f)
        for a, b in zip(part, whole):
            torch.testing.assert_close(a, b[h * dh : (h + 1) * dh], rtol=1e-12, atol=1e-12)
