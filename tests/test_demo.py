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


def test_lr_factors_warm_up_hold_and_cool_down():
    steps = 100
    cos, wsd = (demo.lr_factor(s, steps, 0.1, 0.2) for s in ("cosine", "wsd"))
    assert [demo.lr_factor("constant", steps, 0.1, 0.2)(k) for k in (0, 50, 99)] == [1.0] * 3
    # Warmup: 10 steps rising linearly to 1 (the 11th step runs at the full rate).
    assert [round(cos(k), 6) for k in (0, 4, 10)] == [round(1 / 11, 6), round(5 / 11, 6), 1.0]
    assert wsd(10) == wsd(79) == 1.0 and wsd(80) == 1.0 and wsd(90) == 0.5 and wsd(99) == 0.05
    assert cos(55) == pytest.approx(0.5) and cos(99) < 1e-3  # half-way down at the midpoint
    with pytest.raises(ValueError, match="schedule"):
        demo.lr_factor("linear", steps, 0.1, 0.2)


@pytest.mark.parametrize("schedule", demo.SCHEDULES)
def test_each_schedule_trains_end_to_end(tmp_path, schedule):
    import torch

    ck = str(tmp_path / "ck.pt")
    args = ["--steps", "8", "--eval-every", "4", "--eval-batches", "1", "--batch-size", "4",
            "--schedule", schedule, "--warmup", "0.25", "--weight-decay", "0.1",
            "--out", str(tmp_path), "--checkpoint", ck]  # fmt: skip
    r = demo.main(args)[0]
    assert r["final_val_loss"] < math.log(256) - 1.0  # 5.55 untrained; ~3.8 after 8 steps
    # The scheduler's state is saved with the model and optimizer (a resume continues it).
    saved = torch.load(ck)["scheduler"]
    assert saved["last_epoch"] == 8
    final = demo.lr_factor(schedule, 8, 0.25, 0.2)(8)
    assert saved["_last_lr"][0] == pytest.approx(demo.default_lr("cm", schedule) * final)


def test_a_schedulers_lr_reaches_every_cm_muon_and_adamw_batch():
    # Two optimizers in the same state after one step; before the second, a scheduler scales
    # one's lr by 1/4. Every update of CM, Muon and AdamW is lr times a function of the state
    # (no weight decay), so every parameter's second update must be exactly a quarter of the
    # other's, up to fp32 rounding of the two subtractions (w - lr u: relative ~2^-23 of |w|
    # per update, divided by |update| ~ lr |u|: 1e-4 relative at these magnitudes).
    import copy

    import torch

    torch.manual_seed(0)
    models = [demo.GPT(demo.SIZES["demo"]) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [demo.make_optimizer("cm", m, 0.01) for m in models]
    sched = torch.optim.lr_scheduler.LambdaLR(opts[0], lambda k: 1.0 if k == 0 else 0.25)
    kinds = {g["kind"] for g in opts[0].param_groups}
    assert {"qk", "ov", "muon", "adamw"} <= kinds, kinds
    x = torch.randint(0, 256, (2, 2, 33))
    before = None
    for step in range(2):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x[0][:, :-1], x[0][:, 1:]).backward()
        if step == 1:
            before = [copy.deepcopy(m.state_dict()) for m in models]
        for o in opts:
            o.step()
        if step == 0:
            sched.step()
    for name, p in models[0].named_parameters():
        full = dict(models[1].named_parameters())[name] - before[1][name]
        quarter = p.detach() - before[0][name]
        torch.testing.assert_close(quarter, full / 4, rtol=1e-3, atol=1e-6, msg=name)


def test_the_default_schedule_is_wsd_at_its_swept_rates():
    # The demo trains as the measurements chose (bench/results/quality_protocol.md): WSD with
    # a 5% warmup and a 20% cooldown, at the rates swept under it (cm 0.02, muon 0.01); a
    # constant rate keeps the rates swept at a constant rate.
    args = demo.parse_args([])
    assert (args.schedule, args.warmup, args.cooldown) == ("wsd", 0.05, 0.2)
    assert (demo.default_lr("cm", "wsd"), demo.default_lr("muon", "wsd")) == (0.02, 0.01)
    assert demo.default_lr("cm-isotropic", "wsd") == 0.02
    assert (demo.default_lr("cm", "constant"), demo.default_lr("muon", "constant")) == (0.01, 0.005)
