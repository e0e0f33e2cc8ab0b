"""Compile every kernel configuration a step can launch, for the GPUs people train on, without a
GPU, and report what the cubins cost on chip.

    TRITON_INTERPRET= python bench/compile_report.py                      # all targets, blocks
    TRITON_INTERPRET= python bench/compile_report.py --targets 80 86 --blocks 64 128 --cover

The configurations are the launches themselves. Steps run with *dry* kernels: each of the four
Triton kernels is replaced by a recorder that keeps the launch's arguments (a tensor as its
dtype and 16-byte alignment, every number, the constexprs and warps) and runs nothing, and each
phase then returns the reference's result, so the step goes on exactly as it would. The steps:
``cm_qk``/``cm_ov`` over every variant flag combination (QK on MHA and GQA, OV on GQA; or, with
``--cover``, a covering subset, ``COVER``, that ``tests/test_compile_gate.py`` proves launches
everything the whole product launches), joint's groups of (G+1) dh rows past one block, the
Muon legs of real widths (row-tiled), whole optimizer steps on a Llama-shaped model (layers read
in place, aligned and not), in fp32 and bf16, for every head size's block (16, 32, 64, 128:
heads up to 128; larger heads use the reference). Each distinct configuration is then compiled
for each target through ``cm_triton.aot`` (the same launch, CPU stand-in tensors of the same
dtypes and alignment) and its registers, spills and shared memory read from the cubin.
Writes ``bench/results/compile_report.md`` (and ``.json``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import helpers  # noqa: E402 - the flag axes the tests use

from cm_triton import CompositionalMuon, cm_ov, cm_qk, dispatch, param_groups  # noqa: E402
from cm_triton.aot import aot_compile, limits_for  # noqa: E402
from cm_triton.reference.phases import REFERENCE_PHASES  # noqa: E402

TARGETS = (80, 86, 89, 90, 100, 120)
BLOCKS = (16, 32, 64, 128)
MAX_COMPILE_S = 60.0
KERNELS = {"_gram_kernel": "streaming", "_map_kernel": "streaming",
           "_maps_kernel": "algebra", "_inv_sqrt_kernel": "algebra"}  # fmt: skip
# A subset of the flag product that launches every configuration the whole product launches
# (tests/test_compile_gate.py checks it): what changes a launch is nesterov, whether a root
# whitens (whitening, isotropic), a connection or the reprojection (cross Grams, maps on W),
# joint's group rows, the explicit routes (hybrid O, "ns"), and renorm's step tensor.
COVER = [
    {}, {"nesterov": True}, {"whitening": "none"}, {"whitening": "pre"}, {"whitening": "post"},
    {"isotropic": True}, {"per_mat_renorm": True}, {"connection": "frobenius"},
    {"momentum_reproject": True}, {"momentum_reproject": True, "nesterov": True},
    {"connection": "frobenius", "momentum_reproject": True, "nesterov": True},
    {"method": "joint"}, {"method": "joint", "whitening": "none"},
    {"method": "joint", "connection": "frobenius", "momentum_reproject": True},
    {"method": "joint", "per_mat_renorm": True, "nesterov": True}, {"ns_method": "ns"},
    {"ns_method": "ns", "whitening": "none", "nesterov": True},
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Tensor_:
    """A tensor argument as Triton specialises on it: its dtype and 16-byte alignment."""

    dtype: torch.dtype
    aligned: bool


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict

    def klass(self) -> tuple:
        """The launch's class: kernel, constexprs and warps, pointer dtypes and alignment;
        its variants differ only in which sizes are 1 or multiples of 16."""
        ptrs = tuple(a for a in self.args if isinstance(a, Tensor_))
        return (self.kernel, tuple(sorted(self.kwargs.items())), ptrs)

    def key(self) -> tuple:
        """The compiled configuration: what Triton specialises on (a tensor's dtype and
        alignment; an int's being 1, a multiple of 16, or past int32) and the constexprs."""

        def one(v):
            if isinstance(v, bool) or v is None:
                return v
            if isinstance(v, int):
                return ("i", v == 1, v % 16 == 0, abs(v) >= 2**31)
            if isinstance(v, float):
                return "f"
            return v

        return (self.kernel, tuple(one(a) for a in self.args),
                tuple(sorted(self.kwargs.items())))  # fmt: skip

    def config(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k.isupper()}


def _describe(v):
    if isinstance(v, torch.Tensor):
        return Tensor_(v.dtype, v.data_ptr() % 16 == 0)
    return v


@contextlib.contextmanager
def dry_kernels(record: bool = True, classes: bool = False) -> Iterator[list[Launch]]:
    """Within it, each phase that a kernel takes launches the kernel and returns the
    reference's result (the step goes on as it would). ``record``: the four kernels are
    recorders that keep each launch's arguments and run nothing; otherwise the launches go to
    Triton as they are (under ``cm_triton.aot.aot_compile``: compiled for its target, each with
    the tiles that target's family takes, ``kernels.common.tuning``); ``classes``: only the
    first launch of each class (``Launch.klass``) goes to Triton."""
    from cm_triton import kernels as k

    log: list[Launch] = []
    saved = []
    seen: set = set()

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                entry = Launch(self.name, tuple(grid), tuple(_describe(a) for a in args),
                               dict(kwargs))  # fmt: skip
                if record:
                    log.append(entry)
                elif not classes or entry.klass() not in seen:
                    seen.add(entry.klass())
                    self.fn[grid](*args, **kwargs)

            return launch

    for name, mod in KERNELS.items() if record or classes else ():
        module = importlib.import_module(f"cm_triton.kernels.{mod}")
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, Recorder(name, getattr(module, name)))

    def dry(name):
        kernel, reference = getattr(k.KERNEL_PHASES, name), getattr(REFERENCE_PHASES, name)

        def run(*args, **kwargs):
            kernel(*args, **kwargs)  # the launches: recorded, or compiled
            return reference(*args, **kwargs)

        run.__name__ = name
        return run

    names = [f.name for f in dataclasses.fields(k.KERNEL_PHASES) if f.name != "bytes_bound"]
    ops = dataclasses.replace(k.KERNEL_PHASES, **{n: dry(n) for n in names})
    prims = dispatch.build_primitives(ops)
    real_prims, real_interp = dispatch._triton_primitives, dispatch.interpreting
    dispatch._triton_primitives = lambda guarded=False: prims
    dispatch.interpreting = lambda: True  # backend="triton" on CPU tensors: nothing runs
    try:
        with torch.no_grad():
            yield log
    finally:
        dispatch._triton_primitives, dispatch.interpreting = real_prims, real_interp
        for module, name, fn in saved:
            setattr(module, name, fn)


