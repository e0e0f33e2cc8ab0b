"""A cost model of the Gram-form step's phases on a GPU: the fused kernels against torch.

Until a GPU measurement replaces it, ``dispatch`` asks this model whether a phase runs faster
as the fused kernel or as the torch ops that compute the same thing (``prefer_kernel``).
Everything here is an **estimate**, from peak figures and stated efficiencies, not a timing.

Per phase, for a leg of ``B x H`` heads of ``R`` rows (``dh``, or joint's and Muon's taller
legs) and width ``n`` (``E = B H R n`` elements, fp32 traffic) or ``M`` small ``R x R``
matrices:

- time of a kernel = its wave count x the time of one wave, where a wave runs one program per
  SM slot (``SMs x programs per SM``), and a program's time is the larger of its bytes over
  its SM's share of HBM bandwidth and its tensor-core flops over its SM's share of the tf32
  peak (tf32x3: 3 products per fp32 product); plus one launch;
- time of torch = the sum over its ops of (launch + max(bytes / bandwidth, flops / fp32 peak)),
  each op a full-machine kernel (cuBLAS, elementwise), fp32 matmuls on CUDA cores (torch keeps
  TF32 off for fp32 matmuls by default); plus, for each operand the kernels would have read
  where it lives (``stacked``: a layer list, ``tables.LayerRows``), the stack torch must form
  first (one read and one write of it).

Where each phase's figures come from (``ESTIMATE_SOURCES``): the kernels' loops in
``kernels/streaming.py`` and ``kernels/algebra.py``, counted: a leg taller than one row block
(``kb = ceil(R / block)`` blocks of ``gpu.gram_block`` rows) is tiled, and each of its programs
reads every row block it needs, so the row-tiled passes read their big operand ``kb`` times
(the restart's re-formed rows ``2 kb`` times); torch's from its ops (``reference/phases.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "GPU",
    "GPUS",
    "ESTIMATE_SOURCES",
    "gpu_for",
    "Estimate",
    "PHASES",
    "estimate",
    "prefer_kernel",
    "use_kernel",
]


@dataclass(frozen=True)
class GPU:
    """Peak figures (vendor datasheets, dense) and the efficiencies this model assumes."""

    name: str
    sms: int
    hbm_bytes_s: float
    fp32_flops: float  # CUDA cores, FMA = 2 flops
    tf32_flops: float  # tensor cores, dense
    gram_block: int = 128  # rows per block of a row-tiled leg (kernels.common.row_cap)
    launch_s: float = 4e-6  # CPU launch plus the idle gap between dependent kernels
    bw_eff: float = 0.8  # fraction of HBM bandwidth a streaming kernel reaches
    tc_eff: float = 0.5  # fraction of the tensor-core peak Triton's tf32 dots reach
    fp32_eff: float = 0.7  # fraction of the fp32 peak cuBLAS reaches on batched products


GPUS = {
    "H100": GPU("H100 SXM", 132, 3.35e12, 67e12, 495e12),
    "A100": GPU("A100 SXM 80GB", 108, 2.04e12, 19.5e12, 156e12, gram_block=64),
}
ESTIMATE_SOURCES = {
    "stream": "kernel: one read of W, G, m and one write of m_new, the reads kb times over when "
              "row-tiled (each block pair's program reads its two row blocks); torch: m_new, "
              "two Grams, the chunks' sum",
    "restart": "kernel: one row block: X = T D formed tile by tile and its Gram taken, X "
               "never stored; row-tiled, or rows past the GPU's Gram block (A100: 64): the "
               "apply kernel forms X (each row block reading every row of D: kb x the reads) "
               "and the Gram kernel takes X X^T (kb x); torch: X, then X X^T",
    "apply": "kernel: each row block's program reads every row of D (kb x the reads when "
             "row-tiled), W once, writes W once; torch: T D, then decay W - step T D",
    "maps": "kernel: 37 products of R x R in scratch (L2-resident, counted as HBM); torch: the "
            "same products and their elementwise ops as separate launches",
    "inv_sqrt": "as maps, 28 products",
}  # fmt: skip


def gpu_for(capability: tuple[int, int] | None) -> GPU:
    """The model's GPU for a CUDA compute capability (Hopper -> H100, Ampere -> A100)."""
    return GPUS["A100"] if capability is not None and capability[0] == 8 else GPUS["H100"]


@dataclass(frozen=True)
class Estimate:
    """Seconds, flops and bytes of one way of computing a phase."""

    seconds: float
    flops: float
    bytes: float
    launches: int
    programs: int = 0


def _programs_per_sm(kind: str, dh: int) -> int:
    """Resident programs per SM of each kernel, from bench/results/compile_report.md."""
    table = {"stream": {16: 4, 32: 3, 64: 3, 128: 1}, "maps": {16: 4, 32: 3, 64: 3, 128: 2}}
    block = max(16, 1 << (dh - 1).bit_length())
    return table["maps" if kind == "maps" else "stream"].get(block, 1)


