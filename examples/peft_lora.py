"""A PEFT LoRA fine-tune with CompositionalMuon.

With LoRA the attention's base weights are frozen: CM has no pair to step, and
``param_groups`` says so in its log; the trainable adapters (``lora_A``, ``lora_B``) go to
Muon, logged with the reason. Nothing is left unreported (``unrecognised="raise"`` passes).

    python examples/peft_lora.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import text_chunks, tiny_llama  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402


def main(steps: int = 20) -> tuple[list[float], torch.nn.Module]:
    """Fine-tune LoRA adapters on ``tiny_llama`` for ``steps`` steps; the losses and the model."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    model = peft.get_peft_model(tiny_llama(), cfg)
    opt = CompositionalMuon(param_groups(model, unrecognised="raise"), lr=0.02, adamw_lr=3e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=steps)
    chunks = text_chunks()
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(steps):
        ids = chunks[order[step * 8 : (step + 1) * 8]]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # param_groups' report of what it found
    print([round(x, 3) for x in main()[0]])
