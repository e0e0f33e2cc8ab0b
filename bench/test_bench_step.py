"""One attention layer's CM step (cm_qk + cm_ov) against torch.optim.Muon on the same four
matrices, with pytest-benchmark.

    python -m pytest bench/test_bench_step.py --benchmark-only --benchmark-json=OUT.json

CPU cases always run (reference backend); CUDA cases (kernels, reference, Muon; bf16) are
skipped with a reason where there is no GPU. Compare each CM time to the Muon time of the
same shape in the same run (``bench/summarize.py`` prints the ratios).
"""

from __future__ import annotations

import pytest
import torch

from cm_triton import cm_ov, cm_qk
from cm_triton.dispatch import triton_available

CPU_SHAPES = [(4, 32, 128), (8, 64, 512), (16, 64, 1024)]  # (H, dh, d), MHA
CUDA_SHAPES = [(16, 128, 2048), (32, 128, 4096)]


def _layer(h, dh, d, device, dtype):
    """q, k, v weights (H*dh, d) and o (d, H*dh), their gradients and momentum buffers."""
    g = torch.Generator().manual_seed(0)
    shapes = [(h * dh, d)] * 3 + [(d, h * dh)]
    ws = [torch.randn(s, generator=g).div(d**0.5).to(device, dtype) for s in shapes]
    gs = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    ms = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
    return ws, gs, ms


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _cm_runner(h, dh, d, device, dtype, backend, **options):
    (q, k, v, o), (gq, gk, gv, go), (mq, mk, mv, mo) = _layer(h, dh, d, device, dtype)

    def step():
        cm_qk(q, k, gq, gk, mq, mk, head_dim=dh, eta=1e-3, backend=backend, **options)
        cm_ov(v, o, gv, go, mv, mo, head_dim=dh, eta=1e-3, backend=backend, **options)
        _sync(device)

    return step


def _muon_runner(h, dh, d, device, dtype):
    ws, gs, _ = _layer(h, dh, d, device, dtype)
    params = [torch.nn.Parameter(w) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g
    opt = torch.optim.Muon(params, lr=1e-3, weight_decay=0.0)

    def step():
        opt.step()
        _sync(device)

    return step


# CM's options per CPU case. torch.optim.Muon iterates in bf16 whatever the weights' dtype;
# CM's CPU default is fp32 iterations (spec §2), so the bf16 case is the like-for-like one.
CPU_CM = {
    "cm_reference": {},
    "cm_reference_bf16": {"ns_dtype": torch.bfloat16},
    "cm_isotropic": {"isotropic": True},
}


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "H{}-dh{}-d{}".format(*s))
@pytest.mark.parametrize("impl", [*CPU_CM, "muon"])
def test_cpu_step(benchmark, shape, impl):
    benchmark.group = "cpu-step-H{}-dh{}-d{}".format(*shape)
    if impl == "muon":
        run = _muon_runner(*shape, "cpu", torch.float32)
    else:
        run = _cm_runner(*shape, "cpu", torch.float32, "reference", **CPU_CM[impl])
    benchmark(run)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "H{}-dh{}-d{}".format(*s))
@pytest.mark.parametrize("impl", ["cm_triton", "cm_reference", "muon"])
def test_cuda_step(benchmark, shape, impl):
    if impl == "cm_triton" and not triton_available():
        pytest.skip("triton is not installed")
    benchmark.group = "cuda-step-H{}-dh{}-d{}".format(*shape)
    if impl == "muon":
        run = _muon_runner(*shape, "cuda", torch.bfloat16)
    else:
        run = _cm_runner(*shape, "cuda", torch.bfloat16, impl.removeprefix("cm_"))
    run()  # compile and warm up outside the timing
    benchmark(run)
