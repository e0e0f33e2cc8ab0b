"""Compile every kernel configuration cm_triton can launch, for sm_90 (H100/H200) and sm_80
(A100), without a GPU, and report what the cubins cost on chip.

    TRITON_INTERPRET= python bench/compile_report.py                 # all, both targets
    TRITON_INTERPRET= python bench/compile_report.py --blocks 64 128 --targets 90

The launches come from the package's own wrappers (``cm_triton.kernels.phases``) called on
CPU tensors of the layouts the optimizer passes (q/k/v row blocks, transposed o column
blocks), under ``cm_triton.aot``, which compiles each launch for the target instead of running
it and reads registers, spills and shared memory from the cubin (``cuobjdump -res-usage``,
``ptxas -v``). Head sizes map to a power-of-two block (16, 32, 64, 128: every dh the kernels
accept; larger heads use the reference), so these blocks cover every head size up to 256.
Writes ``bench/results/compile_report.md`` (and ``.json``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from cm_triton.aot import aot_compile, limits_for  # noqa: E402
from cm_triton.kernels import phases as K  # noqa: E402
from cm_triton.schedules import POLAR_EXPRESS_8  # noqa: E402

BLOCKS = (16, 32, 64, 128)
MAX_COMPILE_S = 60.0


def selftest(arch: int) -> int:
    """The gate can fail: a register-hungry toy kernel must be flagged, a trivial one not."""
    import triton
    import triton.language as tl

    @triton.jit
    def _hungry(x_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr):
        r = tl.arange(0, R)[:, None]
        c = tl.arange(0, C)[None, :]
        x = tl.exp(tl.load(x_ptr + r * C + c))  # an R x C tile live across two reductions
        tl.store(out_ptr + r * C + c, x / tl.sum(x, axis=1)[:, None] - tl.max(x, axis=0)[None, :])

    @triton.jit
    def _trivial(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    @triton.jit
    def _narrow(x_ptr, out_ptr, stride, BLOCK: tl.constexpr):  # a row offset in int32
        row = x_ptr + tl.program_id(0) * stride
        tl.store(out_ptr + tl.arange(0, BLOCK), tl.load(row + tl.arange(0, BLOCK)))

    x = torch.zeros(128 * 128)
    with aot_compile(target=("cuda", arch), timeout_s=120) as recs:
        _hungry[(1,)](x, x, R=128, C=128, num_warps=1)
        _trivial[(4,)](x, x, 1024, BLOCK=256)
        _narrow[(4,)](x, x, 1024, BLOCK=256)
    flagged = [bool(problems(r)) for r in recs]
    print(
        f"selftest sm_{arch}: hungry flagged={flagged[0]} ({problems(recs[0])}), "
        f"trivial flagged={flagged[1]}, narrow flagged={flagged[2]} ({problems(recs[2])})"
    )
    return 0 if flagged == [True, False, True] else 1


def _heads(layout: str, dh: int, b: int = 2, h: int = 8, n: int = 1024) -> torch.Tensor:
    """``(B, H, dh, n)`` heads as the engine passes them (fp32 compute copies or views)."""
    if layout == "rows":  # q/k/v: row blocks of a stacked (B, H*dh, n) weight
        return torch.zeros(b, h * dh, n).unflatten(1, (h, dh))
    # o: column blocks of a stacked (B, n, H*dh) weight, transposed (strided, never copied)
    return torch.zeros(b, n, h * dh).unflatten(2, (h, dh)).permute(0, 2, 3, 1)


def launch_everything(blocks: tuple[int, ...]) -> None:
    """Every distinct launch of the phase kernels for these blocks: each configuration the
    pipeline (``reference/pipeline.py``) can launch, for every flag combination."""
    for block in blocks:
        dh = block
        for layout in ("rows", "cols"):
            for nesterov in (False, True):
                w = _heads(layout, dh)
                t = torch.zeros(*w.shape[:2], dh, dh)
                step = torch.full((w.shape[0],), 0.01)  # the engine's: eta per batch entry
                K.stream_grams(w, w, w, 0.95, nesterov, ("ww", "dd", "wd", "wm"))
                K.restart_gram(t, w, w, 0.95, nesterov)
                K.restart_gram(t, w, w, 0.95, nesterov, w=w, t_w=t)  # reprojection
                K.apply_update(w, t, w, w, 0.95, nesterov, 1.0, step)
                K.apply_update(w, t, w, w, 0.95, nesterov, 1.0, step, t_w=t)  # connections
                K.apply_update(w, t, w, w, 0.95, nesterov, 0.0, -1.0)  # an explicit sign's X
                K.apply_update(w, t, w, w, 0.95, nesterov, 0.0, -1.0, t_w=t)
                K.apply_update(w, None, w, w, 0.0, False, 1.0, step)  # hybrid O: decay W - step U
            u = torch.zeros(*w.shape)  # an explicit sign's U (contiguous)
            K.cross_grams(w, u)
        s = torch.zeros(2, 8, dh, dh)
        for root in (None, s):
            K.first_maps(s, root, POLAR_EXPRESS_8[:3])
            K.last_maps(s, s, root, POLAR_EXPRESS_8[3:])
        K.inv_sqrt(s, "quintic")


def problems(rec: dict) -> list[str]:
    """Why a record fails the gate: a spill, shared memory over the block limit, a slow or
    failed compile."""
    out = []
    if rec["status"] != "ok":
        return [f"compile {rec['status']}"]
    if rec.get("spills") or rec.get("stack_bytes", 0) > 0:
        out.append(f"spills ({rec.get('stack_bytes')} B stack)")
    if rec.get("narrow_offsets"):  # a program-derived pointer offset in int32: wraps at 2^31
        out.append(f"{len(rec['narrow_offsets'])} int32 program offsets")
    limit = limits_for(rec["arch"]).max_smem_per_block
    if rec.get("smem_bytes", 0) > limit:
        out.append(f"shared memory {rec['smem_bytes']} B > {limit} B")
    if rec.get("compile_s", 0.0) > MAX_COMPILE_S:
        out.append(f"compile {rec['compile_s']:.0f} s > {MAX_COMPILE_S:.0f} s")
    return out


def compile_all(targets: tuple[int, ...], blocks: tuple[int, ...], timeout_s: float) -> list:
    records = []
    for arch in targets:
        with aot_compile(target=("cuda", arch), timeout_s=timeout_s) as recs:
            launch_everything(blocks)
        records += [r for r in recs if not r.get("cached")]
    return records


FLAG_COLUMNS = ("NESTEROV", "MODE", "HAS_ROOT", "HAS_TW", "HAS_W", "HAS_X2", "WRITE_M",
                "STEP_PTR")  # fmt: skip


def _row(r: dict) -> str:
    c = r["constexprs"]
    block = c.get("BLOCK_R")
    flags = ",".join(f"{k}={v}" for k, v in sorted(c.items()) if k in FLAG_COLUMNS)
    strides = "/".join(str(i) for i in r.get("divisible_by_16", []))[:24]
    return (f"| {r['kernel']} | {block} | {flags} | {strides} | {r['target']} | {r['num_warps']} "
            f"| {r.get('regs', '-')} | {r.get('stack_bytes', '-')} | {r.get('smem_bytes', '-')} | "
            f"{r.get('programs', '-')} | {r.get('blocks_per_sm', '-')} | "
            f"{r.get('compile_s', 0):.1f} | {', '.join(problems(r)) or 'ok'} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS))
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default="bench/results/compile_report")
    ap.add_argument("--selftest", action="store_true", help="check that the gate can fail")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if args.selftest:
        return max(selftest(arch) for arch in args.targets)
    t0 = time.time()
    records = compile_all(tuple(args.targets), tuple(args.blocks), args.timeout)
    bad = [r for r in records if problems(r)]
    head = ("| kernel | block (dh) | flags | 16-aligned args | target | warps | regs | stack B | "
            "smem B | programs (example) | programs/SM | compile s | gate |")  # fmt: skip
    lines = [
        "# Compile report: every kernel configuration, sm_90 and sm_80",
        "",
        f"`TRITON_INTERPRET= python bench/compile_report.py`, {time.strftime('%Y-%m-%d')}, "
        f"triton {__import__('triton').__version__}, no GPU (ahead-of-time, cm_triton.aot); "
        f"{len(records)} compiles in {time.time() - t0:.0f} s on this 2-core machine.",
        "Gate (the CI test): no spill, shared memory within the target's per-block limit, "
        f"compile under {MAX_COMPILE_S:.0f} s. Programs: for an example launch of 2 x 8 heads "
        "of width 1024; programs/SM: resident blocks per SM by registers, shared memory, warps.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
        *(_row(r) for r in records),
        "",
        f"**{len(bad)} of {len(records)} configurations fail the gate.**",
        "",
    ]
    Path(args.out + ".md").write_text("\n".join(lines))
    keep = ("kernel", "target", "constexprs", "num_warps", "regs", "stack_bytes", "smem_bytes",
            "blocks_per_sm", "compile_s", "status", "dots")  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps([{k: r.get(k) for k in keep} for r in records],
                                                   indent=1, default=str))  # fmt: skip
    print("\n".join(lines))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
