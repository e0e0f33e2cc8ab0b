"""The Python examples of the README and of docs/ run, so they cannot rot; the links between
them resolve."""

from __future__ import annotations

import pathlib
import re

import pytest
import real_models  # noqa: F401 - makes transformers importable beside the CPU torch wheel

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(_blocks(ROOT / "README.md")) >= 2, "the README lost its quick start"


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_python_examples_run(page):
    for block in _blocks(page):
        exec(compile(block, str(page), "exec"), {})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", prose):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
