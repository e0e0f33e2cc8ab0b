"""accelerate with CompositionalMuon: ``Accelerator.prepare`` wraps the optimizer and scheduler.

Build the param groups from the model before ``prepare`` (on one process ``prepare`` returns
the same parameters; under DDP build them from the wrapped model and pass
``process_group=`` to split the step, see docs/distributed.md).

    python examples/accelerate_loop.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from common import Chunks, tiny_llama  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402


def main(steps: int = 20) -> list[float]:
    """Train ``tiny_llama`` for ``steps`` steps; the losses."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = tiny_llama()
    opt = CompositionalMuon(param_groups(model), lr=0.02, adamw_lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=steps, pct_start=0.1)  # fmt: skip
    data = torch.utils.data.DataLoader(Chunks(), batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    model, opt, data, sched = accelerator.prepare(model, opt, data, sched)
    losses = []
    for step, batch in enumerate(data):
        if step == steps:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    print([round(x, 3) for x in main()])
