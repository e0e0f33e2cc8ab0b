"""CM's step against Muon, with pytest-benchmark.

    python -m pytest bench/test_bench_step.py --benchmark-only --benchmark-json=OUT.json
    python bench/summarize.py OUT.json

(a) One attention layer: ``cm_qk`` + ``cm_ov`` on the four matrices against Muon on the same
four. (b) A whole Llama-shaped GQA model (4 blocks, SwiGLU MLP): ``CompositionalMuon`` with
``param_groups(model)`` against Muon on every hidden matrix (AdamW on the rest, both).
CPU cases are like-for-like fp32 (``muon_fp32``: torch.optim.Muon's algorithm without its bf16
cast, ``bench/baselines.py``); ``torch.optim.Muon`` itself (bf16 iterations) is listed for
reference. ``cm_release`` is CM with the release's evaluation (``ns_method="ns"``,
``inv_root="newton"``): the before of this change. CUDA cases are skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from baselines import MuonFP32
from torch import nn

from cm_triton import MUON_CLASSIC_5, CompositionalMuon, cm_ov, cm_qk, param_groups
from cm_triton.dispatch import triton_available

LAYER_SHAPES = [(8, 64, 512), (16, 64, 1024), (16, 128, 2048)]  # (H, dh, d), MHA
CUDA_SHAPES = [(16, 128, 2048), (32, 128, 4096)]
RELEASE = {"ns_method": "ns", "inv_root": "newton"}


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


def _cm_layer(h, dh, d, device, dtype, **options):
    (q, k, v, o), (gq, gk, gv, go), (mq, mk, mv, mo) = _layer(h, dh, d, device, dtype)

    def step():
        cm_qk(q, k, gq, gk, mq, mk, head_dim=dh, eta=1e-3, **options)
        cm_ov(v, o, gv, go, mv, mo, head_dim=dh, eta=1e-3, **options)
        _sync(device)

    return step


def _muon_layer(h, dh, d, device, dtype, torch_muon: bool):
    ws, gs, _ = _layer(h, dh, d, device, dtype)
    params = [torch.nn.Parameter(w) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g
    opt = torch.optim.Muon(params, lr=1e-3, weight_decay=0.0) if torch_muon else MuonFP32(params)

    def step():
        opt.step()
        _sync(device)

    return step


LAYER_IMPLS = {
    "cm": lambda s: _cm_layer(*s, "cpu", torch.float32),
    "cm_release": lambda s: _cm_layer(*s, "cpu", torch.float32, **RELEASE),
    "muon_fp32": lambda s: _muon_layer(*s, "cpu", torch.float32, torch_muon=False),
    "muon_torch_bf16": lambda s: _muon_layer(*s, "cpu", torch.float32, torch_muon=True),
}


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "H{}-dh{}-d{}".format(*s))
@pytest.mark.parametrize("impl", list(LAYER_IMPLS))
def test_cpu_layer(benchmark, shape, impl):
    benchmark.group = "cpu-layer-H{}-dh{}-d{}".format(*shape)
    run = LAYER_IMPLS[impl](shape)
    run()  # warm up
    benchmark.pedantic(run, rounds=5 if shape[2] >= 2048 else 15, warmup_rounds=0)


# -- (b) a whole Llama-shaped GQA model ---------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, h: int, hkv: int, ffn: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = h, hkv, d // h
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, hkv * (d // h), bias=False)
        self.v_proj = nn.Linear(d, hkv * (d // h), bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)


class Llama(nn.Module):
    """Shapes only (the optimizer step is timed on fixed gradients): d 1024, 8 query heads of
    128, 2 KV heads (GQA 4), SwiGLU MLP of 2816 (2.75 d, Llama's ratio), 4 blocks."""

    def __init__(self, d=1024, h=8, hkv=2, ffn=2816, n_layer=4, vocab=256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, h, hkv, ffn) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def _model_with_grads(device, dtype):
    torch.manual_seed(0)
    model = Llama().to(device, dtype)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    return model


def _cm_model(device, dtype, **options):
    model = _model_with_grads(device, dtype)
    opt = CompositionalMuon(param_groups(model, **options), lr=1e-3)

    def step():
        opt.step()
        _sync(device)

    return step


def _muon_model(device, dtype):
    """Muon (fp32, torch's algorithm) on every hidden matrix, AdamW (foreach) on the rest."""
    model = _model_with_grads(device, dtype)
    groups = param_groups(model, attention=False)
    mats = [p for g in groups if g["kind"] == "muon" for p in g["params"]]
    rest = [p for g in groups if g["kind"] == "adamw" for p in g["params"]]
    muon = MuonFP32(mats, lr=1e-3)
    adamw = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), foreach=True)

    def step():
        muon.step()
        adamw.step()
        _sync(device)

    return step


def _cm_model_muon5():
    """CompositionalMuon whose Muon groups use torch.optim.Muon's 5-step schedule: isolates
    what CM costs over the Muon it replaces, at an equal Muon schedule."""
    model = _model_with_grads("cpu", torch.float32)
    groups = param_groups(model)
    for g in groups:
        if g["kind"] == "muon":
            g["ns_coefficients"] = MUON_CLASSIC_5
    return CompositionalMuon(groups, lr=1e-3).step


MODEL_IMPLS = {
    "cm": lambda: _cm_model("cpu", torch.float32),
    "cm_muon5": _cm_model_muon5,
    "cm_release": lambda: _cm_model("cpu", torch.float32, **RELEASE),
    "cm_muon_only": lambda: _cm_muon_only(),
    "muon_fp32": lambda: _muon_model("cpu", torch.float32),
}


def _cm_muon_only():
    """CompositionalMuon with no attention found: its own Muon on every matrix (the same msign
    as its Muon groups use), to isolate what CM's attention handling costs."""
    model = _model_with_grads("cpu", torch.float32)
    opt = CompositionalMuon(param_groups(model, attention=False), lr=1e-3)
    return opt.step


@pytest.mark.parametrize("impl", list(MODEL_IMPLS))
def test_cpu_model(benchmark, impl):
    benchmark.group = "cpu-model-llama-d1024-L4"
    run = MODEL_IMPLS[impl]()
    run()
    benchmark.pedantic(run, rounds=5, warmup_rounds=0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "H{}-dh{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["cm", "cm_reference", "cm_release", "muon_torch"])
def test_cuda_layer(benchmark, shape, dtype, impl):
    if impl == "cm" and not triton_available():
        pytest.skip("triton is not installed")
    benchmark.group = "cuda-layer-H{}-dh{}-d{}-{}".format(*shape, dtype)
    if impl == "muon_torch":
        run = _muon_layer(*shape, "cuda", dtype, torch_muon=True)
    else:
        opts = {"cm": {}, "cm_reference": {"backend": "reference"}, "cm_release": RELEASE}[impl]
        run = _cm_layer(*shape, "cuda", dtype, **opts)
    run()
    benchmark(run)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["cm", "muon"])
def test_cuda_model(benchmark, dtype, impl):
    benchmark.group = f"cuda-model-llama-d1024-L4-{dtype}"
    run = _cm_model("cuda", dtype) if impl == "cm" else _muon_model("cuda", dtype)
    run()
    benchmark(run)
