"""The demo trains on the embedded text end to end, and rejects bad input in one line."""

from __future__ import annotations

import json
import math

import pytest

from cm_triton import demo


def test_demo_loss_goes_down_on_embedded_text(tmp_path):
    args = ["--steps", "30", "--eval-every", "15", "--eval-batches", "2", "--batch-size", "8"]
    results = demo.main(args + ["--compare", "cm", "muon", "--out", str(tmp_path)])
    assert [r["optimizer"] for r in results] == ["cm", "muon"]
    for r in results:
        first_val = r["curve"][0][1]
        # Untrained byte model: ln(256) = 5.55 nats/byte. Both must learn something real.
        assert r["final_val_loss"] < math.log(256) - 1.5
        assert r["final_val_loss"] <= first_val
    assert (tmp_path / "val_loss.png").stat().st_size > 0
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["results"][0]["final_val_loss"] == results[0]["final_val_loss"]


def test_demo_is_reproducible_with_a_seed(tmp_path):
    args = ["--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--batch-size", "4",
            "--out", str(tmp_path)]  # fmt: skip
    assert demo.main(args)[0]["final_val_loss"] == demo.main(args)[0]["final_val_loss"]


def test_embedded_text_is_real_prose():
    text = demo.embedded_text()
    assert len(text) > 300_000 and "statement" in text


@pytest.mark.parametrize(
    "setup, args, match",
    [
        (None, ["--data", "/nonexistent/file.txt"], "no such file"),
        ("short", [], "too short"),
        ("binary", [], "not UTF-8"),
    ],
)
def test_demo_bad_data_gives_a_one_line_error(tmp_path, setup, args, match):
    if setup == "short":
        (tmp_path / "t.txt").write_text("tiny")
        args = ["--data", str(tmp_path / "t.txt")]
    elif setup == "binary":
        (tmp_path / "t.bin").write_bytes(b"\xff\xfe\x00" * 5000)
        args = ["--data", str(tmp_path / "t.bin")]
    with pytest.raises(SystemExit, match=match):
        demo.main(args + ["--out", str(tmp_path)])


def test_demo_rejects_unknown_optimizer(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--optimizer", "sgd"])
    assert "invalid choice" in capsys.readouterr().err


def test_c_headers_corpus_is_c_and_deterministic():
    text = demo.c_headers_text()
    assert len(text.encode()) > 300_000 and "#define" in text and "/* Python.h */" in text
    assert text == demo.c_headers_text()
    train, val = demo.load_bytes(None, 128, "c-headers")
    assert len(train) + len(val) == len(text.encode()) and len(val) == len(text.encode()) // 10


def test_sizes_4x_is_about_four_times_the_demo():
    count = {k: sum(p.numel() for p in demo.GPT(c).parameters()) for k, c in demo.SIZES.items()}
    assert demo.SIZES["demo"] == demo.GPTConfig()  # the demo's defaults are unchanged
    assert count["demo"] == 805_120 and 3.5 < count["4x"] / count["demo"] < 4.5
    big = demo.SIZES["4x"]
    assert big.d_model // big.n_head == 32 and big.n_head // big.n_kv_head == 2


@pytest.mark.parametrize("name", [n for n in demo.OPTIMIZERS if n in demo.OPTIONS])
def test_optimizer_names_set_their_cm_options(name):
    opt = demo.make_optimizer(name, demo.GPT(demo.GPTConfig()))
    attention = [g for g in opt.param_groups if g.get("kind") in ("qk", "ov")]
    assert attention, name  # CM steps the attention, per-head Muon included
    for key, value in demo.OPTIONS[name].items():
        assert all(g[key] == value for g in attention), (name, key)


def test_demo_trains_the_4x_size_on_the_c_headers(tmp_path):
    args = ["--steps", "2", "--eval-every", "1", "--eval-batches", "1", "--batch-size", "2",
            "--size", "4x", "--corpus", "c-headers", "--optimizer", "cm-damp1e-1",
            "--out", str(tmp_path)]  # fmt: skip
    (r,) = demo.main(args)
    assert [s for s, _, _ in r["timed_curve"]] == [1, 2] and math.isfinite(r["final_val_loss"])
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["meta"]["model"]["d_model"] == 256
