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


def test_edge_extensions_bracket_the_best_rate():
    sweep = [_run("cm", 0.01, 99, 1.2), _run("cm", 0.02, 99, 1.3),  # best at the low edge
             _run("muon", 0.01, 99, 1.3), _run("muon", 0.02, 99, 1.2),  # best at the high edge
             _run("adamw", 1e-3, 99, 1.5), _run("adamw", 2e-3, 99, 1.4),
             _run("adamw", 4e-3, 99, 1.6)]  # fmt: skip
    assert quality.edge_extensions(sweep) == [("cm", 0.005), ("muon", 0.04)]
    assert quality.edge_extensions(sweep + [_run("cm", 0.005, 99, 1.25)]) == [("muon", 0.04)]


def test_sweep_seed_must_differ_from_the_measured_seeds():
    with pytest.raises(SystemExit):
        quality.parse_args(["--seeds", "0", "1", "--sweep-seed", "1"])


def test_quality_end_to_end_tiny(tmp_path):
    argv = ["--steps", "2", "--eval-every", "1", "--seeds", "0", "1", "--grid-size", "2",
            "--optimizers", "cm", "muon", "--jobs", "1", "--out", str(tmp_path / "a"),
            "--cache", str(tmp_path / "cache")]  # fmt: skip
    summary = quality.main(argv)
    data = json.loads((tmp_path / "a" / "quality.json").read_text())
    assert len(data["final"]) == 4 and not any(r["cached"] for r in data["sweep"] + data["final"])
    for name in ("cm", "muon"):
        swept = [r for r in data["sweep"] if r["optimizer"] == name]
        assert len(swept) >= 2
        assert summary["best_lr"][name] == min(swept, key=lambda r: r["final_val_loss"])["lr"]
        assert {r["seed"] for r in data["final"] if r["optimizer"] == name} == {0, 1}
    md = (tmp_path / "a" / "quality.md").read_text()
    assert "| cm |" in md and "| muon |" in md and "cm − muon:" in md
    assert (tmp_path / "a" / "quality_val_loss.png").stat().st_size > 0
    # A second invocation reads every run back from the cache and reports the same numbers.
    again = quality.main([*argv[:-3], str(tmp_path / "b"), *argv[-2:]])
    data_b = json.loads((tmp_path / "b" / "quality.json").read_text())
    assert all(r["cached"] for r in data_b["sweep"] + data_b["final"])
    assert again["stats"] == summary["stats"]
