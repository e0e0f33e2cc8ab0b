"""Accuracy of every flag's route through the pipeline, fp32, against float64.

    python bench/accuracy_flags.py           # writes bench/results/accuracy_flags.md

For each combination of method x connection x momentum_reproject x per_mat_renorm x hybrid
(whitening "both", isotropic off: the flags that change what the Gram route computes), one
step of a GQA pair (2 layers, Hq 4, Hkv 2, dh 16, width 256: joint's 48-row groups are
Gram-routed too) whose gradients have a prescribed singular spectrum per head (Gaussian,
condition 1e2 .. 1e6, rank-deficient). Error: the worst relative Frobenius distance of the
weight step (both factors, every layer) to the same step in float64 with every sign iterated
on the matrix (``ns_method="ns"``, eigh roots): the literal rule's arithmetic. Columns: the
fp32 Gram route (the CPU and CUDA default, restart after 3 steps) and, for scale, fp32
Newton-Schulz iterations on the matrix, both with fp32 eigh roots (the default quintic root
adds about 2e-6 here, the same for every route). Momentum zero: the direction is the
gradient, with the prescribed spectrum.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import spectrum_slices  # noqa: E402

from cm_triton.options import CMOptions
from cm_triton.reference.pipeline import pair_step

SPECTRA = ("gaussian", "cond1e2", "cond1e4", "cond1e6", "rank_half")
AXES = {
    "method": ("half_split", "joint"),
    "connection": ("none", "frobenius", "frobenius_scalar", "scale_aware", "scale_aware_scalar"),
    "momentum_reproject": (False, True),
    "per_mat_renorm": (False, True),
    "hybrid": (False, True),
}


def _pair(spectrum: str, b=2, hq=4, hkv=2, dh=16, d=256, seed=0):
    """float64 ``(p, s, gp, gs, mp, ms)``: Gaussian weights and momenta, gradients with the
    spectrum per head (``(B, H, dh, d)`` each)."""
    g = torch.Generator().manual_seed(seed)

    def r(h):
        return torch.randn(b, h, dh, d, generator=g, dtype=torch.float64)

    def spec(h, s):
        return spectrum_slices(spectrum, b * h, dh, d, seed=s).view(b, h, dh, d)

    zeros = (
        torch.zeros(b, hq, dh, d, dtype=torch.float64),
        torch.zeros(b, hkv, dh, d, dtype=torch.float64),
    )
    # zero momentum: the direction is the gradient, so its spectrum is the one prescribed
    return r(hq), r(hkv), spec(hq, seed + 1), spec(hkv, seed + 2), *zeros


def step_error(flags: dict, spectrum: str, ns_method: str) -> float:
    hybrid = flags["hybrid"]
    opts = {k: v for k, v in flags.items() if k != "hybrid"}
    ts = _pair(spectrum)
    # eta 1e3: the step is linear in eta (no decay), and a step much larger than the O(1)
    # weights keeps fp32's rounding of W' = W - step (u |W| / |step|, ~3e-4 at eta 0.1 for
    # these heads) out of the measured error of the step itself.
    eta = 1e3
    exact = CMOptions(eta=eta, ns_method="ns", inv_root="eigh", **opts)
    want = pair_step(*ts, exact, hybrid)
    # eigh roots in fp32 too (these partners are well conditioned): the columns then differ
    # by the sign's route alone; the default quintic root adds its own ~2e-6 at this size.
    fast = CMOptions(eta=eta, ns_method=ns_method, inv_root="eigh", **opts)
    got = pair_step(*(t.float() for t in ts), fast, hybrid)
    worst = 0.0
    for w0, a, b in zip(ts[:2], got[:2], want[:2]):
        da, db = (a.double() - w0), (b - w0)
        worst = max(worst, ((da - db).norm() / db.norm().clamp_min(1e-300)).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/accuracy_flags.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    head = "| method | connection | reproject | renorm | hybrid | " + " | ".join(
        f"{s}: gram / ns" for s in SPECTRA) + " |"  # fmt: skip
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    worst = {"gram": 0.0, "ns": 0.0}
    for values in itertools.product(*AXES.values()):
        flags = dict(zip(AXES, values))
        cells = []
        for spectrum in SPECTRA:
            e = {m: step_error(flags, spectrum, m) for m in ("gram", "ns")}
            worst = {m: max(worst[m], e[m]) for m in e}
            cells.append(f"{e['gram']:.1e} / {e['ns']:.1e}")
        rows.append("| " + " | ".join(str(v) for v in values) + " | " + " | ".join(cells) + " |")
    text = "\n".join([
        "# Accuracy of each flag's route, fp32 against float64",
        "",
        f"`python bench/accuracy_flags.py`, {time.strftime('%Y-%m-%d')}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{time.time() - t0:.0f} s.",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"**Worst over every row and spectrum: Gram route {worst['gram']:.1e}, fp32 "
        f"Newton-Schulz {worst['ns']:.1e}.**",
        "",
        *rows,
        "",
    ])  # fmt: skip
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
