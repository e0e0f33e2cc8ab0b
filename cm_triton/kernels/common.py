"""Shared settings of the Triton kernels: what they accept and how they are launched."""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor

from cm_triton.tables import LayerRows

MAX_HEAD_DIM = 128
DOT_PRECISION = "tf32x3"
TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs: split the width until a leg has these


def _block(dh: int) -> int:
    return max(16, triton.next_power_of_2(dh))


# Launch shapes per kernel and block (dh rounded up to a power of two): (warps, tile, BLOCK_K),
# the tile being BLOCK_N (columns per step) for the streaming kernels and BLOCK_M (rows per
# product block) for the dh x dh ones. Chosen from ahead-of-time compiles of every launch a step
# makes (bench/compile_report.py): the largest tiles that stay spill-free on every target; where
# one set cannot serve all, ``FAMILY_TUNING`` overrides it for a family of targets.
TUNING = {
    "stream": {16: (4, 64, 0), 32: (4, 64, 0), 64: (4, 32, 0), 128: (8, 16, 0)},
    "stream_cross": {16: (4, 64, 0), 32: (4, 32, 0), 64: (4, 16, 0), 128: (8, 16, 0)},
    "restart": {16: (4, 64, 16), 32: (4, 16, 32), 64: (8, 32, 32), 128: (8, 16, 16)},
    "apply": {16: (4, 64, 16), 32: (4, 64, 32), 64: (4, 64, 32), 128: (8, 32, 32)},
    "apply_tw": {16: (4, 32, 16), 32: (4, 32, 16), 64: (4, 32, 16), 128: (8, 16, 16)},
    "maps": {16: (2, 16, 16), 32: (4, 32, 16), 64: (4, 16, 16), 128: (4, 16, 16)},
    "inv_sqrt": {16: (2, 16, 16), 32: (4, 32, 16), 64: (4, 16, 16), 128: (4, 16, 16)},
}
# Families of targets (compute capability x 10 + minor), each difference found in the compile
# report. mma.sync tensor cores (sm_80, sm_86, sm_89, sm_120) hold a tf32x3 dot's accumulator
# and its split operands in registers: a 128 x 128 Gram block reaches 255 registers and spills
# 8-152 bytes, so their Gram blocks are 64 rows (wgmma, sm_90 and sm_100, keeps 128), and
# their 64-row stream and apply take narrower tiles (a strided gradient beside a contiguous
# momentum spilled 40-48 bytes). 99 KB of shared memory a block (sm_86, sm_89, sm_120) keeps
# more in registers: the quintic root at 128 spills 8 bytes with 4 warps, none with 8. On
# Blackwell (sm_100, sm_120) ptxas caps a thread at 128 registers unless told otherwise: the
# dh x dh kernels spilled 8-112 bytes there, none with 255 allowed (``launch_options``).
# Triton 3.9 caps the mma.sync targets too (168 registers at 4 warps: the Gram kernel at 64
# rows and the 128 maps spilled 8 bytes on sm_80, 86, 89; Triton 3.6 did not): every target
# but Hopper's wgmma passes 255.
MMA_TARGETS = (80, 86, 89, 120)
BLACKWELL_TARGETS = (100, 120)
FAMILY_TUNING = [  # (targets, overrides): the first family that names a (phase, block) wins
    ((80, 86, 89, 120), {"stream": {64: (4, 16, 0)}, "apply": {64: (4, 32, 32)}}),
    ((86, 89, 120), {"inv_sqrt": {128: (8, 16, 16)}}),
]  # fmt: skip


def target_arch() -> int:
    """The compute capability launches compile for (x 10 + minor): the active Triton driver's
    current target (a GPU's, or ``cm_triton.aot``'s stand-in); 90 where there is none (the
    interpreter)."""
    try:
        arch = triton.runtime.driver.active.get_current_target().arch
    except Exception:  # noqa: BLE001 - no GPU driver: the interpreter
        return 90
    return arch if isinstance(arch, int) else 90


def tuning(phase: str, block: int, arch: int | None = None) -> tuple[int, int, int]:
    """``TUNING[phase][block]``, or its family's override on ``arch`` (default: the target)."""
    arch = target_arch() if arch is None else arch
    for targets, overrides in FAMILY_TUNING:
        choice = overrides.get(phase, {}).get(block) if arch in targets else None
        if choice is not None:
            return choice
    return TUNING[phase][block]


def launch_options(arch: int | None = None) -> dict:
    """Compile options every launch on ``arch`` (default: the target) passes: 255 registers a
    thread on Blackwell and the mma.sync targets, where ptxas would otherwise stop at 128
    (Blackwell) or Triton 3.9 at 168."""
    arch = target_arch() if arch is None else arch
    return {"maxnreg": 255} if arch in BLACKWELL_TARGETS + MMA_TARGETS else {}


def gram_row_cap(arch: int | None = None) -> int:
    """Rows per block of a Gram of one form with itself: 128, or 64 on mma.sync targets."""
    return 64 if (target_arch() if arch is None else arch) in MMA_TARGETS else 128


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


INT32_MAX = 2**31 - 1


def tile_extent(x: Tensor) -> int:
    """The largest element offset inside one head of a big ``(B, H, R, n)`` operand:
    ``(R - 1) |stride_R| + (n - 1) |stride_n|``. The kernels index a tile in int32 from its
    head's start (the head's and the batch entry's offsets, and every offset made from a
    program id, are int64: the compile gate reads the TTIR for it), so this must fit."""
    stored = x.first if isinstance(x, LayerRows) else x
    r, n = stored.shape[-2:]
    sr, sn = stored.stride()[-2:]
    return (r - 1) * abs(sr) + (n - 1) * abs(sn)


def streams_take(*tensors: Tensor) -> bool:
    """Whether the streaming kernels take these tensors: fp32/bf16/fp16, any row count (rows
    are tiled) whose square scratch block and each head's tile offsets fit int32, not empty."""
    stored = [t.first if isinstance(t, LayerRows) else t for t in tensors]
    rows = tensors[0].shape[-2]
    return (all(t.dtype in KERNEL_DTYPES for t in (*tensors, *stored)) and tensors[0].numel() > 0
            and all(tile_extent(t) <= INT32_MAX for t in tensors if t.dim() >= 2)
            and triton.next_power_of_2(rows) ** 2 <= INT32_MAX)  # fmt: skip


def unsupported(kernel: str, x: Tensor) -> ValueError:
    """The error a kernel raises for input it does not take (the chooser,
    ``cm_triton.dispatch``, sends such input to the reference before any launch)."""
    return ValueError(f"the {kernel} kernel does not take {x.dtype} {tuple(x.shape)}: "
                      "choose the phase with cm_triton.dispatch")  # fmt: skip


def _chunk(b: int, h: int, n: int, block_n: int) -> int:
    """Columns per program: enough programs to fill the machine, whole tiles each."""
    chunks = max(1, min(triton.cdiv(n, block_n), triton.cdiv(TARGET_PROGRAMS, b * h)))
    return triton.cdiv(triton.cdiv(n, chunks), block_n) * block_n


def on_device(x: Tensor):
    """Launch on ``x``'s GPU: Triton launches on the current device, which need not be the
    tensors' (a model spread over GPUs, ``device_map="auto"``)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
