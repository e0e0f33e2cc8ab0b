"""Which Triton kernels each flag combination launches under ``backend="triton"``.

    TRITON_INTERPRET=1 python bench/kernel_coverage.py   # writes bench/results/kernel_coverage.md

Every combination of method x isotropic x hybrid x whitening x connection x
momentum_reproject x per_mat_renorm (640) steps one ``cm_ov`` GQA pair (Hq 4, Hkv 2, dh 8,
width 40; and ``cm_qk`` for the flags without hybrid) under the interpreter; the launches of
each kernel are counted (``tests/helpers.kernel_launches``). A combination "launches its
big-matrix passes" when it launches the stream (``gram``) and apply (``map``) kernels.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1 (the kernels run on the CPU in the interpreter)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import FLAG_AXES, kernel_launches, ov_tensors, qk_tensors  # noqa: E402

from cm_triton import cm_ov, cm_qk

SHAPE = (4, 2, 8, 40)


def launches(fn, make, flags: dict) -> collections.Counter:
    ts = make(*SHAPE, dtype=__import__("torch").float32)
    with kernel_launches() as n:
        fn(*ts, head_dim=SHAPE[2], eta=0.1, backend="triton", **flags)
    return n


def main() -> None:
    t0 = time.time()
    axes = dict(FLAG_AXES, hybrid=(True, False))
    rows, covered, total = [], 0, 0
    per_kernel: collections.Counter = collections.Counter()
    for values in itertools.product(*axes.values()):
        flags = dict(zip(axes, values))
        n = launches(cm_ov, ov_tensors, flags)
        if not flags["hybrid"]:
            qk = {k: v for k, v in flags.items() if k != "hybrid"}
            n = n + launches(cm_qk, qk_tensors, qk)
        total += 1
        ok = n["gram"] >= 1 and n["map"] >= 1
        covered += ok
        per_kernel.update({k: 1 for k in n})
        rows.append((flags, n, ok))
    lines = [
        "# Kernel coverage: what each flag combination launches (`backend=\"triton\"`)",
        "",
        f"`TRITON_INTERPRET=1 python bench/kernel_coverage.py`, {time.strftime('%Y-%m-%d')}, "
        f"{time.time() - t0:.0f} s.",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"**{covered} of {total} combinations launch the stream and apply kernels.** "
        "Combinations launching each kernel: "
        + ", ".join(f"{k} {v}" for k, v in sorted(per_kernel.items())) + ".",
        "",
        "| " + " | ".join(axes) + " | gram | map | maps | inv_sqrt |",
        "|" + "---|" * (len(axes) + 4),
    ]  # fmt: skip
    for flags, n, _ in rows:
        lines.append("| " + " | ".join(str(v) for v in flags.values()) + " | "
                     + " | ".join(str(n[k]) for k in ("gram", "map", "maps", "inv_sqrt"))
                     + " |")  # fmt: skip
    out = Path("bench/results/kernel_coverage.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main()
