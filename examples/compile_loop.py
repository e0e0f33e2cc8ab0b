"""A plain training loop with ``torch.compile``: the model compiled, a scheduler on the step.

The step itself may be compiled too (``torch.compile(opt.step)``: with ``nonfinite="skip"`` it
reads nothing back to the host and traces as one graph, ``tests/test_step_costs.py``), but only
at a constant lr: the lr is a Python number, so each new value a scheduler sets recompiles the
step, and after ``torch._dynamo.config.recompile_limit`` (8) dynamo runs it eagerly with a
warning. With a scheduler, compile the model and keep the step eager, as here.

    python examples/compile_loop.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import text_chunks, tiny_llama  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402


def main(steps: int = 20, backend: str = "inductor") -> list[float]:
    """Train a compiled ``tiny_llama`` for ``steps`` steps; the losses."""
    model = tiny_llama()
    opt = CompositionalMuon(param_groups(model), lr=0.02, adamw_lr=3e-3, nonfinite="skip")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    forward = torch.compile(model, backend=backend)

    chunks = text_chunks()
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))
    losses = []
    for i in range(steps):
        ids = chunks[order[i * 8 : (i + 1) * 8]]
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    print([round(x, 3) for x in main()])
