"""Small builders shared by the tests."""

from __future__ import annotations

import itertools

import torch

FLAG_AXES = {
    "method": ("half_split", "joint"),
    "isotropic": (False, True),
    "whitening": ("both", "pre", "post", "none"),
    "connection": ("none", "frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar"),
    "momentum_reproject": (False, True),
    "per_mat_renorm": (False, True),
}


def flag_product(ov: bool = False):
    """Every combination of the variant flags (spec §4), as kwargs dicts."""
    axes = dict(FLAG_AXES, **({"hybrid": (True, False)} if ov else {}))
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


def flag_id(flags: dict) -> str:
    return "-".join(f"{v}" if not isinstance(v, bool) else (k if v else f"no_{k}")
                    for k, v in flags.items())  # fmt: skip


def qk_tensors(hq, hkv, dh, d, dtype=torch.float64, device="cpu", momentum=True):
    """(q_w, k_w, q_grad, k_grad, m_q, m_k) with nonzero momentum so reprojection matters."""
    g = torch.Generator().manual_seed(1000 * hq + 100 * hkv + dh + d)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    q, k = r(hq * dh, d), r(hkv * dh, d)
    gq, gk = r(hq * dh, d), r(hkv * dh, d)
    mq = r(hq * dh, d) if momentum else torch.zeros_like(q)
    mk = r(hkv * dh, d) if momentum else torch.zeros_like(k)
    return q, k, gq, gk, mq, mk


def ov_tensors(hq, hkv, dh, d, dtype=torch.float64, device="cpu", momentum=True):
    """(v_w, o_w, v_grad, o_grad, m_v, m_o)."""
    q, k, gq, gk, mq, mk = qk_tensors(hq, hkv, dh, d, dtype, device, momentum)
    return k, q.T.contiguous(), gk, gq.T.contiguous(), mk, mq.T.contiguous()


def clones(ts):
    return [t.clone() for t in ts]
