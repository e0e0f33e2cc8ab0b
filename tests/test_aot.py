"""``cm_triton.aot``, the ahead-of-time compile harness: its parsers and occupancy arithmetic.

The compile itself is exercised by ``tests/test_compile_gate.py`` (a subprocess: this process
runs under ``TRITON_INTERPRET=1``, where Triton compiles nothing). Every expected number here
is worked by hand from the CUDA occupancy rules in the comments.
"""

from __future__ import annotations

import pytest
from helpers import needs

pytestmark = needs("triton")


@pytest.fixture(scope="module")
def aot():
    from cm_triton import aot as harness

    return harness


def test_res_usage_reads_each_function_and_ignores_banners(aot):
    text = """
Fatbin elf code:
================
arch = sm_90
Resource usage:
 Common:
  GLOBAL:0
 Function _gram_kernel:
  REG:128 STACK:0 SHARED:16384 LOCAL:0 CONSTANT[0]:544 TEXTURE:0
 Function _map_kernel: REG:255 STACK:72 SHARED:0 LOCAL:72
"""
    got = aot.parse_res_usage(text)
    assert set(got) == {"_gram_kernel", "_map_kernel"}
    assert (got["_gram_kernel"].regs, got["_gram_kernel"].stack) == (128, 0)
    assert got["_gram_kernel"].shared == 16384
    assert (got["_map_kernel"].regs, got["_map_kernel"].stack, got["_map_kernel"].local) == (
        255, 72, 72)  # fmt: skip


def test_ptxas_log_reads_spills_and_registers(aot):
    text = (
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads\n"
        "ptxas info    : Used 128 registers, 380 bytes cmem[0]\n"
    )
    assert aot.parse_ptxas_log(text) == {
        "k": {"stack_frame": 24, "spill_stores": 24, "spill_loads": 24, "regs": 128}
    }


def test_occupancy_follows_the_calculator(aot):
    h100 = aot.limits_for(90)
    # 128 regs x 32 threads = 4096 per warp (a multiple of 256); 8 warps: 32768 per block, so
    # 65536 // 4096 // 8 = 2 blocks by registers; smem 16 KB + 1 KB reserved: 228 // 17 = 13;
    # warps: 64 // 8 = 8. Registers limit: 2.
    occ = aot.occupancy(128, 16 * 1024, 8, h100)
    assert (occ.blocks_per_sm, occ.limiter) == (2, "regs")
    # 40 regs -> 1280 per warp, rounded to 1280 (5 x 256); 4 warps: 65536 // 1280 // 4 = 12;
    # smem 100 KB + 1: 228 // 101 = 2 blocks: shared memory limits.
    occ = aot.occupancy(40, 100 * 1024, 4, h100)
    assert (occ.blocks_per_sm, occ.limiter) == (2, "smem")
    over = aot.occupancy(64, 300 * 1024, 4, h100)  # past the 227 KB opt-in maximum
    assert over.blocks_per_sm == 0 and "smem" in over.limiter


# TTIR as Triton 3.6 prints it (excerpts of _gram_kernel before and after the int64 change).
NARROW_TTIR = """
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %bh = arith.divsi %pid, %C : i32 loc(#loc2)
    %h = arith.remsi %bh, %H : i32 loc(#loc3)
    %v1 = arith.muli %h, %s1h : i32 loc(#loc4)
    %v1_36 = tt.addptr %x1_6, %v1 : !tt.ptr<f32>, i32 loc(#loc5)
    %c64_i32 = arith.constant 64 : i32 loc(#loc6)
    %sc = tt.addptr %scratch, %c64_i32 : !tt.ptr<f32>, i32 loc(#loc7)
    %k = arith.muli %arg3, %c64_i32 : i32 loc(#loc8)
    %coef = tt.addptr %coef_ptr, %k : !tt.ptr<f32>, i32 loc(#loc9)
    %rows = tt.splat %pid : i32 -> tensor<64xi32> loc(#loc10)
    %tile = tt.addptr %ptrs, %rows : tensor<64x!tt.ptr<f32>>, tensor<64xi32> loc(#loc11)
    scf.for %n0 = %start to %stop step %c32_i32  : i32 {
      %o = arith.muli %n0, %sn : i32 loc(#loc12)
      %p = tt.addptr %x0, %o : !tt.ptr<f32>, i32 loc(#loc13)
    } loc(#loc14)
    %start = arith.muli %pid, %CHUNK : i32 loc(#loc15)
"""
WIDE_TTIR = """
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %bh = arith.divsi %pid, %C : i32 loc(#loc2)
    %bh_1 = arith.extsi %bh : i32 to i64 loc(#loc3)
    %h = arith.remsi %bh_1, %H : i64 loc(#loc4)
    %v1 = arith.muli %h, %s1h_2 : i64 loc(#loc5)
    %v1_36 = tt.addptr %x1_6, %v1 : !tt.ptr<f32>, i64 loc(#loc6)
"""


def test_narrow_program_offsets_finds_int32_offsets_made_from_program_ids(aot):
    # Flagged: a head's offset h * stride in int32 (h from the program id), and a loop's
    # scalar offset whose start is program-derived; not flagged: a constant offset, an offset
    # made from arguments and loop counters only (a coefficient index), a tile (tensor).
    got = aot.narrow_program_offsets(NARROW_TTIR)
    assert [line.split(" = ")[0] for line in got] == ["%v1_36", "%p"], got
    assert aot.narrow_program_offsets(WIDE_TTIR) == []
