"""The prepared GPU check runs end to end (``--dry-run``: tiny shapes, the CPU, the kernels
through the interpreter), so the script a lent GPU runs in one call has run before."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_the_gpu_check_runs_every_section(tmp_path):
    import gpu_check

    out = gpu_check.main(["--dry-run", "--reps", "1", "--out", str(tmp_path / "gpu.md")])
    text = out.read_text()
    assert "Traceback" not in text, text
    for n in range(1, 6):
        assert f"## {n}. " in text
    assert "| `defaults` |" in text and "| stream |" in text
