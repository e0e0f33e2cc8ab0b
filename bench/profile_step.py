"""Where a CPU CM step goes: the step's components timed one by one, and torch.profiler's
operator table of whole steps (the profile behind ``bench/results/cpu_step.md``).

    python bench/profile_step.py                 # the three CPU shapes of test_bench_step.py
    python bench/profile_step.py --shape 8 64 512 --ops

Components (MHA, one attention layer, reference backend, fp32): a per-head leg of q/k/v heads
in Gram form (one dh x dh map) and as Newton-Schulz iterations; the hybrid sign of the whole
``o_w`` (``d x H*dh``, iterations); the two pairs' partner roots by eigh (the CPU default),
the quintic and the release's Newton schedule; then whole steps: CM by default, CM with the
release's evaluation, and Muon (fp32). Medians of ``--repeat`` calls, in ms.
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
from test_bench_step import LAYER_SHAPES, RELEASE, _cm_layer, _muon_layer  # noqa: E402

from cm_triton.reference import msign, partner_roots  # noqa: E402
from cm_triton.reference.phases import whitened_sign  # noqa: E402
from cm_triton.schedules import POLAR_EXPRESS_8  # noqa: E402


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
    heads = [torch.randn(1, h, dh, d, generator=g) / d**0.5 for _ in range(4)]  # Q K V O^T
    o_whole = torch.randn(1, h * dh, d, generator=g)
    d3 = heads[0][0]
    root = partner_roots(heads[0], heads[1], 1e-2, "eigh")[0][0][:, None]
    row = {}
    for how in ("gram", "ns"):
        row[f"q heads, {how}"] = median_ms(
            partial(whitened_sign, d3, root, root, POLAR_EXPRESS_8, how, 3), repeat
        )
    row["whole-o sign (ns)"] = median_ms(partial(msign, o_whole), repeat)
    for method in ("eigh", "quintic", "newton"):
        row[f"roots of 2 pairs, {method}"] = 2 * median_ms(
            partial(partner_roots, heads[0], heads[1], 1e-2, method), repeat
        )
    row["CM step"] = median_ms(_cm_layer(h, dh, d, "cpu", torch.float32), repeat)
    row["CM step, release"] = median_ms(
        _cm_layer(h, dh, d, "cpu", torch.float32, **RELEASE), repeat
    )
    row["Muon step (fp32)"] = median_ms(
        _muon_layer(h, dh, d, "cpu", torch.float32, torch_muon=False), repeat
    )
    return row


def op_table(h: int, dh: int, d: int, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity, profile

    step = _cm_layer(h, dh, d, "cpu", torch.float32)
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
    shapes = [tuple(args.shape)] if args.shape else LAYER_SHAPES[:2]
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
