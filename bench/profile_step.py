"""Where a CPU CM step goes: the step's components timed one by one, and torch.profiler's
operator table of whole steps (the profile behind ``bench/results/cpu_step.md``).

    python bench/profile_step.py                 # the three CPU shapes of test_bench_step.py
    python bench/profile_step.py --shape 8 64 512 --ops

Components (MHA, one attention layer, reference backend, default options):
the QK signs (Q and K heads in one batched call), the V head signs, the hybrid sign of the
whole ``o_w`` (``d x H*dh``), and the two pairs' partner roots (each pair's two roots in one
batched coupled Newton iteration). Medians of ``--repeat`` calls, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_step import CPU_SHAPES, _cm_runner, _muon_runner  # noqa: E402

from cm_triton.reference import msign, partner_roots  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def components(h: int, dh: int, d: int, repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    heads = [torch.randn(h, dh, d, generator=g) for _ in range(4)]  # Q, K, V, O^T blocks
    o_whole = torch.randn(1, d, h * dh, generator=g)
    row = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for name, x in (("QK signs", torch.cat(heads[:2])), ("V signs", heads[2]),
                        ("whole-o sign", o_whole)):  # fmt: skip
            row[f"{name} {label}"] = median_ms(partial(msign, x, dtype=dtype), repeat)
    row["partner roots (2 pairs)"] = 2 * median_ms(
        lambda: partner_roots(heads[0], heads[1], 1e-2, "newton", heads[0], heads[1]), repeat
    )
    row["CM step"] = median_ms(_cm_runner(h, dh, d, "cpu", torch.float32, "reference"), repeat)
    row["torch.optim.Muon step"] = median_ms(_muon_runner(h, dh, d, "cpu", torch.float32), repeat)
    return row


def op_table(h: int, dh: int, d: int, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile

    step = _cm_runner(h, dh, d, "cpu", torch.float32, "reference")
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=3, metavar=("H", "DH", "D"), default=None)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--ops", action="store_true", help="also print torch.profiler's op table")
    args = p.parse_args(argv)
    shapes = [tuple(args.shape)] if args.shape else CPU_SHAPES
    rows = {shape: components(*shape, args.repeat) for shape in shapes}
    names = list(next(iter(rows.values())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians in ms\n")
    print("| component | " + " | ".join(str(s) for s in shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{rows[s][name]:.2f}" for s in shapes) + " |")
    if args.ops:
        for shape in shapes:
            print(f"\n{shape}: torch.profiler, 5 CM steps\n{op_table(*shape)}")


if __name__ == "__main__":
    main()
