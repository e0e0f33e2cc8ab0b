"""Print a markdown table of a pytest-benchmark JSON: median per case and ratio to Muon.

python bench/summarize.py OUT.json
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        impl = b["name"].split("[")[1].split("-")[0]
        rows.setdefault(b["group"], {})[impl] = b["stats"]["median"]
    print("| group | impl | median (ms) | ratio to muon |")
    print("|---|---|---|---|")
    for group, impls in rows.items():
        base = impls.get("muon")
        for impl, med in impls.items():
            ratio = f"{med / base:.2f}x" if base else "-"
            print(f"| {group} | {impl} | {med * 1e3:.3f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
