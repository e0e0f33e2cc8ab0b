"""The README's Python examples run, so they cannot rot."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its usage example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
