"""Spec §6, properties 1-6: mathematical claims of the rule, checked on the reference.

Properties that hold for the exact polar factor use an SVD msign and eigh roots in float64
(``EXACT``); then the only error is float64 rounding (~1e-13 after a few dh x d products), and
the tolerance 1e-9 is loose enough for that and tight enough to catch any O(1) formula slip.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from oracle import svd_msign

from cm_triton import CMOptions, cm_ov, cm_qk
from cm_triton.functional import col_heads_t, row_heads
from cm_triton.reference import REFERENCE, Primitives, connect, pair_step

EXACT = Primitives(msign=lambda x, *a, **k: svd_msign(x))
TOL = 1e-9


def direction(p, s, dp, ds, opts, hybrid=False, prims=REFERENCE):
    """The rule's direction ``(Delta_P, Delta_S)`` of one pair ``(H, dh, d)``, read off one
    ``pair_step``: gradient D, zero momentum, beta 0 and eta 1 make ``W' = W - b Delta``.
    ``ns_method="ns"`` takes every sign through ``prims.msign`` (EXACT: the SVD factor)."""
    o = dataclasses.replace(opts, beta=0.0, nesterov=False, eta=1.0, weight_decay=0.0,
                            ns_method="ns", momentum_reproject=False)  # fmt: skip
    zp, zs = torch.zeros_like(dp), torch.zeros_like(ds)
    p2, s2, _, _ = pair_step(p[None], s[None], dp[None], ds[None], zp[None], zs[None], o,
                             hybrid, prims)  # fmt: skip
    b_p, b_s = o.budgets(p.shape[0] // s.shape[0])
    return (p - p2[0]) / b_p, (s - s2[0]) / b_s


def _heads(hq, hkv, dh, d, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(h):
        return torch.randn(h, dh, d, generator=g, dtype=torch.float64)

    return r(hq), r(hkv), r(hq), r(hkv)  # P, S, D_P, D_S


def _opts(**kw):
    return CMOptions(**{"eta": 1.0, "damping": 0.0, "inv_root": "eigh", **kw})


def _composed_change(p, s, dp, ds):
    """First-order change of M_h = P_h^T S_g(h): dP^T S + P^T dS, shape (Hq, d, d)."""
    g = p.shape[0] // s.shape[0]
    s_h = s.repeat_interleave(g, 0)
    ds_h = ds.repeat_interleave(g, 0)
    return dp.mT @ s_h + p.mT @ ds_h


def _spec(x):
    return torch.linalg.matrix_norm(x, ord=2)


@pytest.mark.parametrize("hybrid", [False, True])
def test_qk_leg_saturates_at_half_budget(hybrid):
    # §6.1: lambda = 0, exact msign: ||Delta_Q,h^T K_h||_2 = 1 and ||Q_h^T Delta_K,h||_2 = 1,
    # so each half-budget leg moves M_h by eta/2 in spectral norm and ||dM_h||_2 <= eta.
    p, s, dp, ds = _heads(4, 4, 8, 29)
    delta_p, delta_s = direction(p, s, dp, ds, _opts(), hybrid, EXACT)
    ones = torch.ones(4, dtype=torch.float64)
    if not hybrid:  # with the hybrid sign only the O leg is bounded (next test)
        torch.testing.assert_close(_spec(delta_p.mT @ s), ones, rtol=TOL, atol=TOL)
    torch.testing.assert_close(_spec(p.mT @ delta_s), ones, rtol=TOL, atol=TOL)
    dm = 0.5 * _composed_change(p, s, delta_p, delta_s)
    assert (_spec(dm) <= 1 + TOL).all()


def test_ov_hybrid_o_leg_is_bounded():
    # §4.2: U is one orthogonal factor over all heads, so each column block U_h has ||U_h||_2 <= 1
    # and ||Delta_O,h V_h||_2 = ||U_h C_V^-1 V_h||_2 <= 1 (C_V^-1 V_h has orthonormal rows).
    p, s, dp, ds = _heads(5, 5, 8, 23, seed=1)
    delta_p, _ = direction(p, s, dp, ds, _opts(), True, EXACT)
    assert (_spec(delta_p.mT @ s) <= 1 + TOL).all()


def test_orthonormal_partner_gives_per_head_muon():
    # §6.2: K_h K_h^T = I and lambda = 0 make C_K^-1 = I, so Delta_Q,h = msign(D_Q,h).
    p, s, dp, ds = _heads(3, 3, 8, 31, seed=2)
    s = torch.linalg.qr(s.mT).Q.mT  # orthonormal rows
    delta_p, _ = direction(p, s, dp, ds, _opts(), False, EXACT)
    torch.testing.assert_close(delta_p, svd_msign(dp), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("method", ["half_split", "joint"])
@pytest.mark.parametrize("connection", ["none", "frobenius", "scale_aware", "frobenius_scalar"])
@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("groups", [(3, 3), (4, 2)], ids=["mha", "gqa"])
def test_gauge_covariance_of_the_composed_change(method, connection, hybrid, groups):
    # §6.3: (P_h, S_g) -> (A_g^T P_h, A_g^-1 S_g) leaves M_h = P_h^T S_g unchanged; momenta
    # transform as gradients, (D_P, D_S) -> (A^-1 D_P, A^T D_S). The induced first-order dM
    # must be unchanged (lambda = 0, exact roots and sign). A random A has condition ~10-100,
    # which costs a few digits of float64: tolerance 1e-7.
    hq, hkv = groups
    dh, d = 6, 27
    p, s, dp, ds = _heads(hq, hkv, dh, d, seed=3)
    a = torch.randn(hkv, dh, dh, dtype=torch.float64) + 3 * torch.eye(dh, dtype=torch.float64)
    a_inv = torch.linalg.inv(a)
    g = hq // hkv
    at_h, ainv_h = a.mT.repeat_interleave(g, 0), a_inv.repeat_interleave(g, 0)
    p2, s2 = at_h @ p, a_inv @ s
    dp2, ds2 = ainv_h @ dp, a.mT @ ds
    o = _opts(method=method, connection=connection)
    dm1 = _composed_change(p, s, *direction(p, s, dp, ds, o, hybrid, EXACT))
    dm2 = _composed_change(p2, s2, *direction(p2, s2, dp2, ds2, o, hybrid, EXACT))
    torch.testing.assert_close(dm2, dm1, rtol=1e-7, atol=1e-7)


KINDS = ["frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("groups", [(3, 3), (6, 2)], ids=["mha", "gqa"])
def test_connection_keeps_the_composed_change(kind, damping, groups):
    # §6.4: a vertical move (X^T P, -X S) changes no M_h to first order, for any X and lambda.
    p, s, dp, ds = _heads(*groups, 8, 33, seed=4)
    cp, cs = connect(p, s, dp, ds, kind, damping)
    torch.testing.assert_close(
        _composed_change(p, s, cp, cs), _composed_change(p, s, dp, ds), rtol=TOL, atol=TOL
    )
    assert (cp - dp).abs().max() > 1e-3  # the connection did move the pair


@pytest.mark.parametrize("groups", [(3, 3), (6, 2)], ids=["mha", "gqa"])
def test_frobenius_connection_is_horizontal_at_zero_damping(groups):
    # §6.4: with lambda = 0, sum_{h in g} P_h dP_h^T = dS_g S_g^T exactly after the projection.
    p, s, dp, ds = _heads(*groups, 8, 33, seed=5)
    cp, cs = connect(p, s, dp, ds, "frobenius", 0.0)
    hkv = s.shape[0]
    lhs = (p @ cp.mT).view(hkv, -1, 8, 8).sum(1)
    torch.testing.assert_close(lhs, cs @ s.mT, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["frobenius", "scale_aware"])
def test_matrix_connections_minimise_their_metric(kind):
    # Frobenius: argmin_X ||dP - X^T P||^2 + ||dS + X S||^2 (exact for any lambda with the
    # damped Grams as written; here lambda = 0). Scale-aware: the C-weighted metric, exactly
    # minimal at lambda = 0. Any other vertical move must not do better.
    p, s, dp, ds = _heads(2, 2, 6, 25, seed=6)
    cp, cs = connect(p, s, dp, ds, kind, 0.0)
    a_p, a_s = p @ p.mT, s @ s.mT

    def metric(xp, xs):
        if kind == "frobenius":
            return xp.square().sum() + xs.square().sum()
        return (xp.mT @ a_s @ xp).diagonal(0, -2, -1).sum() + (
            xs.mT @ a_p @ xs).diagonal(0, -2, -1).sum()  # fmt: skip

    best = metric(cp, cs)
    for _ in range(5):
        x = 1e-3 * torch.randn(2, 6, 6, dtype=torch.float64)
        assert metric(cp - x.mT @ p, cs + x @ s) >= best - 1e-12


def test_scalar_connections_conserve_their_invariant():
    # frobenius_scalar keeps ||P||^2 - ||S||^2 to first order; scale_aware_scalar keeps
    # log||P|| - log||S|| (lambda = 0, per group).
    p, s, dp, ds = _heads(3, 3, 8, 30, seed=7)
    cp, cs = connect(p, s, dp, ds, "frobenius_scalar", 0.0)
    d1 = (p * cp).sum((-2, -1)) - (s * cs).sum((-2, -1))
    torch.testing.assert_close(d1, torch.zeros_like(d1), rtol=0, atol=TOL)
    cp, cs = connect(p, s, dp, ds, "scale_aware_scalar", 0.0)
    d2 = (p * cp).sum((-2, -1)) / p.square().sum((-2, -1)) - (s * cs).sum(
        (-2, -1)
    ) / s.square().sum((-2, -1))  # noqa: E501
    torch.testing.assert_close(d2, torch.zeros_like(d2), rtol=0, atol=TOL)


@pytest.mark.parametrize("method", ["half_split", "joint"])
@pytest.mark.parametrize("damping", [0.0, 0.05])
@pytest.mark.parametrize("hybrid", [False, True])
def test_isotropic_equals_full_for_scaled_orthogonal_partners(method, damping, hybrid):
    # §6.5: if every partner head has orthogonal rows of equal norm, W_h W_h^T = c^2 I, so
    # C^-1 = (c^2 + lambda)^-1/2 I = the isotropic scalar exactly.
    p, s, dp, ds = _heads(4, 4, 8, 40, seed=8)
    scale_p = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)[:, None, None]
    p = scale_p * torch.linalg.qr(p.mT).Q.mT
    s = scale_p.flip(0) * torch.linalg.qr(s.mT).Q.mT
    full = direction(p, s, dp, ds, _opts(method=method, damping=damping), hybrid, EXACT)
    iso = direction(
        p, s, dp, ds, _opts(method=method, damping=damping, isotropic=True), hybrid, EXACT
    )
    for f, i in zip(full, iso):
        torch.testing.assert_close(i, f, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("fn", ["qk", "ov"])
def test_gqa_with_one_query_head_per_group_equals_mha_bit_for_bit(fn):
    # §6.6: with G = 1 the grouped path is the MHA path. Each head of an MHA call must equal,
    # bit for bit, a single-head call on that head's blocks (no cross-head leakage from the
    # group sums or the reshapes; per-head sign, so the heads are independent).
    dh, d, h = 8, 19, 3
    g = torch.Generator().manual_seed(9)
    ts = [torch.randn(h * dh, d, generator=g) for _ in range(6)]
    call = cm_qk if fn == "qk" else cm_ov
    kw = dict(head_dim=dh, eta=0.1, hybrid=False) if fn == "ov" else dict(head_dim=dh, eta=0.1)
    if fn == "ov":
        ts = [ts[0], ts[1].T.contiguous(), ts[2], ts[3].T.contiguous(), ts[4], ts[5].T.contiguous()]
    full = [t.clone() for t in ts]
    call(*full, **kw)
    for i in range(h):
        rows = slice(i * dh, (i + 1) * dh)
        part = [(t[:, rows] if (fn == "ov" and j % 2 == 1) else t[rows]).clone()
                for j, t in enumerate(ts)]  # fmt: skip
        call(*part, **kw)
        for j, t in enumerate(part):
            ref_block = full[j][:, rows] if (fn == "ov" and j % 2 == 1) else full[j][rows]
            assert torch.equal(t, ref_block), (i, j)


def test_gqa_shared_key_leg_bound():
    # §6.6: each query head's view of the shared key step, ||Q_h^T Delta_K,g||_2 <= 1 at
    # lambda = 0, because [C_Q,g^-1 Q_h]_h stacked has orthonormal columns.
    p, s, dp, ds = _heads(6, 2, 8, 41, seed=10)
    _, delta_s = direction(p, s, dp, ds, _opts(), False, EXACT)
    dm = p.mT @ delta_s.repeat_interleave(3, 0)
    norms = _spec(dm)
    assert (norms <= 1 + TOL).all()
    assert norms.max() > 0.5  # and it is not trivially small


def test_views_match_the_spec_layout():
    # §1: Q_h = q_w[h dh:(h+1) dh, :] and O_h = o_w[:, h dh:(h+1) dh]; P = O^T per head.
    w = torch.arange(4 * 3 * 5.0).view(4 * 3, 5)
    assert torch.equal(row_heads(w, 3)[2], w[6:9])
    o = torch.arange(5 * 4 * 3.0).view(5, 12)
    assert torch.equal(col_heads_t(o, 3)[1], o[:, 3:6].T)


def test_reference_is_the_default_on_cpu():
    from cm_triton.dispatch import resolve_primitives

    assert resolve_primitives("auto", torch.device("cpu")) is REFERENCE
    assert resolve_primitives("reference", torch.device("cpu")) is REFERENCE


@pytest.mark.parametrize("method", ["half_split", "joint"])
@pytest.mark.parametrize("fn", ["qk", "ov"])
def test_gqa_per_query_budget_scales_the_shared_leg_by_one_over_g(fn, method):
    # spec §1: gqa_budget="per_query" gives the shared factor b / G, the per-query one b.
    # Same directions, so in float64 the shared factor's step is the "group" one over G to
    # rounding (1e-12 relative: a handful of fp64 ops), the per-query factor's is unchanged,
    # and with G = 1 the option changes nothing (bit for bit). With the K-leg bound above,
    # each composite then moves by at most eta b / G.
    dh, d, g = 8, 40, 3
    gen = torch.Generator().manual_seed(11)
    for hkv, G in ((2, g), (2, 1)):
        hq = hkv * G
        shapes = [(hq * dh, d), (hkv * dh, d)] if fn == "qk" else [(hkv * dh, d), (d, hq * dh)]
        ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        out = {}
        for budget in ("group", "per_query"):
            w = [x.clone() for x in ws]
            m = [torch.zeros_like(x) for x in ws]
            call = cm_qk if fn == "qk" else cm_ov
            call(*w, *gs, *m, head_dim=dh, eta=0.1, method=method, gqa_budget=budget)
            out[budget] = [x - x0 for x, x0 in zip(w, ws)]
        shared, per_query = (1, 0) if fn == "qk" else (0, 1)
        if G == 1:
            assert all(torch.equal(a, b) for a, b in zip(out["group"], out["per_query"]))
            continue
        torch.testing.assert_close(out["per_query"][per_query], out["group"][per_query],
                                   rtol=1e-12, atol=0.0)  # fmt: skip
        torch.testing.assert_close(out["per_query"][shared], out["group"][shared] / G,
                                   rtol=1e-12, atol=1e-15)  # fmt: skip


def test_gqa_budget_is_validated():
    with pytest.raises(ValueError, match="gqa_budget must be one of"):
        CMOptions(eta=0.1, gqa_budget="per_head")
