"""The prepared GPU check runs end to end (``--dry-run``: tiny shapes, the CPU, the kernels
through the interpreter), so the script a lent GPU runs in one call has run before; it
appends each section to its report as the section finishes."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_the_gpu_check_runs_every_section(tmp_path, monkeypatch):
    import gpu_check

    report = tmp_path / "gpu.md"
    seen = []
    real = gpu_check.parity

    def parity(*args, **kwargs):  # the report already holds the header when section 1 runs
        seen.append(report.read_text())
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_check, "parity", parity)
    out = gpu_check.main(["--dry-run", "--reps", "1", "--out", str(report)])
    text = out.read_text()
    assert "Traceback" not in text, text
    for n in range(1, 6):
        assert f"## {n}. " in text
    assert "| `defaults` |" in text and "| stream |" in text
    assert seen and "# GPU check benchmarks" in seen[0] and "## 1." not in seen[0]


def test_the_gpu_script_asks_for_its_report_path_and_uses_python3():
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "python3 -m cm_triton.check --out" in script and "python3 bench/gpu_check.py" in script
    assert "\npython " not in script and " python bench" not in script
