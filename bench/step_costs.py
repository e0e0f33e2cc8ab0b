"""What one optimizer step costs, counted: ``python bench/step_costs.py`` (a markdown table;
``--kernels`` adds ``backend="triton"``, through Triton's interpreter where there is no GPU:
about 25 minutes on 2 cores; ``--blocks=N`` counts an N-block model instead of 4).

Copies (bytes of stack/cat/clone/copy ops, inputs and outputs, over the parameter bytes),
host reads of tensor values, aten ops and launches (device-work ops plus Triton launches:
``tests/step_costs.py``) of a steady-state step on the Llama-shaped model of
``tests/step_costs.py`` (4 blocks, d 256, 8/2 heads), for CompositionalMuon and for
torch.optim's AdamW and Muon on the same model. Deterministic: counts, not timings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "--kernels" in sys.argv:  # before triton is imported: no GPU here, the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("CUDA_VISIBLE_DEVICES")
                          else "1")  # fmt: skip

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from step_costs import Llama, hidden_matrices, step_costs  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402


class _MuonAndAdamW:
    def __init__(self, model) -> None:
        hidden = hidden_matrices(model)
        rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
        self.opts = (torch.optim.Muon(hidden, lr=0.02),
                     torch.optim.AdamW(rest, lr=1e-3, foreach=True))  # fmt: skip

    def step(self) -> None:
        for o in self.opts:
            o.step()


CASES = {
    "CompositionalMuon, nonfinite='raise'": lambda m: CompositionalMuon(param_groups(m), lr=0.02),
    "CompositionalMuon, nonfinite='skip'": lambda m: CompositionalMuon(
        param_groups(m), lr=0.02, nonfinite="skip"),
    "CompositionalMuon, capturable=True": lambda m: CompositionalMuon(
        param_groups(m), lr=0.02, nonfinite="skip", capturable=True),
    "torch.optim.AdamW(foreach=True)": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3,
                                                                   foreach=True),
    "torch.optim.Muon + AdamW(foreach=True)": _MuonAndAdamW,
}  # fmt: skip


KERNEL_CASES = {
    "CompositionalMuon, backend='triton'": lambda m: CompositionalMuon(
        param_groups(m), lr=0.02, backend="triton"),
}  # fmt: skip


def main() -> None:
    print("| optimizer | copies (x parameter bytes) | by op | host reads | aten ops "
          "| launches (Triton) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    cases = dict(CASES, **(KERNEL_CASES if "--kernels" in sys.argv else {}))
    blocks = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--blocks=")), 4)
    for name, make in cases.items():
        torch.manual_seed(0)
        c = step_costs(Llama(n=blocks), make)
        ops = ", ".join(f"{k} {v:.3f}" for k, v in sorted(c.by_op.items()))
        triton = sum(c.triton.values())
        print(f"| {name} | {c.copies:.3f} | {ops} | {c.reads} | {c.ops} | {c.launches} "
              f"({triton}) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