def _pair_tensors(hq, hkv, dh, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return [r(hq * dh, d), r(hkv * dh, d), r(hq * dh, d), r(hkv * dh, d), r(hq * dh, d),
            r(hkv * dh, d)]  # fmt: skip


def flag_product() -> list[dict]:
    """Every combination of the variant flags (``tests/helpers.flag_product``)."""
    return list(helpers.flag_product())


def functional_steps(dh: int, dtype: torch.dtype, flag_sets: list[dict]) -> None:
    """cm_qk on MHA (2, 2) and GQA (4, 2), cm_ov on GQA (hybrid and not), each flag set, at a
    width the Gram route takes (4 dh) and one it does not (dh: the explicit routes); widths
    multiples of 16, as real models' are (Triton specialises on an int's divisibility by 16:
    odd widths compile variants of their own, as a test's shapes do)."""
    for flags in flag_sets:
        for fn, heads in ((cm_qk, (2, 2)), (cm_qk, (4, 2)), (cm_ov, (4, 2))):
            for d in (4 * dh, dh):
                for hybrid in (None,) if fn is cm_qk else (True, False):
                    kw = {**flags, "backend": "triton", "inv_root": "quintic"}
                    if hybrid is not None:
                        kw["hybrid"] = hybrid
                    p, s, gp, gs, mp, ms = _pair_tensors(*heads, dh, d, dtype)
                    if fn is cm_ov:  # v_w: the KV heads' rows; o_w: the query heads' columns
                        args = (s, p.T.contiguous(), gs, gp.T.contiguous(), ms, mp.T.contiguous())
                    else:
                        args = (p, s, gp, gs, mp, ms)
                    fn(*args, head_dim=dh, eta=0.1, **kw)


def joint_groups(dh: int, dtype: torch.dtype) -> None:
    """Joint's groups of (G+1) dh rows, past one block at G >= 1 for dh 128 (and G >= 3 at
    64): one KV head with G query heads, wide enough for the Gram route."""
    for g in (1, 3, 7):
        d = 2 * (g + 1) * dh
        q, k, gq, gk, mq, mk = _pair_tensors(g, 1, dh, d, dtype)
        for flags in ({}, {"connection": "frobenius", "momentum_reproject": True}):
            cm_qk(q, k, gq, gk, mq, mk, head_dim=dh, eta=0.1, method="joint", backend="triton",
                  **flags)  # fmt: skip


def optimizer_steps(dtype: torch.dtype, width: int, dh: int, hidden: int) -> None:
    """Whole steps (the layers read in place; the MLP's Muon legs of ``width`` rows, row-tiled
    past 128), with nonfinite "raise" and "skip"; then a model whose layers sit at odd offsets
    (not 16-byte aligned)."""
    from cm_triton.check import LlamaShaped

    hq = width // dh
    for nonfinite, nesterov in (("raise", False), ("skip", True)):
        torch.manual_seed(0)
        model = LlamaShaped(2, width, hq, max(1, hq // 2), hidden).to(dtype)
        opt = CompositionalMuon(param_groups(model, nesterov=nesterov), lr=0.02,
                                backend="triton", nonfinite=nonfinite)  # fmt: skip
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-2
            opt.step()
    # Unaligned layers: two q/k/v/o sets carved from one flat buffer at an odd offset
    torch.manual_seed(0)
    model = LlamaShaped(2, width, hq, max(1, hq // 2), hidden).to(dtype)
    flat = torch.empty(sum(p.numel() for p in model.parameters()) + 3, dtype=dtype)
    off = 1
    for p in model.parameters():
        p.data = flat[off : off + p.numel()].view_as(p).copy_(p.data)
        off += p.numel()
    opt = CompositionalMuon(param_groups(model), lr=0.02, backend="triton")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()


def run_suite(blocks: tuple[int, ...], cover: bool, log: list[Launch] | None = None) -> dict:
    """The step suite (module doc); with a recorder's ``log``, the distinct launches, first
    occurrence of each, by configuration key."""
    flag_sets = COVER if cover else [*flag_product(), *COVER]
    seen: dict[tuple, Launch] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for dh in blocks:
            functional_steps(dh, dtype, flag_sets)
            joint_groups(dh, dtype)
        # Muon's row-tiled legs (short side 256 and 1024; the short side sets the tiling) and
        # whole steps with layers read in place
        optimizer_steps(dtype, width=256, dh=min(blocks[-1], 64), hidden=688)
        if not cover or max(blocks) >= 128:
            optimizer_steps(dtype, width=1024, dh=128, hidden=2816)
        for launch in log or ():
            seen.setdefault(launch.key(), launch)
        if log is not None:
            log.clear()
    return seen


def record(blocks: tuple[int, ...], cover: bool) -> list[Launch]:
    """Every distinct launch of the step suite, recorded (nothing compiled or run)."""
    with dry_kernels(record=True) as log:
        return list(run_suite(blocks, cover, log).values())


def compile_all(blocks: tuple[int, ...], cover: bool, targets: tuple[int, ...],
                timeout_s: float, classes: bool = False) -> list:  # fmt: skip
    """The step suite under ``aot_compile`` for each target: each distinct launch compiled
    (``classes``: one of each class)."""
    records = []
    for arch in targets:
        with (aot_compile(target=("cuda", arch), timeout_s=timeout_s) as recs,
              dry_kernels(False, classes)):  # fmt: skip
            run_suite(blocks, cover)
        records += [r for r in recs if not r.get("cached")]
    return records


def selftest(arch: int) -> int:
    """The gate can fail: a register-hungry toy kernel must be flagged, a trivial one not, and
    one with a program offset in int32 flagged."""
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


def problems(rec: dict) -> list[str]:
    """Why a record fails the gate: a spill, shared memory over the block limit, a program
    offset in int32, a slow or failed compile."""
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


FLAG_COLUMNS = ("NESTEROV", "MODE", "HAS_ROOT", "HAS_TW", "HAS_W", "HAS_X2", "WRITE_M",
                "STEP_PTR", "SAME", "ONE_BLOCK", "ALIGNED")  # fmt: skip


def _row(r: dict) -> str:
    c = r["constexprs"]
    block = c.get("BLOCK_R")
    flags = ",".join(f"{k}={v}" for k, v in sorted(c.items()) if k in FLAG_COLUMNS)
    dtypes = "/".join(sorted({s for s in r.get("signature", {}).values()
                              if isinstance(s, str) and s.startswith("*")}))  # fmt: skip
    return (f"| {r['kernel']} | {block} | {flags} | {dtypes} | {r['target']} | {r['num_warps']} "
            f"| {r.get('regs', '-')} | {r.get('stack_bytes', '-')} | {r.get('smem_bytes', '-')} | "
            f"{r.get('blocks_per_sm', '-')} | {r.get('compile_s', 0):.1f} | "
            f"{', '.join(problems(r)) or 'ok'} |")  # fmt: skip


def summary(records: list[dict]) -> list[str]:
    """Per target: configurations, failing ones, worst stack."""
    lines = ["| target | configurations | fail the gate | worst stack B | most regs |",
             "|---|---|---|---|---|"]  # fmt: skip
    for target in sorted({r["target"] for r in records}, key=lambda t: int(t[3:])):
        rs = [r for r in records if r["target"] == target]
        bad = [r for r in rs if problems(r)]
        stack = max((r.get("stack_bytes") or 0) for r in rs)
        regs = max((r.get("regs") or 0) for r in rs)
        lines.append(f"| {target} | {len(rs)} | {len(bad)} | {stack} | {regs} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    ap.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS))
    ap.add_argument("--cover", action="store_true", help="the covering flag subset (COVER)")
    ap.add_argument("--classes", action="store_true",
                    help="one launch of each class (its size variants not compiled)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default="bench/results/compile_report")
    ap.add_argument("--selftest", action="store_true", help="check that the gate can fail")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if args.selftest:
        return max(selftest(arch) for arch in args.targets)
    import triton

    t0 = time.time()
    records = compile_all(tuple(args.blocks), args.cover, tuple(args.targets), args.timeout,
                          args.classes)  # fmt: skip
    bad = [r for r in records if problems(r)]
    command = "TRITON_INTERPRET= python bench/compile_report.py" + (
        " " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:]))  # fmt: skip
    head = ("| kernel | block | flags | pointer types | target | warps | regs | stack B | "
            "smem B | programs/SM | compile s | gate |")  # fmt: skip
    lines = [
        "# Compile report: every kernel configuration a step launches",
        "",
        f"`{command.strip()}`, {time.strftime('%Y-%m-%d')}, triton {triton.__version__}, "
        f"no GPU (ahead-of-time, cm_triton.aot): the steps ({'covering' if args.cover else 'every'}"
        f" flag set, blocks {args.blocks}, fp32 and bf16) run with dry kernels under each "
        f"target, {len(records)} distinct launches compiled in {time.time() - t0:.0f} s on this "
        f"2-core machine.",
        "Gate: no spill, shared memory within the target's per-block limit, no int32 offset "
        f"made from a program id, compile under {MAX_COMPILE_S:.0f} s.",
        "",
        *summary(records),
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
        *(_row(r) for r in records),
        "",
        f"**{len(bad)} of {len(records)} configurations fail the gate.**",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines))
    keep = ("kernel", "target", "constexprs", "num_warps", "regs", "stack_bytes", "smem_bytes",
            "blocks_per_sm", "compile_s", "status", "dots")  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps([{k: r.get(k) for k in keep} for r in records],
                                                   indent=1, default=str))  # fmt: skip
    print(
        "\n".join(lines[:12] + [f"**{len(bad)} of {len(records)} configurations fail the gate.**"])
    )
    for r in bad:
        print(_row(r))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
