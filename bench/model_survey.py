"""The table of real-model families: what param_groups finds, the gauge check, 20 training
steps, and what it warns about. Same builders and checks as tests/test_real_models.py.

    python bench/model_survey.py        # writes bench/results/models.md
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from real_models import FAMILIES, forward, gauge_diff  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402
from cm_triton.discovery import UnhandledAttentionWarning  # noqa: E402

ATTENTION = ("qk", "ov", "mha", "attention")


def survey(name: str) -> str:
    fam = FAMILIES[name]
    torch.manual_seed(0)
    model = fam.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = param_groups(model)
    warned = [str(w.message).split("'")[1] for w in caught
              if issubclass(w.category, UnhandledAttentionWarning)]  # fmt: skip
    kinds = Counter(g.get("layout") or g["kind"] for g in groups if g["kind"] in ATTENTION)
    found = ", ".join(f"{n} x {k}" for k, n in kinds.items()) or "none"
    muon = Counter(g.get("shape", "matrix") for g in groups if g["kind"] == "muon")
    gauge = "-"
    if fam.attention:
        diff, scale = gauge_diff(name)
        gauge = f"{diff / max(scale, 1.0):.1e}"
    model.train()
    opt = CompositionalMuon(groups, lr=0.01, adamw_lr=3e-3)
    inputs = fam.inputs(model)
    target = torch.randn(forward(model, inputs).shape, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = (forward(model, inputs).float() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    warn = ", ".join(sorted(set(warned))) or "-"
    mu = ", ".join(f"{k} {v}" for k, v in muon.items())
    return (f"| {name} | {found} | {gauge} | {losses[0]:.3f} -> {losses[-1]:.3f} | {mu} | "
            f"{warn} |")  # fmt: skip


def main() -> None:
    rows = [survey(n) for n in FAMILIES]
    text = "\n".join(
        [
            "# Real models: what param_groups finds, the gauge check, 20 steps",
            "",
            f"`python bench/model_survey.py`, {time.strftime('%Y-%m-%d')}, torch "
            f"{torch.__version__}, transformers {__import__('transformers').__version__}, timm "
            f"{__import__('timm').__version__}. Tiny random models from configs "
            "(`tests/real_models.py`), nothing downloaded.",
            "Gauge: the largest change of the output (float64) after transforming every pair by a "
            "random gauge element through the groups' own head views, relative to the output's "
            "size (tests require <= 1e-10). Training: regression to a fixed random target, one "
            "batch, CompositionalMuon lr 0.01, first and last of 20 losses.",
            "",
            "| family | attention groups found (layout or kind) | gauge | 20 steps: loss | "
            "Muon groups (shape) | warned about (not CM's) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    Path("bench/results/models.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
