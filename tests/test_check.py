"""``python -m cm_triton.check``: it runs on the CPU (Triton's interpreter, tiny shapes), writes
its report section by section, and fails (non-zero) when a kernel fails or differs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs

pytestmark = needs("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_the_check_passes_on_the_cpu(tmp_path):
    # As a user runs it: a fresh process, TRITON_INTERPRET unset (the command sets it).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "cm_triton.check", "--out",
                          str(tmp_path / "r.md")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "r.md").read_text()
    for title in ("Versions", "A default step's kernels", "Kernel against", "One step against"):
        assert f"## {title}" in report, title
    assert "TRITON_INTERPRET=1" in report and "| ok |" in report
    assert "kernel configurations match the reference.**" in report
    assert "| wrong |" not in report and "| error |" not in report


def test_a_failing_kernel_fails_the_check(tmp_path, monkeypatch):
    from cm_triton import check, dispatch
    from cm_triton.kernels import KERNEL_PHASES

    def broken(*args, **kwargs):
        raise RuntimeError("injected: compile error")

    bad = dataclasses.replace(KERNEL_PHASES, apply_update=broken)
    monkeypatch.setattr(dispatch, "_triton_primitives",
                        lambda guarded=False: dispatch.build_primitives(bad, guarded))  # fmt: skip
    monkeypatch.setattr(check, "section_phases", lambda device, reps: ["(skipped)"])
    monkeypatch.setattr(check, "section_step", lambda device, reps: ["(skipped)"])
    with pytest.warns(RuntimeWarning, match="apply_update"):
        code = check.main(["--out", str(tmp_path / "r.md")])
    report = (tmp_path / "r.md").read_text()
    assert code == 1
    assert (
        "| apply_update |" in report
        and "| error | RuntimeError: injected: compile error |" in report
    )
    dispatch.Guard.reset()
