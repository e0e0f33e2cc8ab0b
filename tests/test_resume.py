"""Resume across processes: 3 steps, checkpoint, 3 more steps in a new Python process gives
weights bit-identical to 6 uninterrupted steps (CPU, deterministic kernels)."""

from __future__ import annotations

import subprocess
import sys

import torch

from cm_triton import demo

# A constant rate: the "half" run is a 3-step run, and the demo's default schedule (WSD) is
# laid out over the total steps, so its first 3 steps would take other rates than the first 3
# of a 6-step run (the scheduler's own state across a resume: test_demo's schedule tests).
COMMON = ["--eval-every", "3", "--eval-batches", "1", "--batch-size", "4", "--threads", "1",
          "--schedule", "constant"]  # fmt: skip


def test_checkpoint_resume_in_a_new_process_is_bit_identical(tmp_path):
    full, half, resumed = (tmp_path / n for n in ("full.pt", "half.pt", "resumed.pt"))
    demo.main(["--steps", "6", "--checkpoint", str(full), "--out", str(tmp_path)] + COMMON)
    demo.main(["--steps", "3", "--checkpoint", str(half), "--out", str(tmp_path)] + COMMON)
    cmd = [sys.executable, "-m", "cm_triton.demo", "--steps", "6", "--resume", str(half),
           "--checkpoint", str(resumed), "--out", str(tmp_path)] + COMMON  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    a, b = torch.load(full), torch.load(resumed)
    assert a["step"] == b["step"] == 6
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for pid, st in a["optimizer"]["state"].items():
        for key, t in st.items():
            assert torch.equal(
                torch.as_tensor(t), torch.as_tensor(b["optimizer"]["state"][pid][key])
            )
    assert a["curve"] == b["curve"]
