"""An independent, deliberately literal transcription of cm_spec.md for the tests.

Per-head Python loops, float64, in the spec's own notation (O as column blocks whitened from
the right, connections by the spec's OV formulas, Sylvester solved by Kronecker products).
It shares no code with cm_triton, so agreement pins the batched reference to the spec.
"""

from __future__ import annotations

import math

import torch

PE8 = [
    (8.2051, -22.9019, 16.4607), (4.0664, -2.8612, 0.5184), (3.9096, -2.8234, 0.5250),
    (3.2856, -2.4153, 0.4853), (2.2779, -1.6198, 0.3985), (1.8726, -1.2307, 0.3585),
    (1.8564, -1.2132, 0.3568), (1.8750, -1.2500, 0.3750),
]  # fmt: skip


def ns_msign(x: torch.Tensor, coeffs=PE8) -> torch.Tensor:
    """Newton-Schulz polar factor of one matrix, float64 (spec §2, steps 1-3)."""
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / (torch.linalg.norm(y) * 1.01 + 1e-7)
    for a, b, c in coeffs:
        m = y @ y.T
        y = a * y + (b * m + c * m @ m) @ y
    return y.T if tall else y


def power_of_two(*ts: torch.Tensor) -> float:
    """The power of two that brings the largest |entry| of ``ts`` into [1/2, 1) (1 for all
    zero): the pair's direction is scaled by it before its signs (spec §2, step 2)."""
    top = max(t.abs().max().item() for t in ts)
    return 1.0 if top == 0 else 2.0 ** -math.frexp(top)[1]


def svd_msign(x: torch.Tensor) -> torch.Tensor:
    """Exact polar factor U V^T of one matrix (or of each slice of a batch)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def eig_inv_sqrt(a: torch.Tensor) -> torch.Tensor:
    w, p = torch.linalg.eigh((a + a.T) / 2)
    return p @ torch.diag(w.rsqrt()) @ p.T


def sylvester_kron(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Solve A X + X B = R by vec(AX + XB) = (I (x) A + B^T (x) I) vec(X) (column-major vec)."""
    n = a.shape[0]
    eye = torch.eye(n, dtype=a.dtype)
    big = torch.kron(eye, a) + torch.kron(b.T.contiguous(), eye)
    x = torch.linalg.solve(big, r.T.reshape(-1))
    return x.reshape(n, n).T


def _opts(**kw):
    base = dict(
        eta=0.1, beta=0.95, nesterov=False, damping=1e-2, weight_decay=0.0, method="half_split",
        isotropic=False, hybrid=True, whitening="both", connection="none",
        momentum_reproject=False, per_mat_renorm=False, sign=ns_msign,
    )  # fmt: skip
    unknown = set(kw) - set(base)
    assert not unknown, unknown
    base.update(kw)
    return base


def _roots(blocks_by_group, dh, lam, isotropic):
    """Partner inverse roots: blocks_by_group[g] is the list of (dh x ?) row-Gram factors."""
    out = []
    for blocks in blocks_by_group:
        a = sum(b @ b.T for b in blocks) + lam * torch.eye(dh, dtype=torch.float64)
        if isotropic:
            s = (sum((b * b).sum() for b in blocks) / dh + lam) ** -0.5
            out.append(s * torch.eye(dh, dtype=torch.float64))
        else:
            out.append(eig_inv_sqrt(a))
    return out


