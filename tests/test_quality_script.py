"""bench/quality.py: the rate choice, the paired statistics, and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
_spec = importlib.util.spec_from_file_location("quality", _PATH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _run(name, lr, seed, val, tps=1000.0):
    return {"optimizer": name, "lr": lr, "seed": seed, "final_val_loss": val, "tokens_per_s": tps,
            "curve": [(1, val + 1), (2, val)]}  # fmt: skip


def test_summarize_keeps_the_lowest_sweep_loss_and_pairs_by_seed():
    sweep = [_run("cm", 0.01, 99, 1.5), _run("cm", 0.02, 99, 1.4), _run("cm", 0.04, 99, 1.6),
             _run("muon", 0.01, 99, 1.3), _run("muon", 0.02, 99, 1.35)]  # fmt: skip
    final = [_run("cm", 0.02, s, v) for s, v in [(1, 1.25), (0, 1.20), (2, 1.30)]]
    final += [_run("muon", 0.01, s, v) for s, v in [(0, 1.21), (1, 1.22), (2, 1.20)]]
    summary = quality.summarize(sweep, final)
    assert summary["best_lr"] == {"cm": 0.02, "muon": 0.01}
    cm = summary["stats"]["cm"]
    assert cm["seeds"] == [0, 1, 2] and cm["val"] == [1.20, 1.25, 1.30]  # sorted by seed
    assert cm["val_mean_std"] == pytest.approx((1.25, 0.05))
    diffs, mean, std = quality.paired(summary["stats"], "cm", "muon")
    assert diffs == pytest.approx([-0.01, 0.03, 0.10])
    assert mean == pytest.approx(0.04) and std == pytest.approx(0.0556776, rel=1e-5)
    assert quality.paired(summary["stats"], "cm", "adamw") is None


def test_sweep_seed_must_differ_from_the_measured_seeds():
    with pytest.raises(SystemExit):
        quality.parse_args(["--seeds", "0", "1", "--sweep-seed", "1"])


def test_quality_end_to_end_tiny(tmp_path, capsys):
    argv = ["--steps", "2", "--eval-every", "1", "--seeds", "0", "1", "--grid-size", "2",
            "--jobs", "1", "--optimizers", "cm", "muon", "--out", str(tmp_path)]  # fmt: skip
    summary = quality.main(argv)
    data = json.loads((tmp_path / "quality.json").read_text())
    assert len(data["sweep"]) == 4 and len(data["final"]) == 4
    for name in ("cm", "muon"):
        swept = [r for r in data["sweep"] if r["optimizer"] == name]
        assert summary["best_lr"][name] == min(swept, key=lambda r: r["final_val_loss"])["lr"]
        assert {r["seed"] for r in data["final"] if r["optimizer"] == name} == {0, 1}
    md = (tmp_path / "quality.md").read_text()
    assert "| cm |" in md and "| muon |" in md and "cm − muon:" in md
    assert (tmp_path / "quality_val_loss.png").stat().st_size > 0
