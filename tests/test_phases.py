"""The default flags' fused path (``phases.gram_pair_step``) equals the general pipeline
(``pipeline.general_pair_step``) on the flags both cover (spec §2.1, §2.2).

Both evaluate the same Newton-Schulz polynomial on the same Grams; they differ in where the
step size and the renorm factor enter (a float step and ``tr(T S T^T)`` against maps scaled
before the apply; the hybrid O sign's norms read off ``U U^T``), so in float64 they agree to
rounding (~1e-16 per op); 1e-12 catches any formula slip, which is O(1).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cm_triton.dispatch import resolve_options
from cm_triton.options import CMOptions
from cm_triton.reference.phases import fusable
from cm_triton.reference.pipeline import general_pair_step, pair_step

AXES = {
    "whitening": ("both", "pre", "post", "none"),
    "isotropic": (False, True),
    "per_mat_renorm": (False, True),
    "nesterov": (False, True),
}
CASES = [dict(zip(AXES, v)) for v in itertools.product(*AXES.values())]


def _pair(hq, hkv, dh, d, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(h):
        return torch.randn(b, h, dh, d, generator=g, dtype=torch.float64)

    return r(hq), r(hkv), r(hq), r(hkv), r(hq), r(hkv)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("flags", CASES, ids=str)
def test_fused_default_path_equals_the_general_pipeline(flags, hybrid):
    opts = resolve_options(CMOptions(eta=0.1, weight_decay=0.1, **flags), torch.device("cpu"))
    ts = _pair(4, 2, 8, 37)  # GQA, d not a multiple of anything
    assert fusable(opts, 8, 37, 37)
    for got, want in zip(pair_step(*ts, opts, hybrid), general_pair_step(*ts, opts, hybrid)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_what_the_fused_path_does_not_cover_runs_the_general_pipeline():
    base = resolve_options(CMOptions(eta=0.1), torch.device("cpu"))
    assert fusable(base, 16, 64, 64)
    for change in ({"method": "joint"}, {"connection": "frobenius"},
                   {"momentum_reproject": True}, {"ns_method": "ns"}):  # fmt: skip
        assert not fusable(resolve_options(CMOptions(eta=0.1, **change), torch.device("cpu")),
                           16, 64, 64)  # fmt: skip
    assert not fusable(base, 16, 24, 64)  # d < 2 dh: Gram form is not the cheaper one


def test_a_root_shared_by_every_head_is_read_per_head():
    # Multi-query (one KV head): the shared factor's root (B, 1, dh, dh) serves every query
    # head. The kernels read it by index; the reference phases must repeat it (it once
    # crashed in bmm when a phase of the kernel backend fell to the reference).
    from cm_triton.reference import phases as ref
    from cm_triton.schedules import POLAR_EXPRESS_8

    s = torch.randn(2, 3, 8, 20, dtype=torch.float64)
    s = s @ s.mT
    root = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    root = root @ root.mT + torch.eye(8, dtype=torch.float64)
    got = ref.first_maps(s, root, POLAR_EXPRESS_8[:3])
    want = ref.first_maps(s, root.expand(2, 3, 8, 8), POLAR_EXPRESS_8[:3])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