def oracle_qk(q, k, gq, gk, mq, mk, dh, **kw):
    """One cm_qk step on copies; returns (q', k', mq', mk') in float64."""
    o = _opts(**kw)
    lam, sign = o["damping"], o["sign"]
    q, k, gq, gk, mq, mk = (t.double().clone() for t in (q, k, gq, gk, mq, mk))
    hq, hkv = q.shape[0] // dh, k.shape[0] // dh
    G = hq // hkv
    Q = [q[h * dh : (h + 1) * dh] for h in range(hq)]
    K = [k[g * dh : (g + 1) * dh] for g in range(hkv)]
    grp = [list(range(g * G, (g + 1) * G)) for g in range(hkv)]
    scale = power_of_two(gq, gk, mq, mk)
    mq = o["beta"] * mq + gq
    mk = o["beta"] * mk + gk
    if o["momentum_reproject"]:
        kind = "frobenius" if o["connection"] == "none" else o["connection"]
        mqh = [mq[h * dh : (h + 1) * dh] for h in range(hq)]
        mkh = [mk[g * dh : (g + 1) * dh] for g in range(hkv)]
        mqh, mkh = _connect_qk(Q, K, mqh, mkh, grp, kind, lam, dh)
        mq, mk = torch.cat(mqh), torch.cat(mkh)
    dq = scale * (gq + o["beta"] * mq if o["nesterov"] else mq)
    dk = scale * (gk + o["beta"] * mk if o["nesterov"] else mk)
    DQ = [dq[h * dh : (h + 1) * dh] for h in range(hq)]
    DK = [dk[g * dh : (g + 1) * dh] for g in range(hkv)]
    ck = _roots([[K[g]] for g in range(hkv)], dh, lam, o["isotropic"])  # partner of Q_h: C_K,g(h)
    cq = _roots([[Q[h] for h in grp[g]] for g in range(hkv)], dh, lam, o["isotropic"])
    pre = o["whitening"] in ("both", "pre")
    post = o["whitening"] in ("both", "post")
    eye = torch.eye(dh, dtype=torch.float64)
    ckh = [ck[h // G] for h in range(hq)]
    WQ = [(ckh[h] if pre else eye) @ DQ[h] for h in range(hq)]
    WK = [(cq[g] if pre else eye) @ DK[g] for g in range(hkv)]
    if o["method"] == "half_split":
        UQ = [sign(w) for w in WQ]
        UK = [sign(w) for w in WK]
        budget = 0.5
    else:
        UQ, UK = [None] * hq, [None] * hkv
        for g in range(hkv):
            z = sign(torch.cat([WQ[h] for h in grp[g]] + [WK[g]]))
            for i, h in enumerate(grp[g]):
                UQ[h] = z[i * dh : (i + 1) * dh]
            UK[g] = z[G * dh :]
        budget = 1.0
    dQ = [(ckh[h] if post else eye) @ UQ[h] for h in range(hq)]
    dK = [(cq[g] if post else eye) @ UK[g] for g in range(hkv)]
    if o["per_mat_renorm"]:
        for legs, us in ((dQ, UQ), (dK, UK)):
            f = torch.cat(us).norm() / torch.cat(legs).norm()
            legs[:] = [x * f for x in legs]
    dQ, dK = _connect_qk(Q, K, dQ, dK, grp, o["connection"], lam, dh)
    decay = 1 - o["eta"] * o["weight_decay"]
    q_new = decay * q - o["eta"] * budget * torch.cat(dQ)
    k_new = decay * k - o["eta"] * budget * torch.cat(dK)
    return q_new, k_new, mq, mk


def _connect_qk(Q, K, dQ, dK, grp, kind, lam, dh):
    """Spec §4.6 in QK notation, per KV group (group sums for GQA)."""
    if kind == "none":
        return dQ, dK
    dQ, dK = list(dQ), list(dK)
    eye = torch.eye(dh, dtype=torch.float64)
    for g, hs in enumerate(grp):
        a_q = sum(Q[h] @ Q[h].T for h in hs) + lam * eye
        a_k = K[g] @ K[g].T + lam * eye
        r_q = sum(Q[h] @ dQ[h].T for h in hs)
        r_k = dK[g] @ K[g].T
        if kind == "frobenius":
            x = sylvester_kron(a_q, a_k, r_q - r_k)
        elif kind == "scale_aware":
            x = 0.5 * (torch.linalg.inv(a_q) @ r_q - r_k @ torch.linalg.inv(a_k))
        else:
            qq = sum((Q[h] * Q[h]).sum() for h in hs)
            kk = (K[g] * K[g]).sum()
            qd = sum((Q[h] * dQ[h]).sum() for h in hs)
            kd = (K[g] * dK[g]).sum()
            if kind == "frobenius_scalar":
                xs = (qd - kd) / (qq + kk + 2 * dh * lam)
            else:  # scale_aware_scalar
                c2k, c2q = kk / dh + lam, qq / dh + lam
                xs = (c2k * qd - c2q * kd) / (c2k * qq + c2q * kk)
            x = xs * eye
        for h in hs:
            dQ[h] = dQ[h] - x.T @ Q[h]
        dK[g] = dK[g] + x @ K[g]
    return dQ, dK


def oracle_ov(v, o_w, gv, go, mv, mo, dh, **kw):
    """One cm_ov step on copies; returns (v', o', mv', mo') in float64."""
    o = _opts(**kw)
    lam, sign = o["damping"], o["sign"]
    v, o_w, gv, go, mv, mo = (t.double().clone() for t in (v, o_w, gv, go, mv, mo))
    hkv, hq = v.shape[0] // dh, o_w.shape[1] // dh
    G = hq // hkv
    V = [v[g * dh : (g + 1) * dh] for g in range(hkv)]
    O = [o_w[:, h * dh : (h + 1) * dh] for h in range(hq)]
    grp = [list(range(g * G, (g + 1) * G)) for g in range(hkv)]
    scale = power_of_two(gv, go, mv, mo)
    mv = o["beta"] * mv + gv
    mo = o["beta"] * mo + go
    if o["momentum_reproject"]:
        kind = "frobenius" if o["connection"] == "none" else o["connection"]
        mvh = [mv[g * dh : (g + 1) * dh] for g in range(hkv)]
        moh = [mo[:, h * dh : (h + 1) * dh] for h in range(hq)]
        mvh, moh = _connect_ov(V, O, mvh, moh, grp, kind, lam, dh)
        mv, mo = torch.cat(mvh), torch.cat(moh, dim=1)
    dv = scale * (gv + o["beta"] * mv if o["nesterov"] else mv)
    do = scale * (go + o["beta"] * mo if o["nesterov"] else mo)
    DV = [dv[g * dh : (g + 1) * dh] for g in range(hkv)]
    DO = [do[:, h * dh : (h + 1) * dh] for h in range(hq)]
    # partner of O_h is V_g(h) (rows); partner of V_g is the group of O_h (columns: O^T rows)
    cv = _roots([[V[g]] for g in range(hkv)], dh, lam, o["isotropic"])
    co = _roots([[O[h].T for h in grp[g]] for g in range(hkv)], dh, lam, o["isotropic"])
    pre = o["whitening"] in ("both", "pre")
    post = o["whitening"] in ("both", "post")
    eye = torch.eye(dh, dtype=torch.float64)
    cvh = [cv[h // G] for h in range(hq)]
    XO = [DO[h] @ (cvh[h] if pre else eye) for h in range(hq)]  # (d, dh) each
    WV = [(co[g] if pre else eye) @ DV[g] for g in range(hkv)]  # (dh, d) each
    budget = 0.5 if o["method"] == "half_split" else 1.0
    UO, UV = [None] * hq, [None] * hkv
    if o["method"] == "half_split":
        UV = [sign(w) for w in WV]
        if o["hybrid"]:
            u = sign(torch.cat(XO, dim=1))
            UO = [u[:, h * dh : (h + 1) * dh] for h in range(hq)]
        else:
            UO = [sign(x) for x in XO]
    elif o["hybrid"]:
        u = sign(torch.cat(XO + [w.T for w in WV], dim=1))
        UO = [u[:, h * dh : (h + 1) * dh] for h in range(hq)]
        UV = [u[:, (hq + g) * dh : (hq + g + 1) * dh].T for g in range(hkv)]
    else:
        for g in range(hkv):
            u = sign(torch.cat([XO[h] for h in grp[g]] + [WV[g].T], dim=1))
            for i, h in enumerate(grp[g]):
                UO[h] = u[:, i * dh : (i + 1) * dh]
            UV[g] = u[:, G * dh :].T
    dO = [UO[h] @ (cvh[h] if post else eye) for h in range(hq)]
    dV = [(co[g] if post else eye) @ UV[g] for g in range(hkv)]
    if o["per_mat_renorm"]:
        fo = torch.cat(UO, dim=1).norm() / torch.cat(dO, dim=1).norm()
        fv = torch.cat(UV).norm() / torch.cat(dV).norm()
        dO = [x * fo for x in dO]
        dV = [x * fv for x in dV]
    dV, dO = _connect_ov(V, O, dV, dO, grp, o["connection"], lam, dh)
    decay = 1 - o["eta"] * o["weight_decay"]
    v_new = decay * v - o["eta"] * budget * torch.cat(dV)
    o_new = decay * o_w - o["eta"] * budget * torch.cat(dO, dim=1)
    return v_new, o_new, mv, mo


def _connect_ov(V, O, dV, dO, grp, kind, lam, dh):
    """Spec §4.6 in OV notation: vertical (X V, -O X); group sums over the O_h of a KV head."""
    if kind == "none":
        return dV, dO
    dV, dO = list(dV), list(dO)
    eye = torch.eye(dh, dtype=torch.float64)
    for g, hs in enumerate(grp):
        a_o = sum(O[h].T @ O[h] for h in hs) + lam * eye
        a_v = V[g] @ V[g].T + lam * eye
        r_v = dV[g] @ V[g].T
        r_o = sum(O[h].T @ dO[h] for h in hs)
        if kind == "frobenius":
            x = sylvester_kron(a_o, a_v, r_v - r_o)
        elif kind == "scale_aware":
            x = 0.5 * (r_v @ torch.linalg.inv(a_v) - torch.linalg.inv(a_o) @ r_o)
        else:
            vv = (V[g] * V[g]).sum()
            oo = sum((O[h] * O[h]).sum() for h in hs)
            vd = (V[g] * dV[g]).sum()
            od = sum((O[h] * dO[h]).sum() for h in hs)
            if kind == "frobenius_scalar":
                xs = (vd - od) / (vv + oo + 2 * dh * lam)
            else:  # scale_aware_scalar
                c2o, c2v = oo / dh + lam, vv / dh + lam
                xs = (c2o * vd - c2v * od) / (c2o * vv + c2v * oo)
            x = xs * eye
        dV[g] = dV[g] - x @ V[g]
        for h in hs:
            dO[h] = dO[h] + O[h] @ x
    return dV, dO
