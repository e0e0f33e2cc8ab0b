"""Host time of one optimizer step on tiny tensors, with pytest-benchmark.

    python -m pytest bench/test_bench_host.py --benchmark-only --benchmark-json=OUT.json

On tiny tensors the arithmetic is negligible and a step's time is what the host spends
dispatching it (what a GPU waits for between kernels). The model is Llama-shaped
(``tests/step_costs.Llama``: 4 blocks, width 32, 8 query / 2 KV heads of 4, a SwiGLU MLP);
every optimizer steps every parameter: ``torch.optim.AdamW(foreach=True)`` on all of them;
``torch.optim.Muon`` on the hidden matrices plus AdamW(foreach) on the rest;
``CompositionalMuon`` with ``param_groups`` (CM on attention, Muon on the MLP, AdamW on the
rest), ``nonfinite`` "raise" (one host read) and "skip" (none).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from step_costs import Llama, hidden_matrices  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402


class Both:
    """Two torch optimizers stepped as one."""

    def __init__(self, *opts) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()


OPTIMIZERS = {
    "adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
    "torch_muon": lambda m: Both(
        torch.optim.Muon(hidden_matrices(m), lr=0.02),
        torch.optim.AdamW(
            [p for p in m.parameters() if all(p is not q for q in hidden_matrices(m))],
            lr=1e-3,
            foreach=True,
        ),
    ),  # fmt: skip
    "cm_raise": lambda m: CompositionalMuon(param_groups(m), lr=0.02),
    "cm_skip": lambda m: CompositionalMuon(param_groups(m), lr=0.02, nonfinite="skip"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_host_time_per_step(benchmark, name):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Llama(n=4, d=32)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = OPTIMIZERS[name](model)
    opt.step()
    benchmark.pedantic(opt.step, rounds=30, iterations=5, warmup_rounds=2)
