"""The compile gate: the kernels compile clean for the GPUs people train on, without a GPU.

``bench/compile_report.py`` runs steps with dry kernels (each launch recorded or compiled, the
reference's values carried on) and compiles every distinct launch for each target through
``cm_triton.aot``; a launch fails the gate on a spill, shared memory over the target's
per-block limit, an int32 offset made from a program id, or a compile over 60 s. Here: the
gate can fail (a toy kernel of each kind is flagged); the covering flag subset the gate
compiles launches everything the whole flag product launches; and one launch of each class
for the two families most short of registers (sm_80: mma.sync; sm_120: mma.sync with 99 KB
of shared memory a block), heads of 64 and 128, passes. The full report (six targets, every
block and variant) is ``TRITON_INTERPRET= python bench/compile_report.py``. The compiles run
in a subprocess: this process has ``TRITON_INTERPRET=1``, under which Triton compiles nothing.
CI runs this file on Triton 3.6 and, in the torch 2.15 job, the selftest on Triton 3.9.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import needs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs("triton")


def _run(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "bench/compile_report.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_the_gate_flags_a_spilling_kernel_and_a_narrow_offset():
    out = _run("--selftest", "--targets", "90")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hungry flagged=True" in out.stdout and "trivial flagged=False" in out.stdout
    assert "narrow flagged=True (['1 int32 program offsets'])" in out.stdout, out.stdout


def test_the_covering_flags_launch_everything_the_flag_product_launches():
    # Recorded, nothing compiled (heads of 16, fp32; checked by hand at 128 in bf16 too).
    sys.path.insert(0, str(ROOT / "bench"))
    import compile_report as cr

    def keys(flag_sets):
        with cr.dry_kernels(record=True) as log:
            cr.functional_steps(16, torch.float32, flag_sets)
            return {launch.key() for launch in log}

    everything = keys(cr.flag_product() + cr.COVER)
    covered = keys(cr.COVER)
    assert everything <= covered, sorted(everything - covered, key=str)[:5]
    assert len(everything) > 40


def test_every_launch_class_passes_the_gate_on_the_tightest_targets(tmp_path):
    out = _run("--targets", "80", "120", "--blocks", "64", "128", "--cover", "--classes",
               "--out", str(tmp_path / "r"))  # fmt: skip
    table = (tmp_path / "r.md").read_text() if (tmp_path / "r.md").exists() else ""
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    verdict = [line for line in table.splitlines() if "configurations fail the gate" in line]
    assert verdict and verdict[0].startswith("**0 of "), (verdict, table[-3000:])
