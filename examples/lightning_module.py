"""Lightning with CompositionalMuon: ``configure_optimizers`` returns it and a scheduler.

Lightning's automatic optimisation calls ``optimizer.step(closure)``; CompositionalMuon runs
the closure (forward and backward) first, as ``torch.optim`` optimizers do.

    python examples/lightning_module.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Chunks, tiny_llama  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402


class LitLM(L.LightningModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.model = tiny_llama()
        self.steps = steps
        self.losses: list[float] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> dict:
        opt = CompositionalMuon(param_groups(self.model), lr=0.02, adamw_lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(steps: int = 20) -> list[float]:
    """Train ``tiny_llama`` for ``steps`` steps; the losses."""
    module = LitLM(steps)
    data = torch.utils.data.DataLoader(Chunks(), batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    return module.losses


if __name__ == "__main__":
    print([round(x, 3) for x in main()])
