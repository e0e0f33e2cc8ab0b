"""Accuracy (against float64) and CPU cost of the ways to evaluate msign and the inverse root.

    python bench/accuracy.py                 # writes bench/results/accuracy.md
    python bench/accuracy.py --quick         # smaller slices, for a smoke run

Tables:
1. msign of (8, 128, 2048) slices over spectra from Gaussian to condition 1e6 and
   rank-deficient: Newton-Schulz in fp32 and bf16, the Gram form in fp32 without a restart and
   with a restart after 1, 2 or 3 steps. Error: worst relative Frobenius distance to the same
   polynomial evaluated in float64 by Newton-Schulz (spec §2.1's reference).
2. The whitened leg C^-1 msign(C^-1 D) as CM computes it (8 heads, dh 128, d 2048), partner
   Grams of condition 1e2..1e6: "ns" (explicit whitening) against "gram" (one dh x dh map).
3. The inverse root (newton: 25 cubic steps; quintic: 7 Polar Express steps; eigh): error
   ||Z A Z - I||_rms in fp32 and CPU time per batch.
Times: one thread, median of 5 after a warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import spectrum_slices as slices  # noqa: E402

from cm_triton.reference.phases import whitened_sign
from cm_triton.reference.primitives import gram, inv_sqrt, msign
from cm_triton.schedules import POLAR_EXPRESS_8

SPECTRA = ("gaussian", "cond1e2", "cond1e4", "cond1e6", "rank_half")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (
        ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-300)).max().item()
    )


def timed(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


MSIGN = {
    "ns fp32": dict(method="ns"),
    "ns bf16": dict(method="ns", dtype=torch.bfloat16),
    "gram fp32, no restart": dict(method="gram", restart=0),
    "gram fp32, restart after 1": dict(method="gram", restart=1),
    "gram fp32, restart after 2": dict(method="gram", restart=2),
    "gram fp32, restart after 3": dict(method="gram", restart=3),
    "gram fp32, restart after 4": dict(method="gram", restart=4),
}


def msign_table(b: int, m: int, n: int) -> list[str]:
    rows = [f"| method | {' | '.join(SPECTRA)} | CPU ms ({b}x{m}x{n}, fp32 input) |",
            "|---|" + "---|" * (len(SPECTRA) + 1)]  # fmt: skip
    data = {k: slices(k, b, m, n) for k in SPECTRA}
    exact = {k: msign(x, POLAR_EXPRESS_8) for k, x in data.items()}  # float64 NS
    for name, kw in MSIGN.items():
        errs = [rel(msign(data[k].float(), POLAR_EXPRESS_8, **kw), exact[k]) for k in SPECTRA]
        x32 = data["gaussian"].float()
        if kw.get("dtype") == torch.bfloat16:
            ms = "(bf16 matmuls are emulated on this CPU: not timed)"
        else:
            ms = f"{timed(lambda kw=kw, x=x32: msign(x, POLAR_EXPRESS_8, **kw)) * 1e3:.0f}"
        rows.append(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {ms} |")
    return rows


def leg_table(h: int, dh: int, d: int) -> list[str]:
    conds = (1e2, 1e4, 1e6)
    rows = [
        "| method | "
        + " | ".join(f"partner cond {c:.0e}" for c in conds)
        + f" | CPU ms ({h} heads, dh {dh}, d {d}) |",
        "|---|" + "---|" * (len(conds) + 1),
    ]
    g = torch.Generator().manual_seed(3)
    dmat = torch.randn(h, dh, d, generator=g, dtype=torch.float64)
    cases = []
    for c in conds:
        w = slices(f"cond{c:.0e}".replace("+0", ""), h, dh, d, seed=1)  # "cond1e2", ...
        root = inv_sqrt(gram(w, 1, 1e-12), "eigh")  # nearly undamped: the hard case
        cases.append(root[:, None])
    exact = [whitened_sign(dmat, r, r, POLAR_EXPRESS_8, "ns")[0] for r in cases]
    for name, kw in (
        ("ns fp32", dict(method="ns")),
        ("gram fp32, restart after 2", dict(method="gram", restart=2)),
    ):
        errs = [
            rel(whitened_sign(dmat.float(), r.float(), r.float(), POLAR_EXPRESS_8, **kw)[0], e)
            for r, e in zip(cases, exact)
        ]
        d32, r32 = dmat.float(), cases[1].float()
        ms = timed(lambda kw=kw, d=d32, r=r32: whitened_sign(d, r, r, POLAR_EXPRESS_8, **kw))
        ms *= 1e3
        rows.append(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {ms:.1f} |")
    return rows


def _spd(b: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, n, n, dtype=torch.float64, generator=g))
    w = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return (q * w.unsqueeze(-2)) @ q.mT


def inv_root_table(sizes: list[tuple[int, int]]) -> list[str]:
    conds = (1.0, 1e2, 1e4, 1e6)
    head = " | ".join(f"n={n}, cond {c:.0e}" for n, _ in sizes for c in conds)
    rows = [f"| inv_root | {head} | " + " | ".join(f"CPU ms ({b}x{n}x{n})" for n, b in sizes)
            + " |", "|---|" + "---|" * (len(sizes) * (len(conds) + 1))]  # fmt: skip
    for method in ("newton", "quintic", "eigh"):
        errs, times = [], []
        for n, b in sizes:
            for c in conds:
                a = _spd(8, n, c)
                z = inv_sqrt(a.float(), method).double()
                eye = torch.eye(n, dtype=torch.float64)
                errs.append((z @ a @ z - eye).square().mean((-2, -1)).sqrt().max().item())
            a32 = _spd(b, n, 1e3).float()
            times.append(timed(lambda a32=a32, m=method: inv_sqrt(a32, m)) * 1e3)
        rows.append(f"| {method} | " + " | ".join(f"{e:.1e}" for e in errs) + " | "
                    + " | ".join(f"{t:.1f}" for t in times) + " |")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small slices (a smoke run)")
    ap.add_argument("--out", default="bench/results/accuracy.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    b, m, n = (2, 32, 256) if args.quick else (8, 128, 2048)
    h, dh, d = (2, 32, 256) if args.quick else (8, 128, 2048)
    sizes = [(16, 8), (32, 8)] if args.quick else [(64, 64), (128, 32)]
    lines = [
        "# Accuracy of msign and the inverse root against float64",
        "",
        f"`python bench/accuracy.py{' --quick' if args.quick else ''}` on {platform.machine()}, "
        f"{platform.processor() or 'CPU'}, torch {torch.__version__}, one thread, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"## msign of {b} slices {m} x {n} (Polar Express, 8 steps)",
        "",
        "Worst relative Frobenius error against the same polynomial in float64 (Newton-Schulz).",
        "",
        *msign_table(b, m, n),
        "",
        f"## The whitened leg C^-1 msign(C^-1 D): {h} heads, dh {dh}, d {d}",
        "",
        "Partner Grams nearly undamped (lambda 1e-12) with the given condition: the hard case.",
        "",
        *leg_table(h, dh, d),
        "",
        "## Inverse square root, fp32",
        "",
        "||Z A Z - I||_rms (worst of 8 matrices); spec §2 asks <= 1e-4 up to condition 1e4.",
        "",
        *inv_root_table(sizes),
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
