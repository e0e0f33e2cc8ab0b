"""Per-target hardware limits and occupancy (the CUDA occupancy calculator's rules)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TargetLimits:
    """Per-SM / per-block limits of one NVIDIA GPU, as the CUDA occupancy calculator uses them.

    Shared memory sizes are bytes; ``max_smem_per_block`` is the opt-in maximum (what Triton may
    request as dynamic shared memory), ``reserved_smem_per_block`` the 1 KB the driver keeps per
    block on sm_80+. Registers are allocated per warp in units of ``reg_alloc_unit``.
    """

    name: str
    arch: int
    sm_count: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_regs_per_block: int = 65536
    reg_alloc_unit: int = 256
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    max_smem_per_block: int = 227 * 1024
    reserved_smem_per_block: int = 1024
    warp_size: int = 32
    sm_clock_khz: int = 0
    mem_clock_khz: int = 0
    mem_bus_width: int = 0

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // self.warp_size


# Per compute capability, from the CUDA C++ Programming Guide's "Technical Specifications per
# Compute Capability" (shared memory per SM and per block, resident threads and blocks per SM;
# 64K registers and 255 per thread on all of these); SM counts and clocks are of the named part.
LIMITS: dict[int, TargetLimits] = {
    80: TargetLimits(
        name="A100 SXM (sm_80)", arch=80, sm_count=108, max_threads_per_sm=2048,
        smem_per_sm=164 * 1024, max_smem_per_block=163 * 1024,
        sm_clock_khz=1_410_000, mem_clock_khz=1_593_000, mem_bus_width=5120,
    ),
    86: TargetLimits(
        name="RTX 3090 (sm_86)", arch=86, sm_count=82, max_threads_per_sm=1536,
        max_blocks_per_sm=16, smem_per_sm=100 * 1024, max_smem_per_block=99 * 1024,
    ),
    89: TargetLimits(
        name="RTX 4090 (sm_89)", arch=89, sm_count=128, max_threads_per_sm=1536,
        max_blocks_per_sm=24, smem_per_sm=100 * 1024, max_smem_per_block=99 * 1024,
    ),
    90: TargetLimits(
        name="H100 SXM (sm_90)", arch=90, sm_count=132, max_threads_per_sm=2048,
        smem_per_sm=228 * 1024, max_smem_per_block=227 * 1024,
        sm_clock_khz=1_980_000, mem_clock_khz=2_619_000, mem_bus_width=5120,
    ),
    100: TargetLimits(
        name="B200 (sm_100)", arch=100, sm_count=148, max_threads_per_sm=2048,
        smem_per_sm=228 * 1024, max_smem_per_block=227 * 1024,
    ),
    120: TargetLimits(
        name="RTX 5090 (sm_120)", arch=120, sm_count=170, max_threads_per_sm=1536,
        max_blocks_per_sm=32, smem_per_sm=128 * 1024, max_smem_per_block=99 * 1024,
    ),
}  # fmt: skip
"""Limits per compute capability (H200 has the same SM as H100 SXM: 132 SMs, 228 KB)."""


def limits_for(arch: int) -> TargetLimits:
    """The ``TargetLimits`` of compute capability ``arch`` (a key of ``LIMITS``)."""
    try:
        return LIMITS[arch]
    except KeyError:
        raise KeyError(f"no hardware limits for sm_{arch}; known: {sorted(LIMITS)}") from None


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Resident programs (thread blocks) per SM and which resource limits them.

    ``blocks_per_sm`` is 0 when one program does not fit at all (a launch would fail);
    ``limiter`` is one of "regs", "smem", "warps", "blocks" or "does not fit: ...".
    """

    blocks_per_sm: int
    limiter: str
    by_regs: int
    by_smem: int
    by_warps: int
    warps_per_sm: int
    occupancy: float  # resident warps / max warps per SM


def occupancy(
    regs: int,
    smem_bytes: int,
    num_warps: int,
    limits: TargetLimits,
    *,
    add_reserved: bool = True,
) -> Occupancy:
    """Programs per SM from registers per thread, shared memory per block and warps per block.

    Follows the CUDA occupancy calculator: registers are allocated per warp, rounded up to
    ``reg_alloc_unit``; each block also takes ``reserved_smem_per_block`` of shared memory,
    unless ``add_reserved`` is False because ``smem_bytes`` already holds it (sm_90 cubins
    declare the reserved 1 KB as static shared memory, ``.nv.reservedSmem``).
    ``smem_bytes`` is what the kernel itself uses (Triton's dynamic + the cubin's static).
    """
    threads = num_warps * limits.warp_size
    regs_per_warp = _round_up(max(regs, 1) * limits.warp_size, limits.reg_alloc_unit)
    problems = []
    if regs > limits.max_regs_per_thread:
        problems.append(f"{regs} regs/thread > {limits.max_regs_per_thread}")
    if regs_per_warp * num_warps > limits.max_regs_per_block:
        problems.append(f"{regs_per_warp * num_warps} regs/block > {limits.max_regs_per_block}")
    reserved = limits.reserved_smem_per_block if add_reserved else 0
    if smem_bytes + reserved > limits.max_smem_per_block + limits.reserved_smem_per_block:
        problems.append(f"{smem_bytes} B smem > {limits.max_smem_per_block}")
    if threads > limits.max_threads_per_block:
        problems.append(f"{threads} threads > {limits.max_threads_per_block}")
    by_regs = (limits.regs_per_sm // regs_per_warp) // num_warps
    by_smem = limits.smem_per_sm // (smem_bytes + reserved)
    by_warps = limits.max_warps_per_sm // num_warps
    bounds = {"regs": by_regs, "smem": by_smem, "warps": by_warps}
    bounds["blocks"] = limits.max_blocks_per_sm
    limiter = min(bounds, key=lambda k: bounds[k])
    blocks = 0 if problems else bounds[limiter]
    if problems:
        limiter = "does not fit: " + "; ".join(problems)
    return Occupancy(
        blocks_per_sm=blocks,
        limiter=limiter,
        by_regs=by_regs,
        by_smem=by_smem,
        by_warps=by_warps,
        warps_per_sm=blocks * num_warps,
        occupancy=blocks * num_warps / limits.max_warps_per_sm,
    )


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit
