"""Print a markdown table of a pytest-benchmark JSON: the median of each case in ms, one row per
benchmark group (shape), and each implementation's ratio to the base step of the same group.

python bench/summarize.py OUT.json [--base muon_fp32]
"""

from __future__ import annotations

import json
import sys


def table(data: dict, base_impl: str = "muon_fp32") -> str:
    rows: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        impl = b["name"].split("[")[1].rstrip("]").split("-")[0]
        rows.setdefault(b["group"], {})[impl] = b["stats"]["median"]
    impls = list(dict.fromkeys(i for r in rows.values() for i in r))
    others = [i for i in impls if i != base_impl]
    head = ["group", *(f"{i} (ms)" for i in impls), *(f"{i} / {base_impl}" for i in others)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for group, r in rows.items():
        base = r.get(base_impl)
        cells = [group, *(f"{r[i] * 1e3:.3f}" if i in r else "-" for i in impls)]
        cells += [f"{r[i] / base:.2f}×" if base and i in r else "-" for i in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    base = sys.argv[sys.argv.index("--base") + 1] if "--base" in sys.argv else "muon_fp32"
    with open(sys.argv[1]) as f:
        print(table(json.load(f), base))
