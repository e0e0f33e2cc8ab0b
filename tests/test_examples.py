"""The trainer recipes under ``examples/`` run as users run them, on a tiny Llama from a config
(``examples/common.py``) and CPython's own text, and train: 20 steps each, one optimizer step
of CM, Muon and AdamW groups per step. What each must show is asserted: the loss falls by more
than its step-to-step noise, the resumed Trainer run ends on the uninterrupted run's weights,
LoRA moves only the adapters."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import real_models  # noqa: F401 - makes transformers importable beside the CPU torch wheel
import torch
from helpers import optional

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    optional("transformers")
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def _trains(losses: list[float], by: float) -> None:
    # 20 steps from a random init: the byte-level loss starts at ln 256 = 5.55 and falls to
    # ~3.7 (full fine-tune) or ~5.3 (LoRA, rank 4); a batch's loss varies by ~0.1-0.3 around
    # its trend, so the last five steps' mean lying ``by`` below the first step is a fall, not
    # noise. A step that did nothing (or diverged) fails it.
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - by, losses


def test_hf_trainer_resumes_to_the_same_weights(tmp_path):
    optional("accelerate")  # Trainer's own dependency
    hf = _example("hf_trainer")
    first = hf.train(str(tmp_path / "a"), steps=20, save_every=10)
    losses = [h["loss"] for h in first.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 1.0, losses  # logged every 5 steps: 5.4 -> 3.9
    resumed = hf.train(str(tmp_path / "b"), steps=20, resume=str(tmp_path / "a/checkpoint-10"))
    # Model, optimizer (momentum, Adam moments), scheduler, data order and RNG restored: the
    # second half replays bit for bit on the CPU. A fresh optimizer state would differ.
    for a, b in zip(first.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_accelerate_loop_trains():
    optional("accelerate")
    _trains(_example("accelerate_loop").main(steps=20), by=1.0)


def test_lightning_module_trains_through_the_closure():
    optional("lightning")
    _trains(_example("lightning_module").main(steps=20), by=1.0)


def test_peft_lora_moves_only_the_adapters():
    optional("peft")
    losses, model = _example("peft_lora").main(steps=20)
    _trains(losses, by=0.15)
    before = _example("common").tiny_llama()  # the same seed: the base weights as built
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in model.named_parameters() if "lora_" not in n}  # fmt: skip
    for name, p in before.named_parameters():
        assert torch.equal(base[name], p), name
    adapters = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert adapters and all(p.abs().max() > 0 for p in adapters)  # lora_B starts at zero


def test_compile_loop_trains():
    _trains(_example("compile_loop").main(steps=20), by=1.0)