def _kernel(gpu: GPU, programs: int, per_sm: int, flops: float, nbytes: float) -> float:
    """A fused kernel: whole waves of programs, each bound by its share of the machine."""
    slots = gpu.sms * per_sm
    waves = math.ceil(programs / slots)
    # A program runs on one SM: it gets that SM's share of the machine, split with the
    # programs resident beside it (an idle SM's share is not lent to others).
    sharing = gpu.sms * math.ceil(min(programs, slots) / gpu.sms)
    bw = gpu.hbm_bytes_s * gpu.bw_eff / sharing
    tc = gpu.tf32_flops * gpu.tc_eff / sharing
    per_program = max(nbytes / programs / bw, flops / programs / tc)
    return gpu.launch_s + waves * per_program


def _torch(gpu: GPU, ops: list[tuple[float, float]]) -> float:
    """Full-machine ops ``[(flops, bytes)]``, each one launch."""
    return sum(gpu.launch_s + max(b / (gpu.hbm_bytes_s * gpu.bw_eff),
                                  f / (gpu.fp32_flops * gpu.fp32_eff)) for f, b in ops)  # fmt: skip


PHASES = ("stream", "restart", "apply", "maps", "inv_sqrt")


def estimate(phase: str, b: int, h: int, dh: int, n: int, gpu: GPU,
             stacked: int = 0) -> tuple[Estimate, Estimate]:  # fmt: skip
    """``(kernel, torch)`` estimates of one phase for ``B x H`` heads of ``dh x n`` (``dh``:
    the leg's rows; ``n`` unused by the dh x dh phases, whose ``B H`` matrices are each one
    program). ``stacked``: how many of the phase's big operands are layer lists the kernel
    reads in place and torch must stack first (``ESTIMATE_SOURCES``)."""
    e = b * h * dh * n
    m = b * h
    tiles = math.ceil(dh / gpu.gram_block) if dh > 128 else 1  # row blocks of a tiled leg
    pairs = m * tiles * tiles  # a Gram's block pairs per chunk of columns
    stack = [(0, 8 * e)] * stacked  # torch forms each layer list's stack: read and write
    if phase == "stream":  # m' = beta m + g; W W^T and D D^T per head
        kf, kb = 3 * 4 * dh * e, 12 * e * tiles + 4 * e  # 2 Grams x 2 dh flops, tf32x3
        programs = min(pairs * math.ceil(n / 32), max(pairs, 264))
        ops = [(2 * e, 12 * e), (2 * dh * e, 4 * e), (2 * dh * e, 4 * e), (0, 8 * m * dh * dh)]
    elif phase == "restart":  # X = T D, X X^T
        if tiles == 1 and dh <= gpu.gram_block:  # fused: X formed tile by tile, never stored
            kf, kb = 3 * 4 * dh * e, 4 * e
        else:  # two passes: the apply kernel forms X (D read per row block), then its Gram
            kf, kb = 3 * 3 * dh * e, 4 * e * (2 * tiles + 1)
        programs = min(pairs * math.ceil(n / 32), max(pairs, 264))
        ops = [(2 * dh * e, 8 * e), (2 * dh * e, 4 * e)]
    elif phase == "apply":  # W <- decay W - step T D
        kf, kb = 3 * 2 * dh * e, 4 * e * tiles + 8 * e
        programs = min(m * tiles * math.ceil(n / 32), max(m * tiles, 264))
        ops = [(2 * dh * e, 8 * e), (2 * e, 12 * e)]
    elif phase in ("maps", "inv_sqrt"):  # first + last maps: 37 products; inverse root: 28
        products = 37 if phase == "maps" else 28
        kf = 3 * products * 2 * dh**3 * m
        kb = products * 3 * 4 * dh * dh * m  # scratch traffic, L2-resident: counted as HBM
        programs = m
        elementwise = 3 * products // 4
        ops = [(2 * dh**3 * m, 12 * dh * dh * m)] * products + [(0, 8 * dh * dh * m)] * elementwise
        per_sm = _programs_per_sm("maps", dh)
        kt = _kernel(gpu, programs, per_sm, kf, kb)
        return (Estimate(kt, kf, kb, 1, programs),
                Estimate(_torch(gpu, ops), sum(f for f, _ in ops), sum(x for _, x in ops),
                         len(ops)))  # fmt: skip
    else:
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    kt = _kernel(gpu, programs, _programs_per_sm("stream", dh), kf, kb)
    ops = stack + ops
    tt = _torch(gpu, ops)
    return (Estimate(kt, kf, kb, 1, programs),
            Estimate(tt, sum(f for f, _ in ops), sum(x for _, x in ops), len(ops)))  # fmt: skip


def prefer_kernel(phase: str, b: int, h: int, dh: int, n: int, gpu: GPU,
                  stacked: int = 0) -> bool:  # fmt: skip
    """Whether the model expects the fused kernel to beat torch for this phase and shape."""
    kernel, torch_ = estimate(phase, b, h, dh, n, gpu, stacked)
    return kernel.seconds < torch_.seconds


def use_kernel(phase: str, b: int, h: int, dh: int, n: int, device: torch.device,
               stacked: int = 0) -> bool:  # fmt: skip
    """Whether a Gram-form phase (``cost_model.PHASES``) of ``B x H`` heads of ``dh x n`` runs
    as its fused kernel or as torch ops (``stacked``: operands torch would have to stack).
    CUDA: the cost model's estimate (until a GPU measurement replaces it); elsewhere (the
    interpreter) always the kernel."""
    if device.type != "cuda":
        return True
    gpu = gpu_for(torch.cuda.get_device_capability(device))
    return prefer_kernel(phase, b, h, dh, n, gpu, stacked)
