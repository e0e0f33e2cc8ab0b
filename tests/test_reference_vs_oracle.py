"""The batched reference against the literal per-head oracle (tests/oracle.py), float64.

Both sides run the same arithmetic in float64 with exact (eigh) inverse roots and the same
Polar Express iteration; they differ only in summation order and batching. The 8-step
Newton-Schulz amplifies rounding by at most ~|a|+|b|+|c| ~ 50 per step early on, so a few
1e-16 ulps grow to ~1e-11 at worst: rtol/atol 1e-9 leaves two orders of margin and still
fails on any formula error (those are O(1) relative).
"""

from __future__ import annotations

import pytest
import torch
from helpers import clones, flag_id, flag_product, ov_tensors, qk_tensors
from oracle import oracle_ov, oracle_qk

from cm_triton import cm_ov, cm_qk

TOL = dict(rtol=1e-9, atol=1e-9)
ETA = 0.3  # large enough that a wrong direction shows in the weights


def _check_qk(shape, **flags):
    hq, hkv, dh, d = shape
    ts = qk_tensors(hq, hkv, dh, d)
    want = oracle_qk(*clones(ts), dh, eta=ETA, **flags)
    got = clones(ts)
    cm_qk(*got, head_dim=dh, eta=ETA, inv_root="eigh", backend="reference", **flags)
    for name, w, g in zip(("q_w", "k_w", "m_q", "m_k"), want, got[:2] + got[4:]):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _check_ov(shape, **flags):
    hq, hkv, dh, d = shape
    ts = ov_tensors(hq, hkv, dh, d)
    want = oracle_ov(*clones(ts), dh, eta=ETA, **flags)
    got = clones(ts)
    cm_ov(*got, head_dim=dh, eta=ETA, inv_root="eigh", backend="reference", **flags)
    for name, w, g in zip(("v_w", "o_w", "m_v", "m_o"), want, got[:2] + got[4:]):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, n=name: f"{n}: {m}")


QK_FLAGS = list(flag_product())
OV_FLAGS = list(flag_product(ov=True))


@pytest.mark.parametrize("shape", [(3, 3, 8, 21), (4, 2, 8, 19)], ids=["mha", "gqa"])
@pytest.mark.parametrize("flags", QK_FLAGS, ids=[flag_id(f) for f in QK_FLAGS])
def test_qk_every_flag_matches_oracle(shape, flags):
    _check_qk(shape, **flags)


@pytest.mark.parametrize("shape", [(3, 3, 8, 21), (4, 2, 8, 19)], ids=["mha", "gqa"])
@pytest.mark.parametrize("flags", OV_FLAGS, ids=[flag_id(f) for f in OV_FLAGS])
def test_ov_every_flag_matches_oracle(shape, flags):
    _check_ov(shape, **flags)


SHAPES = [  # (Hq, Hkv, dh, d): dh 8/16/64, d a prime or odd, H from 1 to 6, tall and wide stacks
    (1, 1, 8, 13),
    (2, 1, 16, 37),
    (6, 3, 16, 83),
    (5, 5, 8, 7),  # d < dh: every per-head slice is tall, so msign works on transposes
    (4, 1, 64, 131),
    (6, 2, 64, 97),
]
SOME_FLAGS = [
    {},
    {"method": "joint"},
    {"isotropic": True, "connection": "scale_aware"},
    {"whitening": "post", "per_mat_renorm": True, "connection": "frobenius"},
    {"momentum_reproject": True, "connection": "frobenius_scalar", "method": "joint"},
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("flags", SOME_FLAGS, ids=str)
def test_qk_shapes_match_oracle(shape, flags):
    _check_qk(shape, **flags)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("flags", SOME_FLAGS + [{"hybrid": False}], ids=str)
def test_ov_shapes_match_oracle(shape, flags):
    _check_ov(shape, **flags)


@pytest.mark.parametrize(
    "hyper",
    [
        {"nesterov": True},
        {"weight_decay": 0.1},
        {"beta": 0.0},
        {"beta": 0.5, "nesterov": True, "weight_decay": 0.05, "damping": 0.3},
        {"damping": 0.0},
    ],
    ids=str,
)
def test_hyperparameters_match_oracle(hyper):
    _check_qk((4, 2, 8, 19), **hyper)
    _check_ov((4, 2, 8, 19), **hyper)


def test_classic_muon_schedule_matches_oracle():
    from functools import partial

    from oracle import ns_msign

    from cm_triton import MUON_CLASSIC_5

    hq, hkv, dh, d = 4, 2, 8, 19
    ts = qk_tensors(hq, hkv, dh, d)
    want = oracle_qk(*clones(ts), dh, eta=ETA, sign=partial(ns_msign, coeffs=MUON_CLASSIC_5))
    got = clones(ts)
    cm_qk(*got, head_dim=dh, eta=ETA, inv_root="eigh", ns_coefficients=MUON_CLASSIC_5)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
