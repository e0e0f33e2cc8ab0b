"""Hugging Face ``Trainer`` with CompositionalMuon: a scheduler, a checkpoint, a resume.

``Trainer`` takes a ready optimizer and scheduler through ``optimizers=(opt, sched)``; it saves
the optimizer's ``state_dict`` (momentum and Adam moments) in each checkpoint and loads it on
``train(resume_from_checkpoint=...)``. A resumed run ends on the same weights as an
uninterrupted one (``tests/test_examples.py`` checks it).

    python examples/hf_trainer.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).parent))
from common import Chunks, tiny_llama  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402


def train(out_dir: str, steps: int = 20, resume: str | None = None,
          save_every: int = 10) -> Trainer:  # fmt: skip
    """Train ``tiny_llama`` for ``steps`` steps, from the checkpoint directory ``resume`` if
    given (model, optimizer, scheduler, data order and RNG); checkpoints every ``save_every``
    steps under ``out_dir``."""
    model = tiny_llama()
    opt = CompositionalMuon(param_groups(model), lr=0.02, adamw_lr=3e-3)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=8, save_steps=save_every,
        logging_steps=5, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Chunks(),
                      optimizers=(opt, sched))  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        first = train(d, steps=20)
        print("trained:", [round(h["loss"], 3) for h in first.state.log_history if "loss" in h])
        # As if the run had stopped at step 10: a fresh model and optimizer, resumed there.
        resumed = train(d + "/again", steps=20, resume=d + "/checkpoint-10")
        same = all(torch.equal(a, b) for a, b in zip(first.model.parameters(),
                                                     resumed.model.parameters()))  # fmt: skip
        print("resumed at step 10; final weights equal to the uninterrupted run's:", same)


if __name__ == "__main__":
    main()
