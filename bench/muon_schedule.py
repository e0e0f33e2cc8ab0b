"""The Muon groups' Newton-Schulz schedule: Polar Express in 8 steps (the CM legs') or in 5
(torch.optim.Muon's step count, dion's and modded-nanogpt's schedule), measured.

    python bench/muon_schedule.py accuracy     # bench/results/muon_schedule.md (a section)
    python bench/muon_schedule.py time         # the whole-model CPU step, 8 against 5 steps

Accuracy: Muon's update (msign of the Nesterov direction, the Gram form with its restart, as a
step evaluates it) of matrices shaped like real MLP weights (aspect 2.75-4, short side 256 to
1024), over singular spectra from Gaussian to condition 1e4 and a rank-deficient one, against
the exact polar factor U V^T in float64: the relative Frobenius distance and how far the
singular values of the result lie from 1 (Muon steps along U V^T; the schedules stop short of
it on purpose, with their safety factors). Time: one optimizer step of the Llama-shaped 4-block
d-1024 model (bench/test_bench_step.py's), one thread, median of 5, nothing else running.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import spectrum_slices  # noqa: E402

from cm_triton.reference.muon import muon_direction  # noqa: E402
from cm_triton.schedules import POLAR_EXPRESS_5, POLAR_EXPRESS_8  # noqa: E402

SCHEDULES = {"Polar Express 8 (today)": (POLAR_EXPRESS_8, 3),
             "Polar Express 5": (POLAR_EXPRESS_5, 3)}  # fmt: skip
SHAPES = [(256, 688), (512, 1408), (1024, 2816), (1024, 4096)]
SPECTRA = ("gaussian", "cond1e2", "cond1e4", "rank_half")


def accuracy() -> list[str]:
    rows = ["| schedule | shape | spectrum | distance to U V^T | min sigma | max sigma |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    worst = {}
    for name, (coeffs, restart) in SCHEDULES.items():
        for m, n in SHAPES:
            for kind in SPECTRA:
                x = spectrum_slices(kind, 2, m, n, seed=m + n)
                u, _, vh = torch.linalg.svd(x, full_matrices=False)
                exact = u @ vh
                if kind == "rank_half":  # the polar factor of the nonzero part
                    k = m // 2
                    exact = u[..., :k] @ vh[..., :k, :]
                got = muon_direction(x.float(), coeffs, None, "gram", restart).double()
                dist = (got - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
                sv = torch.linalg.svdvals(got)
                if kind == "rank_half":
                    sv = sv[..., : m // 2]
                rows.append(f"| {name} | {m} x {n} | {kind} | {dist.max():.2e} | "
                            f"{sv.min():.3f} | {sv.max():.3f} |")  # fmt: skip
                w = worst.setdefault(name, [0.0, 1.0, 1.0])
                w[0] = max(w[0], dist.max().item())
                w[1], w[2] = min(w[1], sv.min().item()), max(w[2], sv.max().item())
    rows += ["", "| schedule | worst distance | singular values within |", "|---|---|---|"]
    rows += [f"| {k} | {d:.2e} | [{lo:.3f}, {hi:.3f}] |" for k, (d, lo, hi) in worst.items()]
    return rows


def step_time() -> list[str]:
    from test_bench_step import MuonFP32, _model_with_grads  # the 4-block d-1024 model

    from cm_triton import CompositionalMuon, param_groups

    torch.set_num_threads(1)
    rows = ["| optimizer | median s per step | min | max |", "|---|---|---|---|"]
    cases = {f"CompositionalMuon, Muon groups on {k}": v for k, v in SCHEDULES.items()}
    cases["torch.optim.Muon's algorithm in fp32 (5 classic steps) + AdamW"] = None
    for name, schedule in cases.items():
        model = _model_with_grads("cpu", torch.float32)
        groups = param_groups(model, attention=schedule is not None)
        if schedule is None:
            mats = [p for g in groups if g["kind"] == "muon" for p in g["params"]]
            rest = [p for g in groups if g["kind"] == "adamw" for p in g["params"]]
            muon, adamw = MuonFP32(mats, lr=1e-3), torch.optim.AdamW(rest, lr=3e-3, foreach=True)

            def step(muon=muon, adamw=adamw):
                muon.step()
                adamw.step()
        else:
            for g in groups:
                if g["kind"] == "muon":
                    g["ns_coefficients"] = schedule[0]
            step = CompositionalMuon(groups, lr=1e-3).step
        step()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        rows.append(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | "
                    f"{max(times):.2f} |")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["accuracy", "time"])
    args = ap.parse_args()
    rows = accuracy() if args.what == "accuracy" else step_time()
    print(f"`python bench/muon_schedule.py {args.what}`, {time.strftime('%Y-%m-%d')}, torch "
          f"{torch.__version__}\n")  # fmt: skip
    print("\n".join(rows))


if __name__ == "__main__":
    main()
