"""The compile gate (issue: kernels fast on the GPUs they target, proven without a GPU).

Every kernel configuration of head sizes 64 and 128 (blocks 64, 128: the common heads) is
compiled ahead of time for sm_90 (H100/H200) and sm_80 (A100) through the package's own launch
code (``bench/compile_report.py`` on ``cm_triton.aot``), and must not spill, must fit the
target's shared memory per block, and must compile within 60 s. The full table for every
block is ``bench/results/compile_report.md``. Runs in a subprocess: this process has
``TRITON_INTERPRET=1``, under which Triton compiles nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cm_triton.dispatch import triton_available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "bench/compile_report.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_the_gate_flags_a_spilling_kernel():
    out = _run("--selftest", "--targets", "90")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hungry flagged=True" in out.stdout and "trivial flagged=False" in out.stdout
    assert "narrow flagged=True (['1 int32 program offsets'])" in out.stdout, out.stdout


def test_every_kernel_configuration_for_head_dims_64_and_128_passes_the_gate(tmp_path):
    out = _run("--blocks", "64", "128", "--targets", "90", "80", "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    table = (tmp_path / "r.md").read_text()
    assert "**0 of 128 configurations fail the gate.**" in table, table[-3000:]
