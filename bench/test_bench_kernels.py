"""Fused kernels against the reference primitives, per head, with pytest-benchmark.

    python -m pytest bench/test_bench_kernels.py --benchmark-only --benchmark-json=OUT.json

CUDA only (the kernels target GPUs; on CPU they would only run in Triton's interpreter, which
times Python, not kernels): skipped with a reason where there is no GPU.
Shapes (H, dh, d) from the kernels issue; msign in fp32 and bf16 iterations; the fused Gram
inverse root with the whitened operand.
"""

from __future__ import annotations

import pytest
import torch

from cm_triton.dispatch import triton_available
from cm_triton.reference import primitives as ref

SHAPES = [(16, 128, 2048), (32, 128, 4096), (8, 64, 512)]

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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-dh{}-d{}".format(*s))
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_msign(benchmark, shape, ns_dtype, impl):
    from cm_triton import kernels

    h, dh, d = shape
    benchmark.group = f"msign-H{h}-dh{dh}-d{d}-{ns_dtype}"
    x = torch.randn(h, dh, d, device="cuda").to(ns_dtype)
    fn = kernels.msign if impl == "triton" else ref.msign
    benchmark(_timed(lambda: fn(x, dtype=ns_dtype)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-dh{}-d{}".format(*s))
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_gram_inv_sqrt(benchmark, shape, impl):
    from cm_triton import kernels

    h, dh, d = shape
    benchmark.group = f"gram_inv_sqrt-H{h}-dh{dh}-d{d}"
    w = torch.randn(h, dh, d, device="cuda")
    dmat = torch.randn(h, dh, d, device="cuda")
    fn = kernels.gram_inv_sqrt if impl == "triton" else ref.gram_inv_sqrt
    benchmark(_timed(lambda: fn(w, 1e-2, 1, "newton", dmat)))
