"""bench/quality.py: the rate choice, the paired statistics (t-intervals, equal-time
interpolation), and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
_spec = importlib.util.spec_from_file_location("quality", _PATH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _run(name, lr, seed, val, tps=1000.0, secs=(1.0, 2.0)):
    return {"optimizer": name, "lr": lr, "seed": seed, "final_val_loss": val, "tokens_per_s": tps,
            "curve": [(1, val + 1), (2, val)],
            "timed_curve": [(1, secs[0], val + 1), (2, secs[1], val)]}  # fmt: skip


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


def test_grid_status_says_whether_the_best_rate_is_bracketed():
    sweep = [_run("cm", 0.01, 99, 1.2), _run("cm", 0.02, 99, 1.1), _run("cm", 0.04, 99, 1.3),
             _run("muon", 0.01, 99, 1.3), _run("muon", 0.02, 99, 1.2),
             _run("adamw", 1e-3, 99, 2.0)]  # fmt: skip
    assert quality.grid_status(sweep, "cm") == "interior"
    assert quality.grid_status(sweep, "muon") == "edge: not bracketed"
    assert quality.grid_status(sweep, "adamw") == "one rate: not tuned"


def test_t_quantiles_match_closed_forms():
    # df = 1 (Cauchy): tan(pi (p - 1/2)); df = 2: q sqrt(2 / (1 - q^2)), q = 2p - 1.
    assert quality.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-6)
    assert quality.t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)))
    assert quality.t_quantile(0.9, 2) == pytest.approx(0.8 * math.sqrt(2 / (1 - 0.8**2)))
    assert quality.t_cdf(0.0, 5) == pytest.approx(0.5)
    assert quality.t_cdf(-1.3, 4) == pytest.approx(1 - quality.t_cdf(1.3, 4))
    # Many degrees of freedom: the normal's z = 1.959964 plus (z^3 + z) / (4 df).
    z = 1.959964
    assert quality.t_quantile(0.975, 10_000) == pytest.approx(z + (z**3 + z) / 4e4, abs=1e-5)
    with pytest.raises(ValueError):
        quality.t_quantile(0.4, 3)


def test_t_interval_by_hand():
    ci = quality.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.30265
    t = 0.95 * math.sqrt(2 / (1 - 0.95**2))
    assert ci["mean"] == pytest.approx(2.0) and ci["sd"] == pytest.approx(1.0)
    assert ci["half_width"] == pytest.approx(t / math.sqrt(3))
    assert (ci["low"], ci["high"]) == pytest.approx((2 - t / math.sqrt(3), 2 + t / math.sqrt(3)))
    one = quality.t_interval([0.5])
    assert one["mean"] == 0.5 and one["half_width"] is None


def test_value_at_time_interpolates_in_seconds_not_steps():
    curve = [(10, 1.0, 3.0), (20, 3.0, 2.0), (30, 4.0, 1.0)]
    assert quality.value_at_time(curve, 2.0) == pytest.approx(2.5)  # halfway in seconds
    assert quality.value_at_time(curve, 3.5) == pytest.approx(1.5)
    assert quality.value_at_time(curve, 1.0) == 3.0 and quality.value_at_time(curve, 4.0) == 1.0
    assert quality.value_at_time(curve, 0.5) is None and quality.value_at_time(curve, 4.5) is None


def test_equal_time_pairs_at_the_shorter_runs_total_time():
    # a: 1.0 at 4 s (its end); b ran to 6 s: 2.0 at 2 s, 1.0 at 6 s, so 1.5 at 4 s.
    a0, b0 = _run("cm", 0.01, 0, 1.0, secs=(2.0, 4.0)), _run("muon", 0.01, 0, 1.0, secs=(2.0, 6.0))
    assert quality.equal_time(a0, b0) == pytest.approx((4.0, 1.0, 1.5))
    # seed 1: a is the slower one this time; b's 1.2 at 3 s, a's 2.1 -> 1.1 over 1..5 s: 1.6.
    a1, b1 = _run("cm", 0.01, 1, 1.1, secs=(1.0, 5.0)), _run("muon", 0.01, 1, 1.2, secs=(1.0, 3.0))
    pt = quality.paired_equal_time([a0, b0, a1, b1], "cm", "muon")
    assert [p["seconds"] for p in pt["per_seed"]] == pytest.approx([4.0, 3.0])
    assert [p["diff"] for p in pt["per_seed"]] == pytest.approx([-0.5, 0.4])
    assert pt["mean"] == pytest.approx(-0.05) and pt["sd"] == pytest.approx(0.9 / math.sqrt(2))
    assert quality.paired_equal_time([a0, b0, a1], "cm", "muon") is None  # seeds differ


def test_comparisons_against_the_baseline_then_cm():
    assert quality.comparisons(["cm", "cm-pre", "muon"], "muon") == [
        ("cm", "muon"), ("cm-pre", "muon"), ("cm", "cm-pre")]  # fmt: skip
    assert quality.comparisons(["cm", "adamw"], "muon") == [("cm", "adamw")]


def test_grid_option_parses_and_rejects():
    args = quality.parse_args(["--grid", "cm-pre=0.01,0.02", "--grid", "muon=0.005"])
    assert args.grid == [("cm-pre", (0.01, 0.02)), ("muon", (0.005,))]
    for bad in ("cm", "nope=0.01", "cm=x", "cm=-1"):
        with pytest.raises(SystemExit):
            quality.parse_args(["--grid", bad])
    with pytest.raises(SystemExit):
        quality.parse_args(["--optimizers", "cm", "--finalists", "muon"])


def test_sweep_seed_must_differ_from_the_measured_seeds():
    with pytest.raises(SystemExit):
        quality.parse_args(["--seeds", "0", "1", "--sweep-seed", "1"])


def test_quality_end_to_end_tiny(tmp_path):
    text = (Path(quality.demo.__file__).read_text() * 3)[:60_000]
    (tmp_path / "t.txt").write_text(text)
    argv = ["--steps", "2", "--eval-every", "1", "--seeds", "0", "1", "--max-extend", "0",
            "--grid", "cm=0.01,0.02", "--grid", "muon=0.01,0.02", "--optimizers", "cm", "muon",
            "--data", str(tmp_path / "t.txt"), "--jobs", "1", "--out", str(tmp_path / "a"),
            "--cache", str(tmp_path / "cache")]  # fmt: skip
    summary = quality.main(argv)
    data = json.loads((tmp_path / "a" / "quality.json").read_text())
    assert len(data["final"]) == 4 and not any(r["cached"] for r in data["sweep"] + data["final"])
    for name in ("cm", "muon"):
        swept = [r for r in data["sweep"] if r["optimizer"] == name]
        assert len(swept) == 2
        assert summary["best_lr"][name] == min(swept, key=lambda r: r["final_val_loss"])["lr"]
        assert {r["seed"] for r in data["final"] if r["optimizer"] == name} == {0, 1}
    for r in data["final"]:  # (step, training seconds, val): seconds grow, val is the curve's
        steps, secs, vals = zip(*r["timed_curve"])
        assert list(steps) == [1, 2] and 0 < secs[0] < secs[1] <= r["seconds"]
        assert list(vals) == [v for _, v in r["curve"]]
    (comp,) = summary["comparisons"]
    assert (comp["a"], comp["b"]) == ("cm", "muon") and comp["time"]["n"] == 2
    md = (tmp_path / "a" / "quality.md").read_text()
    assert "| cm |" in md and "| muon |" in md and "| cm − muon | equal time |" in md
    assert "t.txt" in md and "interior" not in md  # two rates, no extension: an edge
    assert (tmp_path / "a" / "quality_val_loss.png").stat().st_size > 0
    # A second invocation reads every run back from the cache and reports the same numbers.
    again = quality.main([*argv[:-3], str(tmp_path / "b"), *argv[-2:]])
    data_b = json.loads((tmp_path / "b" / "quality.json").read_text())
    assert all(r["cached"] for r in data_b["sweep"] + data_b["final"])
    assert again["stats"] == summary["stats"]
