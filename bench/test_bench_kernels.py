"""The Gram-form phase kernels against the same phases in torch, with pytest-benchmark.

    python -m pytest bench/test_bench_kernels.py --benchmark-only --benchmark-json=OUT.json

CUDA only (on CPU the kernels run in Triton's interpreter, which times Python, not kernels):
skipped with a reason where there is no GPU. Shapes (B pairs, H heads, dh, width): one layer
of 16 heads of 128 at d 2048, and 8 layers of 32 heads of 128 at d 4096. The cost model's
estimates for the same phases are in bench/results/cost_model.md; this measures them.
"""

from __future__ import annotations

import pytest
import torch

from cm_triton.dispatch import triton_available
from cm_triton.reference import phases as ref
from cm_triton.schedules import POLAR_EXPRESS_8

SHAPES = [(1, 16, 128, 2048), (8, 32, 128, 4096)]

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
]


def _timed(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    run()  # compile / warm up
    return run


def _case(phase: str, shape, impl: str):
    from cm_triton.kernels import phases as kp

    mod = kp if impl == "triton" else ref
    b, h, dh, n = shape
    w, g, m = (torch.randn(b, h, dh, n, device="cuda") for _ in range(3))
    s = torch.randn(b, h, dh, dh, device="cuda")
    s = s @ s.mT + torch.eye(dh, device="cuda")
    return {
        "stream": lambda: mod.stream(w, g, m, 0.95, False),
        "restart": lambda: mod.restart_gram(s, g, m, 0.95, False),
        "apply": lambda: mod.apply_update(w, s, g, m, 0.95, False, 1.0, 1e-3),
        "first_maps": lambda: mod.first_maps(s, s, POLAR_EXPRESS_8[:3]),
        "last_maps": lambda: mod.last_maps(s, s, s, POLAR_EXPRESS_8[3:]),
        "inv_sqrt": lambda: mod.inv_sqrt(s, "quintic"),
    }[phase]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-dh{}-n{}".format(*s))
@pytest.mark.parametrize("phase", ["stream", "restart", "apply", "first_maps", "last_maps",
                                   "inv_sqrt"])  # fmt: skip
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_phase(benchmark, shape, phase, impl):
    benchmark.group = f"{phase}-" + "B{}-H{}-dh{}-n{}".format(*shape)
    benchmark(_timed(_case(phase, shape, impl)))
