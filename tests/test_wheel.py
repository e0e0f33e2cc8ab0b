"""The wheel as users get it: built from this tree, holding only the package (and the release's
module name), installed outside the tree, imported and running a few demo steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (setuptools) of this environment, nothing downloaded
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                           "--outdir", str(out), str(ROOT)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (whl,) = out.glob("cm_triton-*.whl")
    return whl


def test_the_wheel_holds_only_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"  # cm_triton-<version>
    assert tops == {"cm_triton", "compositional_muon.py", dist_info}, tops
    for module in (
        "cm_triton/py.typed",
        "cm_triton/aot/harness.py",
        "cm_triton/check.py",
        "cm_triton/kernels/streaming.py",
        "cm_triton/reference/pipeline.py",
    ):
        assert module in names, module
    assert not any(n.startswith(("tests/", "bench/", "examples/")) for n in names)


def test_the_wheel_installs_outside_the_tree_and_trains(wheel, tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(site), str(wheel)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = (
        "import cm_triton, compositional_muon, sys\n"
        f"assert cm_triton.__file__.startswith({str(site)!r}), cm_triton.__file__\n"
        "from cm_triton.demo import main\n"
        "r = main(['--steps', '3', '--eval-every', '3', '--out', 'out'])\n"
        "assert r[0]['final_val_loss'] < 6, r\n"
        "print('trained', cm_triton.__version__)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert f"trained {version}" in ran.stdout  # the metadata's version is the package's
